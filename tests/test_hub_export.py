"""Exporting a sparse model to a Hub folder: timm format, metadata, compact copy, card, plot, recipe."""
from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import timm
import timm.data
import torch
import torch.nn as nn
import yaml
from huggingface_hub import ModelCard

import st3_hf
from st3_hf import SparsityConfig, sparsify
from st3_hf.hub.compact import load_compact, read_compact_metadata
from st3_hf.hub.export import export_pretrained
from st3_hf.train.run_export import export_run
from st3_hf.train.recipe import load_recipe
from st3_hf.train.recipe_schema import DataConfig, ExpectedResults, HubConfig, ModelConfig, Recipe
from reference_formulas import train_sparse_resnet

MEAN, STD = (0.2860,), (0.3530,)
DATA_CFG = {
    "input_size": (1, 32, 32),
    "mean": MEAN,
    "std": STD,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "num_classes": 5,
}
TARGET = 0.85



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, sparsifier = train_sparse_resnet()
    assert not sparsifier.frozen and sparsifier.ratio == pytest.approx(TARGET)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    effective = {name: w.clone() for name, w in sparsifier.effective_weights().items()}
    latent = {name: layer.latent_weight.detach().clone() for name, layer in sparsifier.layers.items()}
    root = tmp_path_factory.mktemp("export")
    metrics_file = root / "metrics.jsonl"
    metrics_file.write_text(
        json.dumps({"step": 3, "kind": "eval", "eval_top1": 0.4, "eval_top5": 0.9}) + "\n"
        + json.dumps({"step": 6, "kind": "train", "train_loss": 1.2}) + "\n"
        + json.dumps({"step": 6, "kind": "final", "eval_top1": 0.6125, "eval_top5": 0.975}) + "\n"
    )
    recipe = Recipe(
        output_dir="outputs/fmnist_resnet10t_st3_85",
        description="resnet10t on 32x32 Fashion-MNIST, ST-3 to 85%",
        model=ModelConfig(name="resnet10t", num_classes=5, in_chans=1),
        data=DataConfig(source="fashion_mnist", input_size=[1, 32, 32], mean=list(MEAN), std=list(STD), crop_pct=1.0),
        hub=HubConfig(repo_id="st3-test/resnet10t-fmnist-st3", dataset_name="fashion_mnist", license="mit"),
        expected=ExpectedResults(top1=76.95, sparsity=80.0, mflops=1215, source="paper Table 1, ResNet-50 ImageNet"),
    )
    folder = export_run(
        model, sparsifier, root / "hub", recipe, data_pretrained_cfg=DATA_CFG, metrics_file=metrics_file,
        base_model="timm/resnet10t.c3_in1k",
    )
    return dict(
        model=model, sparsifier=sparsifier, x=x, reference=reference, effective=effective, latent=latent,
        folder=folder, recipe=recipe, metrics_file=metrics_file,
    )


