"""Every number on the card and in the logs is the run's: MACs under bf16, what the run did, non-finite outputs.

One short real run (``scripts/train.py``, bf16 autocast on the CPU) that stops after 4 steps, long before its
sparsity ramp: the trainer's log, the export's config.json and card, and ``scripts/evaluate_model.py`` are checked
against what ran and against MACs counted independently in fp32.
"""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn

from st3_hf import count_macs
from st3_hf.train.cli import export_main
from test_hub_export import independent_macs
from train_utils import REPO, SMALL, error_line, evaluate_in_process, in_process, records, train_in_process

QUICKSTART = "recipes/quickstart.yaml"
FASHION_MNIST_TRAIN = 60000
# quickstart, overridden: 4 steps of 32 images, bf16, a subset larger than the split, 3 planned epochs
OVERRIDES = [*SMALL, "data.train_subset=100000", "training.max_steps=4", "training.epochs=3",
             "training.mixed_precision=bf16", "data.hflip=0.0", "training.checkpoint_every_steps=4"]


@pytest.fixture(scope="module")
def short_bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("card_numbers") / "run"
    train_in_process(QUICKSTART, *OVERRIDES, f"output_dir={out}", check=True)
    return out


def fp32_reference():
    """The quickstart's resnet10t (1x28x28 input), counted in fp32 outside any autocast."""
    return timm.create_model("resnet10t", num_classes=10, in_chans=1), (1, 28, 28)


def evaluate(folder, *overrides):
    return evaluate_in_process(str(folder), *overrides)


def strict_json(text: str):
    """JSON as jq and strict parsers read it: NaN / Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_macs_are_the_same_in_the_log_the_export_and_evaluate_under_bf16(short_bf16_run):
    out = short_bf16_run
    model, input_size = fp32_reference()
    reference = count_macs(model, input_size).dense_mflops
    assert reference == pytest.approx(sum(independent_macs(model, input_size).values()) / 1e6)
    final = [r for r in records(out) if r["kind"] == "final"][-1]
    block = json.loads((out / "config.json").read_text())["sparsity"]
    proc = evaluate(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = strict_json(proc.stdout)
    for source in (final, block, evaluated):  # bf16 autocast made these 0 or a fraction of the figure
        assert source["dense_mflops"] == pytest.approx(reference, rel=1e-9)
        assert source["sparse_mflops"] == pytest.approx(final["sparse_mflops"], rel=1e-9)
    card = (out / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| this model"))
    assert f"| {reference:.2f} |" in row


def test_card_per_layer_macs_are_each_layers_own(short_bf16_run):
    model, input_size = fp32_reference()
    expected = independent_macs(model, input_size)  # hooks on each module: the stem's figure is the stem's
    per_layer = json.loads((short_bf16_run / "config.json").read_text())["sparsity"]["per_layer"]
    assert per_layer["layer1.0.conv1"]["dense_mflops"] != pytest.approx(per_layer["conv1.0"]["dense_mflops"])
    for name, info in per_layer.items():
        assert info["dense_mflops"] == pytest.approx(expected[name] / 1e6, rel=1e-9), name
    card = (short_bf16_run / "README.md").read_text()
    for name in ("conv1.0", "layer1.0.conv1", "fc"):
        assert f"| {expected[name] / 1e6:.4f} |" in next(l for l in card.splitlines() if l.startswith(f"| `{name}` |"))


def test_card_headline_and_figures_are_what_ran(short_bf16_run):
    out = short_bf16_run
    card = (out / "README.md").read_text()
    block = json.loads((out / "config.json").read_text())
    final = [r for r in records(out) if r["kind"] == "final"][-1]
    body = card.split("---", 2)[2]
    headline = next(line for line in body.splitlines() if line.startswith("A "))
    steps_per_epoch = FASHION_MNIST_TRAIN // 32 + (FASHION_MNIST_TRAIN % 32 > 0)
    achieved = 100 * block["sparsity"]["achieved_sparsity"]
    assert achieved < 1.0  # stopped at step 4, before the ramp (epoch 0.2) began
    assert f"with {achieved:.2f} % of its prunable weights at zero (target 90.00 %)" in headline
    assert f"for 4 optimizer steps ({4 / steps_per_epoch:.3g} of 3 planned epochs, {4 * 32} training images seen)" \
        in headline
    assert f"**This run ended before reaching its target sparsity: {achieved:.2f} %" in card
    # the recipe's own description ("... 2 epochs on a CPU") comes with every override of this run
    for override in ("training.epochs=3", "training.max_steps=4", "training.mixed_precision=bf16", "data.hflip=0.0",
                     "data.batch_size=32", "data.train_subset=100000", "data.eval_subset=128"):
        assert override in card, override
    assert f"{FASHION_MNIST_TRAIN} training images" in card and "first 100000" not in card
    assert final["eval_examples"] == 128 and block["metrics"]["eval_examples"] == 128
    assert "Accuracy measured on 128 images of" in card


@pytest.mark.slow
def test_exported_checkpoint_card_says_its_steps_and_its_shortfall(short_bf16_run, tmp_path):
    (checkpoint,) = sorted((short_bf16_run / "checkpoints").glob("step_*"))
    in_process(export_main, str(REPO / "scripts" / "export.py"), [str(checkpoint), "--output-dir", str(tmp_path / "hub")],
               check=True)
    card = (tmp_path / "hub" / "README.md").read_text()
    headline = next(line for line in card.split("---", 2)[2].splitlines() if line.startswith("A "))
    assert "(target 90.00 %)" in headline and headline.endswith("for 4 optimizer steps.")
    assert "**This run ended before reaching its target sparsity" in card


@pytest.mark.slow
def test_evaluate_on_nan_weights_prints_valid_json_and_says_so(short_bf16_run, tmp_path):
    folder = tmp_path / "nan_export"
    shutil.copytree(short_bf16_run, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    fc = weights["fc.weight"]
    weights["fc.weight"] = fc.masked_fill(fc != 0, float("nan"))  # same zeros: it still loads as recorded
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"))
    proc = evaluate(folder, "data.eval_subset=64")
    line = error_line(proc, exit_code=2)
    assert "non-finite outputs" in line and "64 of 64" in line
    scores = strict_json(proc.stdout)  # was "loss": NaN and a top-1 ranked from NaN logits
    assert scores["loss"] is None and scores["top1"] is None and scores["top5"] is None
    assert scores["outputs_finite"] is False and scores["nonfinite_examples"] == 64
