"""Every file in recipes/ loads, resolves and builds its sparse model; one recipe of each kind of run
(:func:`run_kind`: architecture, method, schedule, data source, start, memory format, compile,
precision...) runs as users run it: ``scripts/train.py RECIPE key=value ...`` for a few steps, then
trains, evaluates, freezes and exports, and the export loads with plain timm and gives the trainer's
final numbers. Recipes of one kind differ only in numbers (target, ramp epochs, lr), which
tests/test_recipes_shipped.py checks file by file.

Recipes are globbed: a recipe added later joins without editing this file. Each keeps its own
settings (architecture, channels_last, compile, device-resident data, init_from when it exists,
exclude, label smoothing...); only what must shrink is overridden, by rules keyed on recipe fields
(:func:`shrink_overrides`, each with its reason, printed with ``pytest -s`` and in any failure):
the data (a generated ImageNet-layout folder with ``model.num_classes`` classes for image folders,
subsets of the real Fashion-MNIST), the input size, the batch, the steps and the output folder.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F

from data_utils import make_hf_saved_dataset, make_image_folder
from train_utils import REPO, records, train_in_process
from st3_hf.train.recipe import keys_given, load_recipe

RECIPE_FILES = sorted((REPO / "recipes").glob("*.yaml"))
MAX_STEPS = 2
MAX_SIDE = 32  # input height/width on the CPU
MAX_BATCH = 4
EVAL_IMAGES = 16
# Fashion-MNIST's classes, index order (the dataset's README)
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]
# keys a shrink rule may touch: anything else stays as the recipe sets it
SHRINKABLE = {"output_dir", "data.root", "data.hf_name", "data.input_size", "data.batch_size", "data.eval_batch_size",
              "data.train_subset", "data.eval_subset", "data.num_workers", "training.max_steps",
              "training.mixed_precision", "model.init_from", "model.pretrained", "hub.push"}


@dataclass(frozen=True)
class Override:
    key: str
    value: Any
    reason: str

    def arg(self) -> str:
        value = self.value
        if isinstance(value, list):
            value = "[" + ",".join(str(v) for v in value) + "]"
        return f"{self.key}={'null' if value is None else value}"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def class_names(n: int) -> List[str]:
    return [f"n{i:08d}" for i in range(n)]  # WordNet-id-like folder names, sorted = index order


@pytest.fixture(scope="module")
def data_maker(tmp_path_factory):
    """Generated datasets, one per (kind, num_classes), shared by the recipes of this module."""
    made: Dict[tuple, Path] = {}

    def image_folder(num_classes: int, train_images: int) -> Path:
        key = ("folder", num_classes, train_images)
        if key not in made:
            per_class = {"train": max(1, math.ceil(train_images / num_classes)),
                         "val": max(1, math.ceil(EVAL_IMAGES / num_classes))}
            made[key] = make_image_folder(tmp_path_factory.mktemp(f"imagenet{num_classes}"), class_names(num_classes),
                                          per_class=per_class, size=MAX_SIDE + 8)
        return made[key]

    def hf_dataset(num_classes: int, train_images: int, train_split: str, eval_split: str) -> Path:
        key = ("hf", num_classes, train_images, train_split, eval_split)
        if key not in made:
            folder = image_folder(num_classes, train_images)
            made[key] = make_hf_saved_dataset(tmp_path_factory.mktemp("hf"), folder,
                                              {train_split: "train", eval_split: "val"})
        return made[key]

    return image_folder, hf_dataset


def base_export(recipe, shrunk_data: Dict[str, Any], folder: Path) -> Path:
    """A sparse export of the recipe's architecture to start a fine-tune from (its real base is a Hub id
    or another run's output, neither of which is here). Another class count: the head gets replaced."""
    import timm

    from st3_hf import sparsify
    from st3_hf.hub.export import export_pretrained

    m = recipe.model
    model = timm.create_model(m.name, num_classes=m.num_classes + 3, in_chans=m.in_chans)
    target = recipe.sparsity.target if recipe.sparsity.method != "dense" else 0.5
    sp = sparsify(model, method="st3" if recipe.sparsity.method == "dense" else recipe.sparsity.method,
                  target=target, end_step=1)
    sp.apply(target)
    channels = shrunk_data["input_size"][0]
    export_pretrained(model, sp, folder, data_pretrained_cfg={
        "input_size": shrunk_data["input_size"], "mean": recipe.data.mean, "std": recipe.data.std,
        "num_classes": m.num_classes + 3, "crop_pct": recipe.data.crop_pct})
    assert channels == m.in_chans
    return folder