def independent_macs(model: nn.Module, input_size):
    """Dense MACs per conv/linear layer from forward hooks: output elements x fan-in per output."""
    macs = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def conv_hook(m, i, o, name=name):
                macs[name] = o.numel() * m.weight[0].numel()  # weight[0]: in/groups x kh x kw
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            def linear_hook(m, i, o, name=name):
                macs[name] = o.numel() * m.in_features
            hooks.append(module.register_forward_hook(linear_hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    return macs


@pytest.mark.slow
def test_folder_holds_exactly_the_export_files(exported):
    names = sorted(p.name for p in exported["folder"].iterdir())
    assert names == sorted([
        "config.json", "model.safetensors", "model.sparse.safetensors", "README.md",
        "sparsity_per_layer.png", "recipe.yaml", "metrics.jsonl",
    ])
    assert exported["sparsifier"].frozen  # export froze it


def test_weights_are_the_plain_timm_state_dict_of_effective_weights(exported):
    state = safetensors.torch.load_file(str(exported["folder"] / "model.safetensors"))
    fresh = timm.create_model("resnet10t", num_classes=5, in_chans=1).state_dict()
    assert set(state) == set(fresh)  # no mask / effective / threshold entries
    assert all(state[k].shape == fresh[k].shape for k in fresh)
    for name, q in exported["effective"].items():
        w = state[f"{name}.weight"]
        assert torch.equal(w, q), name
        # pruned positions hold +0.0, never -0.0 (and never the latent weight)
        assert not bool((torch.signbit(w) & (w == 0)).any()), name
    pruned = exported["effective"]["layer4.0.conv2"] == 0
    assert bool((exported["latent"]["layer4.0.conv2"][pruned] != 0).any())  # the latent weights differed there


def test_timm_alone_loads_the_folder_with_identical_outputs(exported):
    model = timm.create_model(f"local-dir:{exported['folder']}", pretrained=True).eval()
    assert type(model.conv1[0]) is nn.Conv2d  # a plain timm model, no st3_hf layer
    with torch.no_grad():
        out = model(exported["x"])
    assert torch.equal(out, exported["reference"])


def test_config_records_data_preprocessing_and_architecture(exported):
    config = json.loads((exported["folder"] / "config.json").read_text())
    assert config["architecture"] == "resnet10t"
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32]
    assert cfg["mean"] == list(MEAN) and cfg["std"] == list(STD)
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"], cfg["num_classes"]) == ("bilinear", 1.0, "center", 5)
    assert cfg["license"] == "mit"
    assert "tag" not in cfg and "hf_hub_id" not in cfg  # timm's ImageNet source info does not describe these weights


def test_timm_transforms_reproduce_the_recorded_preprocessing(exported):
    from PIL import Image

    model = timm.create_model(f"local-dir:{exported['folder']}", pretrained=True)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_cfg["input_size"]) == (1, 32, 32)
    assert tuple(data_cfg["mean"]) == pytest.approx(MEAN) and tuple(data_cfg["std"]) == pytest.approx(STD)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    image = Image.new("L", (48, 40), color=200)
    out = transform(image)
    assert tuple(out.shape) == (1, 32, 32)
    expected = (200 / 255 - MEAN[0]) / STD[0]
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


