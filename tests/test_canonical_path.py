"""The path from a real (dirty) ImageNet-style folder to the Hub, as users take it (issue 10):
hidden entries, class-count mismatches, unreadable images (folder and `datasets` sources), label
names in the export, a truthful card, safe resume, flags anywhere, non-TTY progress, and the
errors that name the recipe key to fix."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_utils import make_image_folder, shape_image
from train_utils import REPO, error_line, evaluate_in_process, records, train_in_process
from st3_hf.train.recipe import load_recipe, save_recipe
from st3_hf.train.recipe_schema import DataConfig
EVALUATE = str(REPO / "scripts" / "evaluate_model.py")
QUICKSTART = "recipes/quickstart.yaml"
CLASSES = ("circle", "square", "triangle")
# quickstart on a 3-class RGB image folder, 32x32: one epoch of batches of 4
FOLDER_RUN = [
    "model.in_chans=3", "model.num_classes=3", "data.input_size=[3,32,32]", "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.25,0.25,0.25]", "data.random_crop_padding=0", "data.crop_pct=0.875", "data.source=imagefolder",
    "data.eval_split=val", "data.batch_size=4", "data.num_workers=0", "training.epochs=1", "training.log_every_steps=2",
    "logging.trackers=[]", "logging.progress_bar=true", "sparsity.start_epoch=0", "sparsity.end_epoch=0.5",
]


def dirty_folder(root: Path) -> dict:
    """An ImageNet-layout folder as users have them: hidden folders and files, odd image modes, broken files."""
    make_image_folder(root, CLASSES, per_class={"train": 3, "val": 2}, size=40)
    for split in ("train", "val"):
        for hidden in (".ipynb_checkpoints", ".cache"):
            (root / split / hidden).mkdir()
            shape_image("circle", 0).save(root / split / hidden / "copy.JPEG")  # an image in a hidden folder
        (root / split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / split / "circle" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    train = root / "train"
    shape_image("circle", 11).save(train / "circle" / "extra.JPEG")
    shape_image("square", 7).convert("CMYK").save(train / "square" / "cmyk.JPEG")
    shape_image("square", 8).convert("L").save(train / "square" / "gray.JPEG")
    shape_image("triangle", 9).convert("RGBA").save(train / "triangle" / "rgba.png")
    shape_image("triangle", 10).save(train / "triangle" / "png_named.JPEG", format="PNG")
    good = (train / "circle" / "circle_0.JPEG").read_bytes()
    (train / "circle" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (train / "square" / "not_an_image.JPEG").write_text("<html>404</html>")
    (root / "val" / "triangle" / "empty.JPEG").write_bytes(b"")
    # train: 10 good + 4 odd-mode + 2 broken = 16 (4 full batches: every file is met); val: 6 good + 1 empty
    return {"train_bad": {"truncated.JPEG", "not_an_image.JPEG"}, "val_bad": {"empty.JPEG"}, "train": 16, "val": 7}


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty") / "imagenet"
    layout = dirty_folder(root)
    out = root.parent / "run"
    proc = train_in_process(QUICKSTART, *FOLDER_RUN, f"data.root={root}", f"output_dir={out}", check=True)
    return root, out, proc, layout


@pytest.mark.slow
def test_dirty_folder_trains_skips_and_counts(dirty_run):
    root, out, proc, layout = dirty_run
    recs = records(out)
    # hidden folders are said once per split folder, never classes
    assert proc.stderr.count("hidden folders") == 2, proc.stderr
    # each broken file is named with its reason, once
    for name in layout["train_bad"] | layout["val_bad"]:
        lines = [line for line in proc.stderr.splitlines() if "unreadable image" in line and name in line]
        assert len(lines) == 1, (name, proc.stderr)
    skipped_train = sum(r.get("train_skipped_images", 0) for r in recs if r["kind"] == "train")
    assert skipped_train == len(layout["train_bad"])
    final = [r for r in recs if r["kind"] == "final"][-1]
    # top-1 over the images really evaluated: the empty file is left out, no other image counted twice
    assert final["eval_skipped_images"] == len(layout["val_bad"])
    assert final["eval_examples"] == layout["val"] - len(layout["val_bad"])
    # the export names the classes the way timm reads them back
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == sorted(CLASSES)


def test_dirty_folder_run_logs_lines_not_carriage_returns(dirty_run):
    _, _, proc, layout = dirty_run
    steps = layout["train"] // 4
    progress = [line for line in proc.stderr.splitlines() if line.startswith("train: step ")]
    assert [line.split()[2] for line in progress] == [f"{s}/{steps}" for s in range(2, steps + 1, 2)]
    assert "\r" not in proc.stderr


def test_card_describes_the_run_that_happened(dirty_run):
    root, out, _, _ = dirty_run
    card = (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and "`resnet10t`" in card
    assert f"the image folder `{root}`" in card and "3 classes, 3x32x32 input" in card
    # quickstart's description names Fashion-MNIST; this run's overrides are said instead
    assert "overridden for this run: model.num_classes=3" in card and "data.source=imagefolder" in card
    assert "datasets:" not in card.split("---")[1]  # no inherited fashion_mnist claim in the metadata
    assert "| paper (" not in card


@pytest.mark.slow
def test_resume_with_a_different_recipe_is_refused_then_allowed(dirty_run):
    root, out, _, _ = dirty_run
    saved = (out / "recipe.yaml").read_text()
    common = [QUICKSTART, *FOLDER_RUN, f"data.root={root}", f"output_dir={out}", "training.resume_from_checkpoint=latest"]
    proc = train_in_process(*common, "data.batch_size=2", "sparsity.target=0.5")
    line = error_line(proc, exit_code=2)
    assert "data.batch_size (4 -> 2)" in line and "sparsity.target (0.9 -> 0.5)" in line
    assert "training.allow_recipe_change=true" in line
    assert (out / "recipe.yaml").read_text() == saved  # the refused start wrote nothing
    # allowed: the new values are used, and recipe.yaml, config.json and the card agree
    train_in_process(*common, "sparsity.target=0.5", "training.epochs=2", "training.allow_recipe_change=true", check=True)
    final = [r for r in records(out) if r["kind"] == "final"][-1]
    assert final["epoch"] == 2 and final["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert load_recipe(out / "recipe.yaml").sparsity.target == 0.5
    assert json.loads((out / "config.json").read_text())["sparsity"]["target"] == 0.5


@pytest.mark.slow
def test_evaluate_script_flags_anywhere_and_bad_paths(dirty_run, tmp_path):
    root, out, _, _ = dirty_run
    proc = evaluate_in_process(str(out), "--recipe", str(out / "recipe.yaml"), "data.eval_subset=3", check=True)
    # the JSON object is the last thing printed (a library may log a line before it)
    assert json.loads(proc.stdout[proc.stdout.rfind("\n{") + 1:])["num_examples"] == 3
    missing = error_line(evaluate_in_process(str(tmp_path / "nothing_here")), 2)
    assert "not found" in missing and "no recipe" not in missing
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    not_model = error_line(evaluate_in_process(str(tmp_path / "notes")), 2)
    assert "is not a model folder" in not_model


@pytest.mark.slow
def test_num_classes_mismatch_is_one_line_before_anything_is_written(tmp_path):
    root = make_image_folder(tmp_path / "imgs", CLASSES, per_class=2, size=36)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a fourth class
    out = tmp_path / "run"
    args = [a for a in FOLDER_RUN if not a.startswith("model.num_classes")]
    proc = train_in_process(QUICKSTART, *args, "model.num_classes=4", f"data.root={root}",
                f"output_dir={out}")
    line = error_line(proc, exit_code=2)
    assert "model.num_classes is 4" in line and "has 3 classes" in line and "model.num_classes=3" in line
    assert not (out / "recipe.yaml").exists()


@pytest.mark.slow
def test_print_config_flags_anywhere_and_model_name_checked():
    proc = train_in_process(QUICKSTART, "--print-config", "training.max_steps=7", check=True)
    assert "max_steps: 7" in proc.stdout
    line = error_line(train_in_process(QUICKSTART, "--print-config", "model.name=resnet5O"), 2)
    assert "model.name 'resnet5O' is not a timm model" in line


# ---------------------------------------------------------------------------- init_from


def test_relative_init_from_resolves_against_the_recipe_folder(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "ft.yaml"
    recipe.write_text("inherit: " + str(REPO / "recipes" / "quickstart.yaml") + "\nmodel:\n  init_from: ../models/base\n")
    assert load_recipe(recipe).model.init_from == str(tmp_path / "models" / "base")
    # the resolved recipe (recipe.yaml of a run) reads back the same
    assert load_recipe(save_recipe(load_recipe(recipe), tmp_path / "saved.yaml")).model.init_from == str(tmp_path / "models" / "base")
    assert load_recipe(recipe, ["model.init_from=org/name"]).model.init_from == "org/name"  # a Hub id stays one


@pytest.mark.slow
def test_missing_init_from_path_is_an_error_not_a_hub_lookup(tmp_path):
    proc = train_in_process("recipes/finetune_quickstart.yaml", f"model.init_from={tmp_path}/no/such/run",
                f"output_dir={tmp_path / 'out'}")
    line = error_line(proc, exit_code=2)
    assert "model.init_from" in line and "does not exist" in line
    assert not (tmp_path / "out" / "recipe.yaml").exists()


# ---------------------------------------------------------------------------- datasets source


def _broken_hf_dataset(path: Path, images_root: Path) -> Path:
    import datasets

    good = (images_root / "train" / "circle" / "circle_0.JPEG").read_bytes()
    rows = {"image": [{"bytes": good, "path": "good.jpg"}, {"bytes": good[:40], "path": "cut.jpg"},
                      {"bytes": good, "path": "good2.jpg"}],
            "label": [0, 1, 2]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(path))
    return path


def test_hf_source_skips_unreadable_images_and_names_them(tmp_path, capsys):
    from st3_hf.train.data import build_datasets, class_names_of
    from st3_hf.train.data.sources import UNREADABLE_LABEL
    images = make_image_folder(tmp_path / "imgs", CLASSES, per_class=1, size=36)
    saved = _broken_hf_dataset(tmp_path / "hf", images)
    cfg = DataConfig(source="hf", root=str(saved), input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3)
    train, _ = build_datasets(cfg)
    labels = [train[i][1] for i in range(len(train))]
    assert labels == [0, UNREADABLE_LABEL, 2]
    assert train[1][0].shape == train[0][0].shape  # a placeholder of the right shape, never another image
    assert capsys.readouterr().err.count("unreadable image cut.jpg") == 1
    assert class_names_of(cfg) == list(CLASSES)  # ClassLabel names: the export's label_names


def test_hf_name_wins_over_the_base_recipes_data_root(tmp_path):
    from st3_hf.train.data import load_hf_dataset_dict
    images = make_image_folder(tmp_path / "imgs", CLASSES, per_class=1, size=36, splits=("train", "validation"))
    recipe = load_recipe(REPO / "recipes" / "r50_st3_98.yaml", ["data.source=hf", f"data.hf_name={images}"])
    assert recipe.data.root == "/data/imagenet"  # the base recipe's folder is still set ...
    loaded = load_hf_dataset_dict(recipe.data)  # ... but the named dataset is what loads
    assert sorted(loaded) == ["train", "validation"] and len(loaded["train"]) == 3


def test_data_errors_name_the_recipe_key(tmp_path):
    from st3_hf.train.data import build_datasets
    from st3_hf.errors import DataError

    images = make_image_folder(tmp_path / "imgs", CLASSES, per_class=1, size=36)
    saved = _broken_hf_dataset(tmp_path / "hf", images)
    base = dict(source="hf", root=str(saved), input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3)
    for change, key in ((dict(eval_split="test"), "data.eval_split"), (dict(image_column="img"), "data.image_column"),
                        (dict(label_column="y"), "data.label_column"), (dict(train_split="x"), "data.train_split")):
        with pytest.raises(DataError, match=key.replace(".", r"\.")):
            build_datasets(DataConfig(**{**base, **change}))
    with pytest.raises(DataError, match=r"data\.eval_split"):
        build_datasets(DataConfig(source="imagefolder", root=str(images), eval_split="nope", input_size=[3, 32, 32],
                                  mean=[0.5] * 3, std=[0.25] * 3))


# ---------------------------------------------------------------------------- export and card


def _sparse_resnet10t(num_classes: int = 3):
    import timm

    from st3_hf import sparsify

    model = timm.create_model("resnet10t", num_classes=num_classes)
    sp = sparsify(model, method="st3", target=0.8, end_step=1)
    sp.apply(0.8)
    return model, sp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_of_channels_last_and_half_weights_loads_in_plain_timm(dtype, tmp_path):
    import timm

    from st3_hf.hub.export import export_pretrained

    model, sp = _sparse_resnet10t()
    sp.freeze()
    model = model.to(dtype=dtype, memory_format=torch.channels_last)
    expected = {k: v.float() for k, v in model.state_dict().items()}
    assert not model.conv1[0].weight.is_contiguous()
    export_pretrained(model, sp, tmp_path / "export", label_names=["a", "b", "c"], data_pretrained_cfg={
        "input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "num_classes": 3})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]
    for name, tensor in loaded.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, expected[name]), name


def test_paper_row_only_in_the_papers_setting(tmp_path):
    from st3_hf.train.run_export import export_run, is_paper_setting

    shipped = load_recipe(REPO / "recipes" / "r50_st3_98.yaml")
    assert is_paper_setting(shipped)
    for change in ("model.name=resnet10t", "data.input_size=[3,32,32]", "model.num_classes=3", "hub.dataset_name=x"):
        assert not is_paper_setting(load_recipe(REPO / "recipes" / "r50_st3_98.yaml", [change])), change
    small = load_recipe(REPO / "recipes" / "r50_st3_98.yaml", ["model.name=resnet10t", "model.num_classes=3"])
    model, sp = _sparse_resnet10t()
    export_run(model, sp, tmp_path / "export", small)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| paper (" not in card and "`resnet10t`" in card


def test_fine_tune_card_names_its_base_model(tmp_path):
    from huggingface_hub import ModelCard

    from st3_hf.train.run_export import export_run
    recipe = load_recipe(REPO / "recipes" / "finetune_quickstart.yaml",
                         ["model.init_from=org/quickstart-st3", "hub.base_model=null", "model.in_chans=3",
                          "model.num_classes=3", "data.input_size=[3,28,28]", "data.mean=[0.5,0.5,0.5]",
                          "data.std=[0.25,0.25,0.25]"])
    model, sp = _sparse_resnet10t()
    export_run(model, sp, tmp_path / "export", recipe)
    card = ModelCard.load(str(tmp_path / "export" / "README.md"))
    assert card.data.base_model == "org/quickstart-st3"


def test_line_progress_prints_every_n_steps():
    from st3_hf.train.metrics_log import make_progress
    stream = io.StringIO()
    progress = make_progress(total=10, initial=0, enabled=True, every=4, stream=stream)
    for step in range(10):
        progress.update(1)
        progress.set_postfix(loss=f"{1 / (step + 1):.3f}")
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "\r" not in stream.getvalue()


def test_unreadable_image_never_replaced_by_another(tmp_path, capsys):
    from st3_hf.train.data import build_datasets
    from st3_hf.train.data.sources import UNREADABLE_LABEL
    root = make_image_folder(tmp_path / "imgs", CLASSES, per_class=2, size=36)
    (root / "val" / "square" / "square_1.JPEG").write_bytes(b"")
    cfg = DataConfig(source="imagefolder", root=str(root), eval_split="val", input_size=[3, 32, 32],
                     mean=[0.5] * 3, std=[0.25] * 3)
    _, val = build_datasets(cfg)
    labels = [val[i][1] for i in range(len(val))]
    assert labels == [0, 0, 1, UNREADABLE_LABEL, 2, 2]
    first = [val[i][0] for i in range(len(val))]
    assert not any(torch.equal(first[3], other) for i, other in enumerate(first) if i != 3)
    assert "square_1.JPEG" in capsys.readouterr().err


def test_relative_pretrained_path_resolves_against_the_recipe_folder(tmp_path):
    """model.pretrained: a relative folder is relative to the recipe file (like inherit:), an override to the cwd."""
    from st3_hf.train.recipe import load_recipe
    (tmp_path / "sub").mkdir()
    recipe_file = tmp_path / "sub" / "r.yaml"
    recipe_file.write_text("model:\n  name: resnet10t\n  pretrained: ../dense\n")
    assert load_recipe(recipe_file).model.pretrained == str(tmp_path / "dense")
    recipe_file.write_text("model:\n  name: resnet10t\n  pretrained: local-dir:../dense\n")
    assert load_recipe(recipe_file).model.pretrained == "local-dir:" + str(tmp_path / "dense")
    assert load_recipe(recipe_file, ["model.pretrained=timm/resnet10t.a1_in1k"]).model.pretrained == "timm/resnet10t.a1_in1k"