def dense_start(recipe, input_size, folder: Path) -> Path:
    """Dense timm weights of the recipe's architecture in timm's Hub format, for ``model.pretrained``
    (its real value is a Hub id or another run's output, neither of which is here)."""
    import timm
    from timm.models._hub import save_for_hf

    m = recipe.model
    model = timm.create_model(m.name, num_classes=m.num_classes + 3, in_chans=m.in_chans)
    chans = input_size[0]
    mean = recipe.data.mean if len(recipe.data.mean) == chans else [0.5] * chans
    std = recipe.data.std if len(recipe.data.std) == chans else [0.25] * chans
    save_for_hf(model, str(folder), safe_serialization=True, data_config={
        "input_size": tuple(input_size), "mean": tuple(mean), "std": tuple(std),
        "interpolation": recipe.data.interpolation, "crop_pct": recipe.data.crop_pct, "crop_mode": "center"})
    return folder


def shrink_overrides(recipe, output_dir: Path, data_maker, work: Path) -> List[Override]:
    """What must change for a CPU run of a few steps, each with its reason; keyed on recipe fields only."""
    image_folder, hf_dataset = data_maker
    d, m, t = recipe.data, recipe.model, recipe.training
    out = [Override("output_dir", str(output_dir), "a temporary folder")]
    chans, height, width = d.input_size
    pretrained = getattr(m, "pretrained", False)
    # a run from dense weights takes its preprocessing from them unless the recipe sets it: shrink it there
    size_from_start = pretrained not in (False, None) and "input_size" not in keys_given(d)
    start_size = [m.in_chans, min(height, MAX_SIDE), min(width, MAX_SIDE)]
    if (height > MAX_SIDE or width > MAX_SIDE) and not size_from_start:
        side = [chans, min(height, MAX_SIDE), min(width, MAX_SIDE)]
        out.append(Override("data.input_size", side, f"{height}x{width} steps take seconds each on a CPU"))
    batch = min(d.batch_size, MAX_BATCH)
    if batch != d.batch_size:
        out.append(Override("data.batch_size", batch, "a few images per step on a CPU"))
    if d.eval_batch_size and d.eval_batch_size > 2 * MAX_BATCH:
        out.append(Override("data.eval_batch_size", 2 * MAX_BATCH, "a few images per step on a CPU"))
    # more batches than steps: no epoch ends, so no full-model checkpoint or mid-run evaluation
    train_images = batch * t.gradient_accumulation_steps * (MAX_STEPS + 1)
    out.append(Override("data.train_subset", train_images, f"{MAX_STEPS} steps need {MAX_STEPS + 1} batches at most"))
    out.append(Override("data.eval_subset", EVAL_IMAGES, "a few evaluation images"))
    if d.num_workers:
        out.append(Override("data.num_workers", 0, "no loader processes on a 2-core test machine"))
    out.append(Override("training.max_steps", MAX_STEPS, "a few steps"))
    if d.source == "imagefolder":
        out.append(Override("data.root", str(image_folder(m.num_classes, train_images)),
                            f"the ImageNet-layout folder is generated here, with model.num_classes={m.num_classes} classes"))
    elif d.source == "hf":
        out.append(Override("data.root", str(hf_dataset(m.num_classes, train_images, d.train_split, d.eval_split)),
                            "a datasets save_to_disk folder generated here (no network)"))
        if d.hf_name:
            out.append(Override("data.hf_name", None, "the named dataset is not in this machine's cache"))
    # fashion_mnist: the real data, installed by `make` (Debian package dataset-fashion-mnist)
    if not torch.cuda.is_available():
        if t.mixed_precision == "bf16" and not cpu_has_native_bf16():
            out.append(Override("training.mixed_precision", "no",
                                "this CPU has no native bf16 (no avx512_bf16/amx_bf16): emulated bf16 convolutions "
                                "are about 20x slower; bf16 autocast on CPU is covered by tests/test_compile_amp.py"))
        if t.mixed_precision == "fp16":
            out.append(Override("training.mixed_precision", "no", "fp16 autocast with loss scaling needs a CUDA GPU"))
    if m.init_from and not Path(m.init_from).exists():
        side = next((o.value for o in out if o.key == "data.input_size"), list(d.input_size))
        base = base_export(recipe, {"input_size": side}, work / "base_model")
        out.append(Override("model.init_from", str(base),
                            f"{m.init_from} (a Hub id or another run's output) is not here: a sparse export of "
                            f"{m.name} made by the test"))
    if pretrained is True or (isinstance(pretrained, str) and not Path(pretrained.removeprefix("local-dir:")).exists()):
        side = start_size if size_from_start else next((o.value for o in out if o.key == "data.input_size"), list(d.input_size))
        start = dense_start(recipe, side, work / "dense_start")
        out.append(Override("model.pretrained", str(start),
                            f"{pretrained} (timm's Hub weights or another run's output) is not here: dense {m.name} "
                            f"weights in timm's format made by the test"))
    if recipe.hub.push:
        out.append(Override("hub.push", False, "no network in tests (pushing: tests/test_hub_push.py)"))
    return out