def test_sparsity_block_holds_measured_values(exported):
    config = json.loads((exported["folder"] / "config.json").read_text())
    block = config["sparsity"]
    state = safetensors.torch.load_file(str(exported["folder"] / "model.safetensors"))
    zeros = total = 0
    assert set(block["per_layer"]) == set(exported["sparsifier"].layers)
    for name, info in block["per_layer"].items():
        w = state[f"{name}.weight"]
        assert info["num_weights"] == w.numel()
        assert info["sparsity"] == pytest.approx(float((w == 0).sum()) / w.numel(), abs=1e-12)
        zeros += int((w == 0).sum())
        total += w.numel()
    assert block["achieved_sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert block["achieved_sparsity"] == pytest.approx(TARGET, abs=2e-3)
    assert (block["method"], block["criterion"], block["target"]) == ("st3", "l1", TARGET)
    assert block["st3_hf_version"] == st3_hf.__version__
    assert block["recipe"] == {"name": "fmnist_resnet10t_st3_85", "description": exported["recipe"].description}
    # MFLOPs at the data input size, recomputed independently: sum of layer MACs x density
    dense_model = timm.create_model(f"local-dir:{exported['folder']}", pretrained=True)
    macs = independent_macs(dense_model, (1, 32, 32))
    modules = dict(dense_model.named_modules())
    dense = sum(macs.values()) / 1e6
    sparse = sum(m * float((modules[n].weight != 0).sum()) / modules[n].weight.numel() for n, m in macs.items()) / 1e6
    assert block["dense_mflops"] == pytest.approx(dense, rel=1e-9)
    assert block["sparse_mflops"] == pytest.approx(sparse, rel=1e-9)
    assert block["sparse_mflops"] < 0.6 * block["dense_mflops"]
    assert block["per_layer"]["fc"]["dense_mflops"] == pytest.approx(512 * 5 / 1e6)
    assert config["metrics"] == {"top1": 0.6125, "top5": 0.975, "eval_examples": None,  # not in that metrics file
                                 "dataset": "fashion_mnist", "split": "validation"}


def test_compact_file_round_trips_the_weights_exactly_and_is_small(exported):
    folder = exported["folder"]
    dense = safetensors.torch.load_file(str(folder / "model.safetensors"))
    compact = load_compact(folder / "model.sparse.safetensors")
    assert set(compact) == set(dense)
    for key, tensor in dense.items():
        assert compact[key].dtype == tensor.dtype
        assert torch.equal(compact[key], tensor), key
    table = json.loads(read_compact_metadata(folder / "model.sparse.safetensors")["st3_hf.tensors"])
    assert all(table[f"{name}.weight"]["layout"] == "bitmask" for name in exported["sparsifier"].layers)
    # 85% zeros in float32: about 15% values + 1/32 bitmask of the dense size
    assert (folder / "model.sparse.safetensors").stat().st_size < 0.25 * (folder / "model.safetensors").stat().st_size


def test_card_metadata_and_text_hold_the_measured_numbers(exported):
    folder = exported["folder"]
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm"
    assert {"sparse", "st3", "image-classification", "timm"} <= set(data.tags)
    assert data.license == "mit"
    assert data.datasets == ["fashion_mnist"]
    assert data.base_model == "timm/resnet10t.c3_in1k"
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == pytest.approx(61.25)
    assert results["top_5_accuracy"].metric_value == pytest.approx(97.5)
    assert results["accuracy"].dataset_name == "fashion_mnist"
    block = json.loads((folder / "config.json").read_text())["sparsity"]
    text = card.text
    measured_row = next(line for line in text.splitlines() if line.startswith("| this model"))
    assert "61.25" in measured_row and "97.50" in measured_row
    assert f"{100 * block['achieved_sparsity']:.2f}" in measured_row
    assert f"{block['sparse_mflops']:.2f}" in measured_row
    # the recipe quotes the paper's ResNet-50 / ImageNet figures, but this is resnet10t on Fashion-MNIST:
    # no paper row (tests/test_canonical_path.py::test_paper_row_only_in_the_papers_setting)
    assert not any(line.startswith("| paper") for line in text.splitlines())
    for name, info in block["per_layer"].items():
        assert f"| `{name}` | {info['num_weights']} | {100 * info['sparsity']:.2f} |" in text
    assert "sparsity_per_layer.png" in text
    assert 'timm.create_model("hf-hub:st3-test/resnet10t-fmnist-st3", pretrained=True)' in text
    assert 'st3_hf.from_pretrained("st3-test/resnet10t-fmnist-st3")' in text
    assert "Vanderschueren" in text and "WACV" in text
    assert "description: resnet10t on 32x32 Fashion-MNIST" in text  # the recipe is in the card


def test_plot_is_a_readable_png(exported):
    import matplotlib.image

    path = exported["folder"] / "sparsity_per_layer.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_recipe_and_metrics_files(exported):
    folder = exported["folder"]
    assert yaml.safe_load((folder / "recipe.yaml").read_text()) == dataclasses.asdict(exported["recipe"])
    assert load_recipe(folder / "recipe.yaml") == exported["recipe"]
    assert (folder / "metrics.jsonl").read_bytes() == exported["metrics_file"].read_bytes()


@pytest.mark.slow
def test_missing_metrics_are_not_evaluated_never_invented(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3_sigma", target=0.9, end_step=1))
    sparsifier.apply(0.9)
    folder = export_pretrained(model, sparsifier, tmp_path / "hub", data_pretrained_cfg=DATA_CFG)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors", "model.sparse.safetensors", "README.md", "sparsity_per_layer.png"]
    )
    card = ModelCard.load(folder / "README.md")
    assert not card.data.eval_results
    row = next(line for line in card.text.splitlines() if line.startswith("| this model"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "not evaluated" and cells[2] == "not evaluated"
    assert "| paper" not in card.text
    assert "No recipe was recorded" in card.text
    config = json.loads((folder / "config.json").read_text())
    assert config["metrics"]["top1"] is None
    assert config["sparsity"]["criterion"] == "l1std"


def test_accuracy_given_in_percent_is_refused_not_guessed(tmp_path):
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.5, end_step=1))
    with pytest.raises(ValueError, match="top1=76.03 is not a fraction"):
        export_pretrained(model, sparsifier, tmp_path / "a", data_pretrained_cfg=DATA_CFG, metrics={"top1": 76.03})
    assert not (tmp_path / "a").exists() and not sparsifier.frozen  # refused before any work


def test_bad_data_config_is_rejected(tmp_path):
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.5, end_step=1))
    with pytest.raises(ValueError, match="channels"):
        export_pretrained(model, sparsifier, tmp_path / "a", data_pretrained_cfg=dict(DATA_CFG, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(ValueError, match="num_classes"):
        export_pretrained(model, sparsifier, tmp_path / "b", data_pretrained_cfg=dict(DATA_CFG, num_classes=10))


@pytest.mark.parametrize(
    "init_from, expected",
    [(None, None), ("org/base-model", "org/base-model"), ("hf-hub:org/base-model", "org/base-model"),
     ("outputs/quickstart/export", None), ("not a repo/x", None)],
)
def test_fine_tuned_card_links_a_hub_base_model_only(init_from, expected, tmp_path):
    from st3_hf.train.run_export import base_model_of
    from st3_hf.train.recipe import save_recipe
    assert base_model_of(Recipe(model=ModelConfig(init_from=init_from))) == expected
    local = tmp_path / "org"
    (local / "base").mkdir(parents=True)
    assert base_model_of(Recipe(model=ModelConfig(init_from=str(local / "base")))) is None  # an unpublished folder
    # a local export whose recipe names the repo it was pushed to: that repo is the base
    published = Recipe()
    published.hub.repo_id = "org/published-base"
    save_recipe(published, local / "base" / "recipe.yaml")
    assert base_model_of(Recipe(model=ModelConfig(init_from=str(local / "base")))) == "org/published-base"


# ------------------------------------------------------------------ errors and crash safety
SMALL_CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "num_classes": 5}


def small_model(seed: int):
    """A tiny timm model pruned to 80 %: different seeds give different exports."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=5, in_chans=3)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.8, end_step=1))
    sparsifier.apply(0.8)
    return model, sparsifier


def export_small(folder, seed: int, **kwargs):
    model, sparsifier = small_model(seed)
    export_pretrained(model, sparsifier, folder, data_pretrained_cfg=SMALL_CFG, **kwargs)
    return model


def digest(folder) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder) -> list:
    """Temporary siblings that writes of ``folder`` left behind."""
    return list(folder.parent.glob(f".{folder.name}.st3-tmp-*"))


def loads_as(folder, model) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    loaded, _ = st3_hf.from_pretrained(folder)
    with torch.no_grad():
        return torch.equal(loaded.eval()(x), model.eval()(x))


def test_export_errors_are_one_line_st3_errors(tmp_path):
    from st3_hf.errors import ModelError, St3Error

    model, sparsifier = small_model(0)
    cases = [
        (dict(metrics={"top1": 76.03}), ModelError, "top1=76.03 is not a fraction"),
        (dict(metrics_file=tmp_path / "missing.jsonl"), ModelError, "missing.jsonl not found"),
        (dict(data_pretrained_cfg=dict(SMALL_CFG, num_classes=7)), ModelError, "num_classes 7"),
        (dict(data_pretrained_cfg={"input_size": (3, 32, 32)}), ModelError, "misses ['mean', 'std']"),
    ]
    for kwargs, error_class, needle in cases:
        kwargs.setdefault("data_pretrained_cfg", SMALL_CFG)
        with pytest.raises(error_class) as info:
            export_pretrained(model, sparsifier, tmp_path / "out", **kwargs)
        assert isinstance(info.value, St3Error) and needle in str(info.value)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path / "out")
    assert isinstance(ModelError("x"), ValueError)


def test_failure_mid_write_keeps_the_previous_export_whole(tmp_path):
    folder = tmp_path / "hub"
    first = export_small(folder, seed=0)
    before = digest(folder)
    model, sparsifier = small_model(1)
    # bytes are not JSON: config.json fails after model.safetensors was written (in staging)
    with pytest.raises(TypeError, match="bytes"):
        export_pretrained(model, sparsifier, folder, data_pretrained_cfg=SMALL_CFG, dataset_name=b"fashion_mnist")
    assert digest(folder) == before
    assert loads_as(folder, first)
    assert leftovers(folder) == []


def test_disk_error_at_the_last_file_is_a_run_error_and_keeps_the_previous_export(tmp_path, monkeypatch):
    import errno

    from huggingface_hub import ModelCard as Card

    from st3_hf.errors import RunError

    folder = tmp_path / "hub"
    first = export_small(folder, seed=0)
    before = digest(folder)

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Card, "save", full_disk)
    with pytest.raises(RunError) as info:
        export_small(folder, seed=1)
    assert info.value.exit_code == 1 and isinstance(info.value.__cause__, OSError)
    assert "\n" not in str(info.value) and str(folder) in str(info.value) and "No space left" in str(info.value)
    assert digest(folder) == before
    assert loads_as(folder, first)
    assert leftovers(folder) == []


def test_reexport_replaces_the_whole_export(tmp_path):
    folder = tmp_path / "hub"
    model, sparsifier = small_model(0)
    export_run(model, sparsifier, folder, Recipe(), data_pretrained_cfg=SMALL_CFG)
    assert (folder / "recipe.yaml").is_file()
    second = export_small(folder, seed=1)  # no recipe this time: no stale recipe.yaml of the first model
    assert not (folder / "recipe.yaml").exists()
    assert loads_as(folder, second)
    assert leftovers(folder) == []


def make_run_folder(folder):
    """A training run folder: the export goes next to files that are not the export's."""
    (folder / "checkpoints" / "step_00000004").mkdir(parents=True)
    (folder / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"checkpoint bytes")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out").write_text("tensorboard")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval_top1": 0.5, "eval_top5": 0.9}) + "\n")


