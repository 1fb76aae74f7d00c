"""The new methods run the way users run them: a shipped recipe through scripts/train.py to an export
that plain timm loads, with the method's engine asserted from what the run leaves behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from data_utils import fashion_mnist_available
from st3_hf.hub.state_io import load_sparsifier_state
from train_utils import SMALL, TRAIN, records, run, train_in_process

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian dataset-fashion-mnist package")]

# the Fashion-MNIST recipes as shipped, on a small model and a small subset (CPU)
TINY = [*SMALL, "data.train_subset=128", "data.eval_subset=64", "model.name=resnet10t", "data.device_resident=false", "training.mixed_precision=no",
        "sparsity.start_epoch=0", "sparsity.end_epoch=1", "lr_schedule.warmup_epochs=0"]


def page_feather(w: torch.Tensor, t: float, p: float) -> torch.Tensor:
    """docs/method.md: ``q = sign(w) (|w|^p - t^p)^(1/p)`` where ``|w| > t``, else 0."""
    wd = w.double()
    q = torch.where(wd.abs() > t, torch.sign(wd) * (wd.abs() ** p - t ** p).clamp_min(0) ** (1 / p), torch.zeros_like(wd))
    return q.to(w.dtype)


def test_feather_recipe_trains_exports_and_loads_in_timm(tmp_path):
    out = tmp_path / "feather"
    train_in_process("recipes/fmnist_feather_98.yaml", f"output_dir={out}", *TINY, check=True)
    final = [r for r in records(out) if r["kind"] == "final"][-1]
    assert final["frozen"] is True and abs(final["sparsity"] - 0.98) < 2e-3

    # the export is the Feather operator applied to the last latent weights with the last threshold
    last = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))[-1]
    state = load_sparsifier_state(last)
    assert state["config"]["method"] == "feather"
    assert (state["config"]["p"], state["config"]["theta"]) == (3.0, 0.5)
    latent = load_file(str(last / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    t = float(state["global_threshold"])
    for name in state["masks"]:
        key = f"{name}.weight"
        torch.testing.assert_close(exported[key], page_feather(latent[key], t, 3.0), rtol=1e-4, atol=1e-5, msg=key)

    config = json.loads((out / "config.json").read_text())
    assert config["sparsity"]["method"] == "feather"
    model = timm.create_model(f"local-dir:{out}", pretrained=True)  # plain timm, no st3_hf
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    assert abs(zeros / total - 0.98) < 2e-3

    # sparse fine-tuning from the Feather export, as from an ST-3 one: every zero stays zero
    tuned = tmp_path / "tuned"
    train_in_process("recipes/finetune_quickstart.yaml", *SMALL, "data.train_subset=128",
         "training.epochs=1", f"model.init_from={out}", f"output_dir={tuned}", check=True)
    before, after = load_file(str(out / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    changed = 0
    for key, w in before.items():
        if key.endswith("weight") and w.ndim > 1 and not key.startswith("fc."):
            assert torch.all(after[key][w == 0] == 0), key
            changed += int(not torch.equal(w, after[key]))
    assert changed > 0


def _resume_from_copy(ref: Path, out: Path, step: int, common: list) -> None:
    """Continue from the reference run's own mid-run checkpoint in a fresh folder."""
    import shutil

    name = f"step_{step:08d}"
    shutil.copytree(ref / "checkpoints" / name, out / "checkpoints" / name)
    shutil.copyfile(ref / "metrics.jsonl", out / "metrics.jsonl")  # truncated to the checkpoint's records on resume
    train_in_process(*common, f"output_dir={out}", "training.resume_from_checkpoint=latest", check=True)


def _same_run(a: Path, b: Path) -> None:
    from train_utils import assert_same_weights, comparable

    assert_same_weights(a, b)
    assert comparable(records(a)) == comparable(records(b))


def test_probmask_resume_mid_run_equals_uninterrupted_and_exports(tmp_path):
    common = ["recipes/fmnist_probmask_90.yaml", *TINY, "training.checkpoint_every_steps=2",
              "training.keep_checkpoints=10", "sparsity.probas_lr=0.05", "sparsity.probas_momentum=0.5"]
    ref = tmp_path / "ref"
    train_in_process(*common, f"output_dir={ref}", check=True)
    mid = load_sparsifier_state(ref / "checkpoints" / "step_00000002")
    assert 0 < mid["ratio"] < 0.9 and not mid["frozen"]  # in the middle of the ramp (4 steps per epoch)
    probas = torch.cat([p.reshape(-1) for p in mid["probas"].values()])
    assert float(probas.double().mean()) == pytest.approx(1 - mid["ratio"], abs=1e-6)  # the budget
    out = tmp_path / "resumed"
    _resume_from_copy(ref, out, 2, common)
    _same_run(ref, out)

    final = [r for r in records(ref) if r["kind"] == "final"][-1]
    assert final["frozen"] and abs(final["sparsity"] - 0.9) < 0.01  # Bernoulli(p) with E[density] = 0.1
    model = timm.create_model(f"local-dir:{ref}", pretrained=True)  # the probabilities are not in the export
    assert not any(n.endswith("probas") for n, _ in model.named_parameters())
    assert json.loads((ref / "config.json").read_text())["sparsity"]["method"] == "probmask"


