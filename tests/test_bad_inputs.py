"""Values and files that used to be accepted or crash with a traceback: each is one `error:` line naming the
recipe key (the CLI entry point called in-process), or is skipped by the documented policy."""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest

from data_utils import make_image_folder
from st3_hf.train.checkpointing import TRAINER_STATE, CheckpointManager
from st3_hf.train.recipe import load_recipe
from train_utils import error_line, records, train_in_process

QUICKSTART = "recipes/quickstart.yaml"
RGB_FOLDER = ["model.in_chans=3", "model.num_classes=3", "data.input_size=[3,32,32]", "data.mean=[0.5,0.5,0.5]",
              "data.std=[0.25,0.25,0.25]", "data.random_crop_padding=0", "data.crop_pct=0.875", "data.batch_size=4",
              "data.num_workers=0", "training.epochs=1", "logging.trackers=[]", "logging.progress_bar=false",
              "data.train_subset=null", "data.eval_subset=null", "data.eval_split=val"]


def error_of(argv) -> str:
    return error_line(train_in_process(*argv), exit_code=2)


@pytest.mark.parametrize("override, expected", [
    ("lr_schedule.min_lr=-5", "'lr_schedule.min_lr' must be >= 0, got -5"),
    ("training.keep_checkpoints=0", "'training.keep_checkpoints' must be >= 1, got 0"),
    ("data.input_size=[1,0,28]", "'data.input_size' values must be > 0, got [1, 0, 28]"),
    ("data.interpolation=foo", "'data.interpolation' is 'foo'; valid values: bilinear, bicubic, nearest"),
    ("training.seed=-1", "'training.seed' must be in [0, 2**32)"),
    ("model.drop_rate=1.5", "'model.drop_rate' must be in [0, 1), got 1.5"),
    ("data.crop_pct=0", "'data.crop_pct' must be in (0, 1], got 0"),
    ("data.scale=[1.0,0.0]", "'data.scale' must be [min, max] with 0 < min <= max <= 1"),
    ("model.kwargs={checkpoint_path: /etc/passwd}", "'model.kwargs' must not set checkpoint_path"),
])
def test_out_of_range_values_are_one_line_naming_the_key(tmp_path, override, expected):
    line = error_of([QUICKSTART, override, f"output_dir={tmp_path}/o"])
    assert expected in line, line
    assert not (tmp_path / "o").exists()


def test_tilde_in_output_dir_and_data_root_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(QUICKSTART, ["output_dir=~/run", "data.root=~/data"])
    assert (recipe.output_dir, recipe.data.root) == (str(tmp_path / "run"), str(tmp_path / "data"))


@pytest.mark.parametrize("state, problem", [
    ([1, 2], "is not a JSON object"),
    ({"global_step": 3, "epoch": 0, "injected": True}, "has keys ['injected']"),
    ({"epoch": 1}, "without global_step"),
])
def test_latest_skips_a_checkpoint_whose_trainer_state_is_not_the_trainers(tmp_path, state, problem):
    manager = CheckpointManager(tmp_path)
    good, bad = tmp_path / "step_00000002", tmp_path / "step_00000004"
    for folder, content in ((good, {"global_step": 2, "epoch": 0}), (bad, state)):
        folder.mkdir()
        (folder / TRAINER_STATE).write_text(json.dumps(content))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert manager.latest_valid() == good
    assert any(problem in str(w.message) and str(bad) in str(w.message) for w in caught), [str(w.message) for w in caught]


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A small PNG whose header declares ``width`` x ``height`` (what a decompression bomb looks like to Pillow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.slow
def test_decompression_bomb_is_skipped_and_counted_like_any_unreadable_image(tmp_path):
    images = make_image_folder(tmp_path / "imgs", per_class={"train": 4, "val": 2}, size=32)
    bomb = images / "train" / "circle" / "huge.png"
    write_png_header_only(bomb, 30000, 30000)
    out = tmp_path / "run"
    proc = train_in_process(QUICKSTART, *RGB_FOLDER, "data.source=imagefolder", f"data.root={images}",
                "training.log_every_steps=1", f"output_dir={out}", check=True)
    assert f"warning: skipping unreadable image {bomb} (DecompressionBombError" in proc.stderr
    assert sum(r.get("train_skipped_images", 0) for r in records(out) if r["kind"] == "train") == 1


@pytest.mark.parametrize("link, target", [("train/zloop", ".."), ("train/circle/again", "../circle"),
                                          ("train/square2", "../val/square")])
def test_folder_links_that_loop_or_reach_another_split_are_refused(tmp_path, link, target):
    images = make_image_folder(tmp_path / "imgs", per_class={"train": 2, "val": 2}, size=32)
    (images / link).symlink_to(target)
    line = error_of([QUICKSTART, *RGB_FOLDER, "data.source=imagefolder", f"data.root={images}",
                             f"output_dir={tmp_path}/o"])
    assert f"{images / link} is a link to" in line and "remove the link" in line, line
    assert not (tmp_path / "o").exists()


def test_hf_labels_out_of_range_are_one_line_naming_the_label_column(tmp_path):
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    image = Image.new("RGB", (32, 32))
    parts = {"train": datasets.Dataset.from_dict({"image": [image] * 6, "label": [0, 1, 2, 3, 4, 5]}, features=features),
             "validation": datasets.Dataset.from_dict({"image": [image] * 2, "label": [1, 7]}, features=features)}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    args = [QUICKSTART, *RGB_FOLDER, "data.source=hf", f"data.root={tmp_path / 'hf'}", "data.eval_split=validation",
            f"output_dir={tmp_path}/o"]
    line = error_of([*args, "model.num_classes=6"])
    assert "split 'validation' holds labels 1..7, but model.num_classes is 6" in line and "data.label_column" in line
    line = error_of([*args, "model.num_classes=5"])
    assert "split 'train' holds labels 0..5, but model.num_classes is 5" in line
    assert not (tmp_path / "o").exists()


def test_a_kill_while_a_checkpoint_is_replaced_or_rotated_never_leaves_a_half_deleted_step_folder(tmp_path, monkeypatch):
    """The same step saved twice (step and epoch cadence): a kill while the first copy is deleted used to
    leave `step_N` with its state file but without its weights, which `latest` then picked."""
    import shutil as real_shutil

    from st3_hf.train import checkpointing
    from st3_hf.train.checkpointing import checkpoint_problem

    manager = CheckpointManager(tmp_path, keep=1)

    def write(folder: Path) -> None:
        import torch
        from safetensors.torch import save_file
        save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))

    def killed_while_deleting(path, *args, **kwargs):  # the process dies after the first file is gone
        sorted(Path(path).iterdir())[0].unlink()
        raise KeyboardInterrupt

    manager.save(16, write, {"global_step": 16}, True, lambda: None)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_while_deleting)
    for step in (16, 17):  # replaced, then rotated away
        with pytest.raises(KeyboardInterrupt):
            manager.save(step, write, {"global_step": step}, True, lambda: None)
        monkeypatch.setattr(checkpointing.shutil, "rmtree", real_shutil.rmtree if step == 17 else killed_while_deleting)
    for checkpoint in manager.checkpoints():
        assert checkpoint_problem(checkpoint) is None and (checkpoint / "model.safetensors").is_file(), checkpoint
    assert manager.latest_valid() == tmp_path / "step_00000017"