@pytest.mark.slow
def test_export_into_a_run_folder_is_in_place_and_crash_safe(tmp_path):
    folder = tmp_path / "run"
    make_run_folder(folder)
    metrics_inode = (folder / "metrics.jsonl").stat().st_ino
    first = export_small(folder, seed=0, metrics_file=folder / "metrics.jsonl")
    assert (folder / "metrics.jsonl").stat().st_ino == metrics_inode  # the trainer's own file, left in place
    assert (folder / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes() == b"checkpoint bytes"
    assert json.loads((folder / "config.json").read_text())["metrics"]["top1"] == 0.5
    assert loads_as(folder, first) and leftovers(folder) == []

    before = digest(folder)
    model, sparsifier = small_model(1)
    with pytest.raises(TypeError):
        export_pretrained(model, sparsifier, folder, data_pretrained_cfg=SMALL_CFG, dataset_name=b"x")
    assert digest(folder) == before and leftovers(folder) == []

    second = export_small(folder, seed=1)
    assert loads_as(folder, second) and leftovers(folder) == []
    assert (folder / "logs" / "events.out").read_text() == "tensorboard"


@pytest.mark.slow
def test_a_killed_exports_temporary_folder_is_ignored_then_removed(tmp_path):
    folder = tmp_path / "hub"
    first = export_small(folder, seed=0)
    stale = folder.parent / f".{folder.name}.st3-tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")  # what a SIGKILL mid-write leaves
    assert loads_as(folder, first)  # readers never look at temporary folders
    second = export_small(folder, seed=1)  # the next export cleans up
    assert not stale.exists() and leftovers(folder) == []
    assert loads_as(folder, second)


