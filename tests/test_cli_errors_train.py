"""Bad input to scripts/train.py: one ``error:`` line naming the problem and the fix, a non-zero exit,
no traceback, and no expensive work done (no checkpoint, no metrics, often no output folder at all).
The entry point is called in-process (tests/train_utils.py::train_in_process)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from data_utils import fashion_mnist_available, make_hf_saved_dataset, make_image_folder
from train_utils import SMALL, error_line, train_in_process

QUICKSTART = "recipes/quickstart.yaml"


def train(*args: str) -> subprocess.CompletedProcess:
    return train_in_process(*args)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    return error_line(proc, exit_code=2)


def assert_nothing_trained(out: Path) -> None:
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- the recipe

@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.max_stepz=20", ["unknown key 'training.max_stepz'", "did you mean 'training.max_steps'", "valid keys"]),
        ("training.epochs=ten", ["'training.epochs' must be int", "valid keys of section 'training'"]),
        ("sparsity.target=1.0", ["'sparsity.target' must be in [0, 1)"]),
        ("sparsity.target=-0.1", ["'sparsity.target' must be in [0, 1)"]),
        ("sparsity.end_epoch=0.1", ["'sparsity.start_epoch' must be <= sparsity.end_epoch"]),
        ("optimizer.lr=-0.1", ["'optimizer.lr' must be > 0"]),
        ("optimizer.lr=.nan", ["'optimizer.lr'", "finite"]),
        ("training.max_consecutive_nonfinite_steps=0", ["'training.max_consecutive_nonfinite_steps'"]),
        ("training.collective_timeout_s=0", ["'training.collective_timeout_s'"]),
    ],
)
def test_bad_recipe_values(tmp_path, override, expected):
    line = one_error_line(train(QUICKSTART, override, f"output_dir={tmp_path}/o"))
    assert QUICKSTART in line
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "o").exists()


def test_missing_recipe_file(tmp_path):
    line = one_error_line(train(str(tmp_path / "nope.yaml")))
    assert "nope.yaml" in line and "not found" in line


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  name: resnet10t\ndata:\n  batch_size: [32\n  num_workers: 0\n")
    line = one_error_line(train(str(recipe)))
    assert f"{recipe}:" in line and "invalid YAML" in line
    assert any(f":{n}:" in line for n in (4, 5, 6)), line  # the line of the unclosed bracket / where it is noticed


# ----------------------------------------------------------------------------- the model

def test_unknown_model_name_fails_before_anything_is_created(tmp_path):
    line = one_error_line(train(QUICKSTART, "model.name=resnet5O", f"output_dir={tmp_path}/o"))
    assert "'resnet5O' is not a timm model" in line and "'resnet50'" in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the data

IMAGE_RECIPE = [QUICKSTART, "model.in_chans=3", "model.num_classes=3", "data.input_size=[3,32,32]",
                "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.random_crop_padding=0",
                "data.batch_size=4", "data.num_workers=0", "logging.trackers=[]", "logging.progress_bar=false",
                "data.train_subset=null", "data.eval_split=val"]


def test_dataset_path_missing(tmp_path):
    out = tmp_path / "o"
    line = one_error_line(train(*IMAGE_RECIPE, "data.source=imagefolder", f"data.root={tmp_path}/nowhere", f"output_dir={out}"))
    assert "nowhere" in line and "is not a folder" in line and "train/<class>/<image>" in line
    assert_nothing_trained(out)


def test_dataset_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    line = one_error_line(train(*IMAGE_RECIPE, "data.source=imagefolder", f"data.root={tmp_path}/empty", f"output_dir={out}"))
    assert "no split folder train" in line and "available: none" in line
    assert_nothing_trained(out)


def test_dataset_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "image.png").write_bytes(b"")
    out = tmp_path / "o"
    line = one_error_line(train(*IMAGE_RECIPE, "data.source=imagefolder", f"data.root={root}", f"output_dir={out}"))
    assert "has no class subfolders" in line
    assert_nothing_trained(out)


def test_class_folders_without_images(tmp_path):
    root = tmp_path / "no_images"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    out = tmp_path / "o"
    line = one_error_line(train(*IMAGE_RECIPE, "model.num_classes=2", "data.source=imagefolder", f"data.root={root}",
                                f"output_dir={out}"))
    assert "no images found under" in line
    assert_nothing_trained(out)


def test_label_column_missing(tmp_path):
    images = make_image_folder(tmp_path / "imgs", per_class={"train": 4, "val": 2}, size=40)
    hf = make_hf_saved_dataset(tmp_path / "hf", images)
    out = tmp_path / "o"
    line = one_error_line(train(*IMAGE_RECIPE, "data.source=hf", f"data.root={hf}", "data.eval_split=validation",
                                "data.label_column=category", f"output_dir={out}"))
    assert "'category'" in line and "available columns" in line
    assert_nothing_trained(out)


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian dataset-fashion-mnist package")
def test_fashion_mnist_folder_without_the_files(tmp_path):
    out = tmp_path / "o"
    line = one_error_line(train(QUICKSTART, *SMALL, f"data.root={tmp_path}", f"output_dir={out}"))
    assert "train-images-idx3-ubyte" in line and "not found" in line
    assert_nothing_trained(out)


# ----------------------------------------------------------------------------- the Hub

@pytest.mark.parametrize("repo_id", ["not a repo id", "too/many/parts", ""])
def test_push_to_an_invalid_repo_id_fails_before_training(tmp_path, repo_id):
    out = tmp_path / "o"
    line = one_error_line(train(QUICKSTART, *SMALL, "hub.push=true", f"hub.repo_id={repo_id}", f"output_dir={out}"))
    assert "repo" in line.lower()
    assert not out.exists()
