"""Sparsifying a dense pretrained timm model (``model.pretrained``): from timm's Hub format, served from a
folder or from an offline Hugging Face cache, through the real CLI to an export plain timm loads."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from st3_hf import sparsify
from st3_hf.train.data import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays
from st3_hf.errors import ConfigError, ModelError, St3Error
from st3_hf.hub.dense_start import describe_spec, locate_dense_start
from st3_hf.train.modeling import create_pretrained_model, sparsity_config_for_start, with_start_preprocessing
from st3_hf.train.recipe_schema import sparsity_config
from st3_hf.train.recipe import load_recipe
from data_utils import FASHION_MNIST_DIR, fashion_mnist_available, make_image_folder
from train_utils import REPO, SMALL, TRAIN, env, error_line, records

REPO_ID = "st3-test/resnet10t-fmnist-dense"
START_RECIPE = "recipes/quickstart_from_pretrained.yaml"
# the start's preprocessing differs from the recipe schema's defaults, so the test sees where it came from
START_DATA = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "interpolation": "bicubic",
              "crop_pct": 1.0, "crop_mode": "center"}


def prunable_weights(model: nn.Module) -> dict:
    return {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def zero_fraction(weights) -> float:
    weights = list(weights)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def save_dense_timm_model(folder: Path, name: str, num_classes: int, in_chans: int, data_config: dict,
                          label_names=None, seed: int = 0) -> nn.Module:
    """A dense timm model with non-trivial BatchNorm statistics, saved by timm itself in its Hub format."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, in_chans, *data_config["input_size"][1:]) * 0.5 + 0.2)
    model.eval()
    extra = {"label_names": list(label_names)} if label_names else None
    timm.models.save_for_hf(model, str(folder), model_config=extra, safe_serialization=True, data_config=data_config)
    return model