@pytest.mark.slow
@pytest.mark.parametrize("run_folder", [False, True], ids=["export-folder", "run-folder"])
def test_cut_while_files_are_replaced_leaves_no_folder_readable_as_a_model(tmp_path, monkeypatch, run_folder):
    import os

    from st3_hf import atomic
    from st3_hf.errors import ModelError, RunError

    folder = tmp_path / "run"
    if run_folder:
        make_run_folder(folder)
    export_small(folder, seed=0)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the process dies after the first file of the new export is in place
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(RunError) as info:
        export_small(folder, seed=1)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not (folder / "config.json").exists()  # removed before the first file moved: no mix of two exports reads
    with pytest.raises(ModelError, match="incomplete st3_hf export"):
        st3_hf.from_pretrained(folder)
    with pytest.raises(FileNotFoundError):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    third = export_small(folder, seed=2)  # the next export makes it whole again
    assert loads_as(folder, third) and leftovers(folder) == []
    if run_folder:
        assert (folder / "logs" / "events.out").read_text() == "tensorboard"


def test_failed_commit_rename_leaves_the_previous_state(tmp_path, monkeypatch):
    import os

    from st3_hf import atomic
    from st3_hf.errors import RunError

    folder = tmp_path / "hub"
    real_rename = os.rename

    def rename(src, dst):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(RunError) as info:
        export_small(folder, seed=1)
    assert "\n" not in str(info.value) and "Device or resource busy" in str(info.value)
    assert not folder.exists() and leftovers(folder) == []
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    second = export_small(folder, seed=2)
    assert loads_as(folder, second) and leftovers(folder) == []


@pytest.mark.parametrize("into_existing", [False, True])
def test_export_files_and_folder_follow_the_umask(tmp_path, into_existing):
    import os
    import stat

    folder = tmp_path / "hub"
    if into_existing:  # a run folder: the files are moved into it one by one
        folder.mkdir()
    previous = os.umask(0o022)
    try:
        export_small(folder, seed=0)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert {"model.safetensors", "model.sparse.safetensors", "config.json", "README.md"} <= set(modes)
    assert modes == {name: 0o644 for name in modes}  # safetensors wrote 0600, mkdtemp 0700: unreadable to teammates
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
