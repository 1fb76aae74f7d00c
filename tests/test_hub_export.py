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
from st3_hf.recipe import load_recipe
from st3_hf.recipe_schema import DataConfig, ExpectedResults, HubConfig, ModelConfig, Recipe
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
    latent = {name: layer.weight.detach().clone() for name, layer in sparsifier.layers.items()}
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
    folder = export_pretrained(
        model, sparsifier, root / "hub", recipe=recipe, data_pretrained_cfg=DATA_CFG, metrics_file=metrics_file,
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
    assert config["metrics"] == {"top1": 0.6125, "top5": 0.975, "dataset": "fashion_mnist", "split": "validation"}


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
    paper_row = next(line for line in text.splitlines() if line.startswith("| paper"))
    assert "76.95" in paper_row and "80.00" in paper_row and "1215" in paper_row
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
    from st3_hf.hub.export import _hub_base_model

    assert _hub_base_model(Recipe(model=ModelConfig(init_from=init_from))) == expected
    local = tmp_path / "org"
    (local / "base").mkdir(parents=True)
    assert _hub_base_model(Recipe(model=ModelConfig(init_from=str(local / "base")))) is None  # a local folder