def test_iterative_lrr_with_finetune_resumes_mid_round_and_follows_its_schedule(tmp_path):
    # 3 rounds of 1 epoch (4 steps each), pruning to 0, 20 %, 36 %; then 1 fine-tuning epoch
    common = ["recipes/fmnist_lrr_90.yaml", *TINY, "training.epochs=1", "sparsity.schedule=iterative",
              "sparsity.method=gmp", "sparsity.rounds=3", "sparsity.target=0.36", "training.finetune_epochs=1",
              "training.checkpoint_every_steps=2", "training.keep_checkpoints=10"]
    ref = tmp_path / "ref"
    train_in_process(*common, f"output_dir={ref}", check=True)
    recs = records(ref)
    phases = [r for r in recs if r["kind"] == "phase"]
    assert [(r["phase"], r["step"]) for r in phases] == [("round", 0), ("round", 4), ("round", 8), ("finetune", 12)]
    assert [r["sparsity"] for r in phases][:3] == pytest.approx([0.0, 0.2, 0.36], abs=1e-3)  # 1 - 0.8^r
    evals = [r for r in recs if r["kind"] in ("eval", "final")]
    assert [round(r["sparsity"], 3) for r in evals] == [0.0, 0.2, 0.36, 0.36]
    assert all(r["frozen"] for r in evals)
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}
    assert lrs[4] == lrs[8] > lrs[2]  # the schedule restarts with each round (warm-up 0: the peak lr)
    assert lrs[14] > lrs[12]  # fine-tuning: the cosine runs on past its end, rising again

    mid = load_sparsifier_state(ref / "checkpoints" / "step_00000006")  # the middle of round 1
    assert mid["frozen"] and mid["ratio"] == pytest.approx(0.2)
    out = tmp_path / "resumed"
    _resume_from_copy(ref, out, 6, common)
    _same_run(ref, out)
    model = timm.create_model(f"local-dir:{ref}", pretrained=True)
    assert model is not None


def _sha256_of_state(state: dict) -> str:
    """Sorted keys, dtype, shape and bytes of each tensor (the digest the rewind record carries)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _best_evaluation(evals: list, up_to_step: int) -> dict:
    """docs/method.md's "best checkpoint": highest eval top-1; the earliest of equal ones."""
    candidates = [r for r in evals if r["step"] <= up_to_step]
    top = max(r["eval_top1"] for r in candidates)
    return [r for r in candidates if r["eval_top1"] == top][0]


def test_lrr_rewind_reloads_the_best_evaluated_weights_and_resumes_mid_run(tmp_path):
    # 64 images in batches of 32: 2 steps per epoch; prune epochs 0-1 (ramp done after epoch 0), retrain 2-3
    common = ["recipes/fmnist_lrr_90.yaml", *TINY, "data.train_subset=64", "training.checkpoint_every_steps=1",
              "training.keep_checkpoints=20", "optimizer.lr=0.2",
              "training.log_every_steps=1"]  # resumes at a logging boundary: the logged mean loss is comparable
    ref = tmp_path / "ref"
    train_in_process(*common, f"output_dir={ref}", check=True)
    recs = records(ref)
    evals = [r for r in recs if r["kind"] == "eval" and r["step"] <= 4 and r["target_ratio"] == pytest.approx(0.9)]
    assert [r["step"] for r in evals] == [2, 4]  # the candidates: the prune run's evaluations at the target
    retrain = [r for r in recs if r["kind"] == "phase" and r["phase"] == "retrain"][0]
    best = _best_evaluation(evals, 4)
    assert (retrain["step"], retrain["rewound_to"]["step"]) == (4, best["step"])
    assert retrain["rewound_to"]["eval_top1"] == best["eval_top1"]
    # what the rewind loaded is exactly the checkpointed weights of the best evaluation (no step in between)
    at_best = load_file(str(ref / "checkpoints" / f"step_{best['step']:08d}" / "model.safetensors"))
    assert retrain["rewound_to"]["weights_sha256"] == _sha256_of_state(at_best)
    # and a checkpoint in the middle of the prune run carries the best so far, tensor for tensor
    kept = load_file(str(ref / "checkpoints" / "step_00000003" / "best_weights.safetensors"))
    so_far = load_file(str(ref / "checkpoints" / f"step_{_best_evaluation(evals, 3)['step']:08d}" / "model.safetensors"))
    assert kept.keys() == so_far.keys() and all(torch.equal(kept[k], so_far[k]) for k in kept)

    out = tmp_path / "resumed"  # killed mid-run after the first evaluation: rewinds to the same weights
    _resume_from_copy(ref, out, 3, common)
    _same_run(ref, out)
    final = [r for r in recs if r["kind"] == "final"][-1]
    assert final["frozen"] and abs(final["sparsity"] - 0.9) < 2e-3


def test_probmask_with_frozen_phases_under_two_process_ddp(tmp_path):
    """ProbMask's probabilities get no gradient once masks freeze (LRR retrain, fine-tuning): DDP must cope."""
    from train_utils import accelerate_cmd, free_port

    out = tmp_path / "ddp"
    run(accelerate_cmd("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), TRAIN)
        + ["recipes/fmnist_probmask_90.yaml", *TINY, f"output_dir={out}", "training.epochs=1",
           "sparsity.schedule=lrr", "training.finetune_epochs=1"])
    recs = records(out)
    phases = [(r["phase"], r["frozen"]) for r in recs if r["kind"] == "phase"]
    assert phases == [("prune", False), ("retrain", True), ("finetune", True)]
    final = [r for r in recs if r["kind"] == "final"][-1]
    assert final["num_processes"] == 2 and final["ranks_agree"] is True
    assert final["step"] == 6  # 128 images / (2 ranks x 32) = 2 steps per epoch, 3 epochs
    assert abs(final["sparsity"] - 0.9) < 0.01  # Bernoulli(p) with E[density] = 0.1
    model = timm.create_model(f"local-dir:{out}", pretrained=True)  # plain timm
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert abs(zeros - 0.9) < 0.01