def expected_label_names(recipe) -> List[str]:
    if recipe.data.source == "fashion_mnist":
        return FASHION_MNIST_NAMES
    return class_names(recipe.model.num_classes)


def evaluate_plain_timm(export: Path, run_recipe) -> Dict[str, float]:
    """Top-1 and mean loss of ``timm.create_model("local-dir:...")`` on the run's evaluation images."""
    import timm

    from st3_hf.train.data import build_datasets
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    _, eval_ds = build_datasets(run_recipe.data)
    images = torch.stack([eval_ds[i][0] for i in range(len(eval_ds))])
    labels = torch.tensor([eval_ds[i][1] for i in range(len(eval_ds))])
    bf16 = run_recipe.training.mixed_precision == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(images).float()
    return {"model": model, "top1": float((logits.argmax(1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels)), "count": len(labels)}


@functools.lru_cache(maxsize=None)
def run_kind(path: Path) -> tuple:
    """What takes another code path in a run: recipes of one kind differ in numbers only."""
    r = load_recipe(path)
    m, d, sp, t = r.model, r.data, r.sparsity, r.training
    return (m.name, m.channels_last, m.compile, bool(m.init_from), m.pretrained is not False, m.head,
            d.source, d.device_resident, d.random_crop_padding > 0, sp.method, sp.schedule, tuple(sp.exclude),
            sp.soft_threshold, sp.rescale, t.mixed_precision, t.finetune_epochs > 0, t.gradient_accumulation_steps > 1,
            r.optimizer.name, r.lr_schedule.name, bool(r.hub.push))


def one_recipe_per_kind(paths: List[Path]) -> List[Path]:
    seen, chosen = set(), []
    for path in paths:
        kind = run_kind(path)
        if kind not in seen:
            seen.add(kind)
            chosen.append(path)
    return chosen


E2E_RECIPES = one_recipe_per_kind(RECIPE_FILES)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.name for p in RECIPE_FILES])
def test_recipe_loads_resolves_and_builds_its_sparse_model(path):
    from st3_hf.sparse.sparsifier import sparsify
    from st3_hf.train.modeling import create_model
    from st3_hf.train.recipe_schema import sparsity_config

    recipe = load_recipe(path)
    with torch.device("meta"):  # shapes and layer classes only: the kinds below run for real
        model = create_model(recipe.model)
        sparsifier = sparsify(model, sparsity_config(recipe.sparsity, steps_per_epoch=10, epochs=recipe.training.epochs))
    assert sparsifier.config.method == recipe.sparsity.method
    assert len(sparsifier.layers) > 0
    assert path in E2E_RECIPES or any(run_kind(path) == run_kind(other) for other in E2E_RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("path", E2E_RECIPES, ids=[p.name for p in E2E_RECIPES])
def test_recipe_runs_end_to_end_through_the_cli(path, tmp_path, data_maker):
    shipped = load_recipe(path)
    output_dir = tmp_path / "run"
    overrides = shrink_overrides(shipped, output_dir, data_maker, tmp_path)
    table = "\n".join(f"  {o.arg()}   # {o.reason}" for o in overrides)
    print(f"\n{path.name}:\n{table}")
    assert {o.key for o in overrides} <= SHRINKABLE, table
    proc = train_in_process(str(path.relative_to(REPO)), *[o.arg() for o in overrides])
    assert proc.returncode == 0, f"{path.name} with\n{table}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # what the run leaves behind says what ran
    run_recipe = load_recipe(output_dir / "recipe.yaml")
    recs = records(output_dir)
    train = [r for r in recs if r["kind"] == "train"]
    final = [r for r in recs if r["kind"] == "final"][-1]
    assert final["frozen"] and final["step"] == MAX_STEPS
    assert train and train[-1]["step"] == MAX_STEPS
    if not shipped.model.init_from:
        assert train[-1]["sparsifier_step"] == MAX_STEPS  # the sparsity hook ran at every real update
    kept = {o.key for o in overrides}
    for key in ("model.name", "model.channels_last", "model.compile", "data.device_resident", "sparsity.method",
                "sparsity.target", "sparsity.exclude", "training.label_smoothing", "optimizer.name"):
        if key not in kept:
            section, name = key.split(".")
            assert getattr(getattr(run_recipe, section), name) == getattr(getattr(shipped, section), name), key
    if "tensorboard" in shipped.logging.trackers:
        assert list((output_dir / "logs").rglob("events.out.tfevents.*")), "tensorboard logged nothing"

    # the export, read with plain timm: the trainer's final numbers, class names, exact zeros
    config = json.loads((output_dir / "config.json").read_text())
    plain = evaluate_plain_timm(output_dir, run_recipe)
    model = plain["model"]
    assert plain["count"] == final["eval_examples"]
    tolerance = 2.0 / plain["count"] if run_recipe.training.mixed_precision == "bf16" else 1e-9
    assert abs(plain["top1"] - final["eval_top1"]) <= tolerance, (plain, final)
    assert plain["loss"] == pytest.approx(final["eval_loss"], rel=1e-2 if tolerance > 1e-9 else 1e-4)
    assert model.pretrained_cfg["label_names"] == expected_label_names(run_recipe)
    assert model.num_classes == run_recipe.model.num_classes
    weights = dict(model.named_parameters())
    per_layer = config["sparsity"]["per_layer"]
    zeros = sum(int((weights[f"{name}.weight"] == 0).sum()) for name in per_layer)
    total = sum(weights[f"{name}.weight"].numel() for name in per_layer)
    assert zeros / total == pytest.approx(final["sparsity"], abs=1e-12)
    assert config["sparsity"]["achieved_sparsity"] == pytest.approx(final["sparsity"], abs=1e-12)
    if shipped.model.init_from:  # masks kept: every zero of the base backbone is still zero
        from safetensors.torch import load_file

        base = load_file(str(Path(run_recipe.model.init_from) / "model.safetensors"))
        head = model.get_classifier()
        for name, weight in weights.items():
            if name in base and base[name].shape == weight.shape and not any(weight is p for p in head.parameters()):
                if name.removesuffix(".weight") in per_layer:
                    assert bool((weight[base[name] == 0] == 0).all()), name
    card = (output_dir / "README.md").read_text()
    assert f"`{run_recipe.model.name}`" in card
    assert "| paper (" not in card  # a shrunk run is not the paper's setting
    assert str(run_recipe.data.root) in card or run_recipe.data.source != "imagefolder"