@pytest.fixture(scope="module")
def dense_start(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "resnet10t_dense"
    model = save_dense_timm_model(folder, "resnet10t", 10, 1, START_DATA, label_names=FASHION_MNIST_CLASSES)
    return {"folder": folder, "model": model}


def populate_offline_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """The Hub cache layout huggingface_hub reads: blobs named by content hash, snapshot symlinks, refs/main."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        data = (folder / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    info = scan_cache_dir(cache)  # huggingface_hub's own reading of the cache agrees with the layout
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == repo_id and {f.file_name for f in next(iter(repo.revisions)).files} == {"config.json", "model.safetensors"}
    return snapshot


def offline_env(cache: Path) -> dict:
    e = env()
    e.update({"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    return e


def train(args, e=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, TRAIN, *args], env=e or env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def mean_cross_entropy_and_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    with torch.no_grad():
        logits = model.eval()(images)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


# ------------------------------------------------------------------------------- end to end, Hub cache

@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Fashion-MNIST package")
def test_offline_hub_start_prunes_to_target_and_exports(dense_start, tmp_path):
    cache = tmp_path / "hf_home" / "hub"
    populate_offline_cache(cache, REPO_ID, dense_start["folder"])
    out = tmp_path / "run"
    train([START_RECIPE, *SMALL, f"model.pretrained={REPO_ID}", f"output_dir={out}"], offline_env(cache))
    recs = records(out)

    # step 0: the dense start, evaluated before any update, scores what plain timm scores with the
    # start's own preprocessing (timm's transform from its pretrained_cfg, on the same 128 test images)
    start = recs[0]
    assert (start["kind"], start["step"], start["sparsity"], start["frozen"]) == ("start", 0, 0.0, False)
    assert start["base_model"] == REPO_ID
    plain = timm.create_model(f"local-dir:{dense_start['folder']}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=plain))
    test_images, test_labels = load_fashion_mnist_arrays(FASHION_MNIST_DIR, "test")
    images = torch.stack([transform(Image.fromarray(np.asarray(a), mode="L")) for a in test_images[:128]])
    labels = torch.as_tensor(np.asarray(test_labels[:128]), dtype=torch.long)
    loss, top1 = mean_cross_entropy_and_top1(plain, images, labels)
    assert start["eval_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert start["eval_top1"] == pytest.approx(top1, abs=1e-9)

    # the schedule moved the masks from 0 to the target while training; frozen only at the end
    trains = [r for r in recs if r["kind"] == "train"]
    assert trains[0]["target_ratio"] < 0.9 and trains[-1]["target_ratio"] == pytest.approx(0.9)
    assert not any(r["frozen"] for r in recs if r["kind"] == "eval")
    final = recs[-1]
    assert final["kind"] == "final" and final["frozen"] is True
    assert final["sparsity"] == pytest.approx(0.9, abs=2e-3)

    # the export: plain timm loads it; 90 % of every Conv2d/Linear weight (head included: kept, pruned) is zero
    exported = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert zero_fraction(prunable_weights(exported).values()) == pytest.approx(0.9, abs=2e-3)
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity"]["achieved_sparsity"] == pytest.approx(0.9, abs=2e-3)
    cfg = config["pretrained_cfg"]
    # preprocessing and class names came from the start (the recipe sets none)
    assert (cfg["interpolation"], cfg["mean"], cfg["input_size"]) == ("bicubic", [0.286], [1, 28, 28])
    assert list(cfg["label_names"]) == list(FASHION_MNIST_CLASSES)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == REPO_ID
    assert f"Sparsified from the dense pretrained checkpoint [`{REPO_ID}`]" in card.text


# ------------------------------------------------------------------------------- sparse transfer, folder

@pytest.mark.slow
def test_sparse_transfer_on_an_image_folder_with_a_new_dense_head(tmp_path):
    # the shipped transfer recipe, pointed at a local timm folder (the documented override)
    start_folder = tmp_path / "r50_dense"
    start_data = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                  "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}
    dense = save_dense_timm_model(start_folder, "resnet50", 7, 3, start_data, label_names=[f"c{i}" for i in range(7)])
    images = make_image_folder(tmp_path / "imgs", per_class={"train": 8, "val": 4}, size=40)
    out = tmp_path / "transfer"
    train(["recipes/transfer_r50_st3_90_imagefolder.yaml", f"model.pretrained=local-dir:{start_folder}",
           "model.num_classes=3", f"data.root={images}", "data.eval_split=val", "data.batch_size=8",
           "data.num_workers=0", "training.epochs=2", "training.mixed_precision=no", "sparsity.start_epoch=0",
           "sparsity.end_epoch=1", "lr_schedule.warmup_epochs=0", "logging.trackers=[]", "logging.progress_bar=false",
           f"output_dir={out}"])
    recs = records(out)
    assert recs[0]["kind"] == "start" and "fc" not in recs[0]["layer_sparsity"]  # the new head stays dense
    exported = timm.create_model(f"local-dir:{out}", pretrained=True)
    weights = prunable_weights(exported)
    assert exported.num_classes == 3 and int((weights.pop("fc") == 0).sum()) == 0
    assert zero_fraction(weights.values()) == pytest.approx(0.9, abs=2e-3)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]  # the start's, for data and export
    assert "label_names" not in config["pretrained_cfg"]  # a new head: the start's classes do not apply
    readme = (out / "README.md").read_text()
    assert f"Sparsified from the dense pretrained checkpoint `{start_folder}`" in readme
    # the backbone started from the dense weights: every kept weight of the first conv moved from there,
    # not from a random initialisation (a fresh model would share no sign pattern with the start)
    start_conv = dense.conv1.weight.detach()
    kept = weights["conv1"] != 0
    agree = (torch.sign(weights["conv1"][kept]) == torch.sign(start_conv[kept])).float().mean()
    assert agree > 0.95


# ------------------------------------------------------------------------------- in process

def test_first_forward_equals_the_dense_model(dense_start):
    recipe = load_recipe(START_RECIPE, [f"model.pretrained={dense_start['folder']}"])
    start = locate_dense_start(recipe.model.pretrained, recipe.model.name)
    model = create_pretrained_model(recipe.model, start)
    sp = sparsify(model, sparsity_config_for_start(sparsity_config(recipe.sparsity, 100), model, recipe.model, start))
    sp.refresh()  # ratio 0: threshold 0, the soft threshold and the rescale (r = 1) change nothing
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = dense_start["model"].eval()(x)
        got = model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert sp.sparsity() == 0.0 and not sp.frozen and "fc" in sp.layers  # the kept head is pruned with the rest


def test_preprocessing_comes_from_the_start_unless_the_recipe_sets_it(dense_start):
    spec = f"model.pretrained={dense_start['folder']}"
    start = locate_dense_start(str(dense_start["folder"]), "resnet10t")
    resolved = with_start_preprocessing(load_recipe(START_RECIPE, [spec]), start)
    assert (resolved.data.interpolation, resolved.data.mean, resolved.data.input_size) == ("bicubic", [0.286], [1, 28, 28])
    overridden = with_start_preprocessing(load_recipe(START_RECIPE, [spec, "data.interpolation=bilinear"]), start)
    assert overridden.data.interpolation == "bilinear" and overridden.data.mean == [0.286]


def test_timm_name_resolves_to_timm_hub_weights(tmp_path, monkeypatch):
    assert describe_spec(True, "resnet50.a1_in1k") == "timm/resnet50.a1_in1k"
    assert describe_spec("hf-hub:ORG/NAME", "resnet50") == "ORG/NAME"
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="timm/resnet10t.c3_in1k.*HF_HUB_OFFLINE"):
        locate_dense_start(True, "resnet10t.c3_in1k", cache_dir=tmp_path / "empty_cache")


def _copy_start(dense_start, tmp_path) -> Path:
    folder = tmp_path / "start"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((dense_start["folder"] / name).read_bytes())
    return folder


def test_pickled_weights_only_are_refused_unopened(dense_start, tmp_path):
    from test_security import write_payload  # a live pickle: unpickling it creates the marker

    folder = _copy_start(dense_start, tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_payload(folder / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match=r"model.safetensors not found.*pytorch_model.bin.*never loads") as info:
        locate_dense_start(f"local-dir:{folder}", "resnet10t")
    assert "\n" not in str(info.value) and not marker.exists()


@pytest.mark.parametrize("edit, error, needle", [
    ({"auto_map": {"AutoModel": "modeling.Net"}}, ModelError, "remote code"),
    ({"model_args": {"checkpoint_path": "/etc/passwd"}}, ModelError, "checkpoint_path"),
    ({"architecture": "not_a_timm_model"}, ModelError, "not a model of timm"),
    ({"architecture": "resnet18"}, ConfigError, "set model.name: resnet18"),
])
def test_unsafe_or_foreign_configs_are_refused(dense_start, tmp_path, edit, error, needle):
    folder = _copy_start(dense_start, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(START_RECIPE, [f"model.pretrained={folder}"])
    with pytest.raises(error, match=needle) as info:
        start = locate_dense_start(recipe.model.pretrained, recipe.model.name)
        create_pretrained_model(recipe.model, start)
    assert isinstance(info.value, St3Error) and "\n" not in str(info.value)


@pytest.mark.slow
def test_cli_refuses_remote_code_in_one_line_before_training(dense_start, tmp_path):
    folder = _copy_start(dense_start, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling.Net"}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    proc = train([START_RECIPE, *SMALL, f"model.pretrained={folder}", f"output_dir={out}"], check=False)
    assert "remote code" in error_line(proc, 2)
    assert not (out / "checkpoints").exists()


def test_pretrained_and_init_from_together_are_an_error():
    with pytest.raises(ConfigError, match="choose one"):
        load_recipe(START_RECIPE, ["model.init_from=outputs/quickstart"])


@pytest.mark.parametrize("head", ["dense", "pruned"])
def test_a_new_head_is_kept_out_of_the_pruning_only_when_dense(dense_start, head):
    recipe = load_recipe(START_RECIPE, [f"model.pretrained={dense_start['folder']}", "model.num_classes=4",
                                        f"model.head={head}"])
    start = locate_dense_start(recipe.model.pretrained, recipe.model.name)
    model = create_pretrained_model(recipe.model, start)
    sp = sparsify(model, sparsity_config_for_start(sparsity_config(recipe.sparsity, 100), model, recipe.model, start))
    assert model.num_classes == 4 and "label_names" not in model.pretrained_cfg
    assert ("fc" in sp.layers) == (head == "pruned")
    # everything but the head is the start's
    start_state = dense_start["model"].state_dict()
    for key, value in model.state_dict().items():
        if key in start_state and not key.startswith("fc."):
            assert torch.equal(value, start_state[key]), key
