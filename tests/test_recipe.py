"""st3_hf.recipe: loading, inherit, overrides, type and value checks, round trip, lr scaling."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from st3_hf.recipe import (
    RecipeError,
    global_batch_size,
    load_recipe,
    parse_override,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_yaml,
    resolve_lr,
    save_recipe,
    validate_recipe,
)
from st3_hf.recipe_schema import Recipe, SparsityRecipe, TrainingConfig


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def section_keys(section: str) -> list:
    cls = type(getattr(Recipe(), section))
    return [f.name for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------- loading and types

def test_minimal_file_gives_schema_defaults(tmp_path):
    path = write(tmp_path, "r.yaml", "description: nothing else\n")
    recipe = load_recipe(path)
    assert recipe == dataclasses.replace(Recipe(), description="nothing else")


def test_sections_become_typed_dataclasses(tmp_path):
    path = write(tmp_path, "r.yaml", """
        output_dir: out/here
        model: {name: resnet18, num_classes: 10, kwargs: {output_stride: 8}}
        training: {epochs: 7, grad_clip: null}
        sparsity: {method: st3_sigma, target: 0.95, exclude: [fc, conv1]}
    """)
    recipe = load_recipe(path)
    assert isinstance(recipe.training, TrainingConfig)
    assert isinstance(recipe.sparsity, SparsityRecipe)
    assert recipe.output_dir == "out/here"
    assert recipe.model.kwargs == {"output_stride": 8}
    assert recipe.training.epochs == 7 and recipe.training.grad_clip is None
    assert recipe.sparsity.exclude == ["fc", "conv1"]
    # untouched keys keep their defaults
    assert recipe.training.label_smoothing == TrainingConfig().label_smoothing


def test_int_accepted_for_float_and_converted(tmp_path):
    path = write(tmp_path, "r.yaml", """
        lr_schedule: {warmup_epochs: 5}
        data: {mean: [0, 1, 0], std: [1, 1, 1]}
        optimizer: {lr: 1}
    """)
    recipe = load_recipe(path)
    assert recipe.lr_schedule.warmup_epochs == 5.0 and type(recipe.lr_schedule.warmup_epochs) is float
    assert all(type(v) is float for v in recipe.data.mean)
    assert type(recipe.optimizer.lr) is float  # Optional[float]


@pytest.mark.parametrize("text, value", [("5e-5", 5e-5), ("1E-4", 1e-4), ("5.0e-5", 5e-5), ("-2e3", -2000.0)])
def test_exponent_floats_without_dot_are_numbers(tmp_path, text, value):
    # PyYAML (YAML 1.1) would read 5e-5 as the string "5e-5"
    path = write(tmp_path, "r.yaml", f"lr_schedule: {{min_lr: {text}}}\n")
    assert load_recipe(path).lr_schedule.min_lr == pytest.approx(value, rel=1e-12)


def test_parse_override_values_are_yaml():
    assert parse_override("training.max_steps=20") == (("training", "max_steps"), 20)
    assert parse_override("output_dir=/tmp/x") == (("output_dir",), "/tmp/x")
    assert parse_override("sparsity.exclude=[fc]") == (("sparsity", "exclude"), ["fc"])
    assert parse_override("training.resume_from_checkpoint=null") == (("training", "resume_from_checkpoint"), None)
    assert parse_override("optimizer.weight_decay=1e-4") == (("optimizer", "weight_decay"), 1e-4)
    assert parse_override(" description = a=b ") == (("description",), "a=b")  # split on the first '='


def test_overrides_apply_after_file(tmp_path):
    path = write(tmp_path, "r.yaml", """
        output_dir: outputs/a
        training: {max_steps: 5, resume_from_checkpoint: latest}
        sparsity: {exclude: [conv1]}
        model: {kwargs: {output_stride: 8}}
    """)
    recipe = load_recipe(path, [
        "training.max_steps=20",
        "output_dir=/tmp/x",
        "sparsity.exclude=[fc]",
        "training.resume_from_checkpoint=null",
        "model.kwargs.drop_path_rate=0.1",
        "training.max_steps=30",  # the last one wins
    ])
    assert recipe.training.max_steps == 30
    assert recipe.output_dir == "/tmp/x"
    assert recipe.sparsity.exclude == ["fc"]  # lists are replaced, not merged
    assert recipe.training.resume_from_checkpoint is None
    assert recipe.model.kwargs == {"output_stride": 8, "drop_path_rate": 0.1}


def test_single_override_string_is_not_split_into_characters(tmp_path):
    path = write(tmp_path, "r.yaml", "description: x\n")
    assert load_recipe(path, "training.max_steps=3").training.max_steps == 3


# --------------------------------------------------------------------------- inherit

def test_inherit_deep_merges_sections(tmp_path):
    write(tmp_path, "base/common.yaml", """
        model: {name: resnet50, bn_momentum: 0.01, channels_last: true}
        training: {epochs: 100, label_smoothing: 0.1}
        sparsity: {start_epoch: 5, end_epoch: 50, exclude: [fc]}
    """)
    path = write(tmp_path, "run.yaml", """
        inherit: base/common.yaml
        training: {epochs: 10}
        sparsity: {target: 0.98, exclude: []}
    """)
    recipe = load_recipe(path)
    assert recipe.model.name == "resnet50" and recipe.model.bn_momentum == 0.01 and recipe.model.channels_last
    assert recipe.training.epochs == 10 and recipe.training.label_smoothing == 0.1
    assert (recipe.sparsity.start_epoch, recipe.sparsity.end_epoch, recipe.sparsity.target) == (5.0, 50.0, 0.98)
    assert recipe.sparsity.exclude == []


def test_inherit_chain_and_list_relative_to_each_file(tmp_path, monkeypatch):
    write(tmp_path, "a/root.yaml", "training: {epochs: 1, seed: 1}\noutput_dir: from_root\n")
    write(tmp_path, "a/b/mid.yaml", "inherit: ../root.yaml\ntraining: {epochs: 2}\n")
    write(tmp_path, "extra.yaml", "training: {seed: 3}\n")
    path = write(tmp_path, "run.yaml", "inherit: [a/b/mid.yaml, extra.yaml]\n")
    monkeypatch.chdir(tmp_path / "a")  # paths are relative to the files, not to the working directory
    recipe = load_recipe(path)
    assert (recipe.training.epochs, recipe.training.seed, recipe.output_dir) == (2, 3, "from_root")


def test_overrides_win_over_inherited_values(tmp_path):
    write(tmp_path, "base.yaml", "training: {max_steps: 5}\n")
    path = write(tmp_path, "run.yaml", "inherit: base.yaml\n")
    assert load_recipe(path, ["training.max_steps=20"]).training.max_steps == 20


# --------------------------------------------------------------------------- errors

TRAINING_KEYS = section_keys("training")
TOP_KEYS = [f.name for f in dataclasses.fields(Recipe)]

ERROR_CASES = {
    # name: (file text, overrides, key named in the message, keys listed in the message)
    "unknown key in file": ("training: {max_step: 20}\n", [], "training.max_step", TRAINING_KEYS),
    "unknown section in file": ("trainig: {epochs: 3}\n", [], "trainig", TOP_KEYS),
    "unknown override key": ("{}\n", ["training.max_step=20"], "training.max_step", TRAINING_KEYS),
    "unknown override section": ("{}\n", ["trainig.epochs=2"], "trainig", TOP_KEYS),
    "wrong type in file": ("training: {epochs: ten}\n", [], "training.epochs", TRAINING_KEYS),
    "bool is not an int": ("training: {epochs: true}\n", [], "training.epochs", TRAINING_KEYS),
    "str is not a float": ("training: {label_smoothing: '0.1'}\n", [], "training.label_smoothing", TRAINING_KEYS),
    "float is not an int": ("training: {max_steps: 2.5}\n", [], "training.max_steps", TRAINING_KEYS),
    "list item of wrong type": ("data: {input_size: [3, 224.5, 224]}\n", [], "data.input_size", section_keys("data")),
    "wrong type in override": ("{}\n", ["training.max_steps=abc"], "training.max_steps", TRAINING_KEYS),
    "null for a non-optional key": ("{}\n", ["training.epochs=null"], "training.epochs", TRAINING_KEYS),
    "section is not a mapping": ("training: 3\n", [], "training", TRAINING_KEYS),
    "override missing '='": ("{}\n", ["training.max_steps"], "training.max_steps", TRAINING_KEYS),
    "override missing '=' and section": ("{}\n", ["max_steps"], "max_steps", TOP_KEYS),
    "override with empty key": ("{}\n", ["=3"], "=3", TOP_KEYS),
    "bad method": ("sparsity: {method: st4}\n", [], "sparsity.method",
                   ["st3", "st3_sigma", "gmp", "ste_hard", "dense"]),
    "bad method in override": ("{}\n", ["sparsity.method=magnitude"], "sparsity.method",
                               ["st3", "st3_sigma", "gmp", "ste_hard", "dense"]),
    "target 1": ("sparsity: {target: 1.0}\n", [], "sparsity.target", section_keys("sparsity")),
    "negative target": ("sparsity: {target: -0.1}\n", [], "sparsity.target", section_keys("sparsity")),
    "dense with a target": ("sparsity: {method: dense, target: 0.5}\n", [], "sparsity.target", ["0"]),
    "ramp ends before it starts": ("sparsity: {start_epoch: 10, end_epoch: 5}\n", [], "sparsity.start_epoch",
                                   section_keys("sparsity")),
    "bad mixed precision": ("training: {mixed_precision: fp32}\n", [], "training.mixed_precision",
                            ["no", "fp16", "bf16"]),
    "bad data source": ("data: {source: tfds}\n", [], "data.source", ["imagefolder", "hf", "fashion_mnist"]),
    "bad lr schedule": ("lr_schedule: {name: onecycle}\n", [], "lr_schedule.name", ["cosine", "step", "constant"]),
    "bad optimizer": ("optimizer: {name: adam}\n", [], "optimizer.name", ["sgd", "adamw"]),
    "step schedule without milestones": ("lr_schedule: {name: step}\n", [], "lr_schedule.milestones", []),
    "channels disagree": ("model: {in_chans: 1}\n", [], "data.input_size", []),
    "bad inherit path": ("inherit: does_not_exist.yaml\n", [], "inherit", ["does_not_exist.yaml"] + TOP_KEYS),
    "inherit not a path": ("inherit: 3\n", [], "inherit", TOP_KEYS),
    "inherit in an override": ("{}\n", ["inherit=other.yaml"], "inherit", TOP_KEYS),
    "YAML list": ("- training\n- model\n", [], "mapping", TOP_KEYS),
    "YAML scalar": ("just a string\n", [], "mapping", TOP_KEYS),
    "empty file": ("", [], "empty", TOP_KEYS),
    "invalid YAML": ("training: {epochs: [1\n", [], "invalid YAML", []),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_file_key_and_valid_keys(tmp_path, case):
    text, overrides, key, listed = ERROR_CASES[case]
    path = write(tmp_path, "my_recipe.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "my_recipe.yaml" in message
    assert key in message
    for name in listed:
        assert name in message, f"{name!r} missing from: {message}"


def test_recipe_error_is_a_value_error():
    assert issubclass(RecipeError, ValueError)


@pytest.mark.parametrize("typo, suggestion", [
    ("training.max_step", "training.max_steps"),
    ("sparsity.targt", "sparsity.target"),
    ("optimizer.weightdecay", "optimizer.weight_decay"),
])
def test_unknown_key_suggests_closest(tmp_path, typo, suggestion):
    path = write(tmp_path, "r.yaml", "{}\n")
    with pytest.raises(RecipeError, match=f"did you mean '{suggestion}'"):
        load_recipe(path, [f"{typo}=1"])


def test_error_in_base_file_names_the_base(tmp_path):
    write(tmp_path, "base/broken_base.yaml", "training: {epoch: 3}\n")
    path = write(tmp_path, "child.yaml", "inherit: base/broken_base.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "broken_base.yaml" in str(info.value) and "child.yaml" in str(info.value)
    assert "training.epoch" in str(info.value)


def test_wrong_type_inherited_is_reported_against_the_base(tmp_path):
    write(tmp_path, "typed_base.yaml", "training: {epochs: many}\n")
    path = write(tmp_path, "child.yaml", "inherit: typed_base.yaml\nsparsity: {target: 0.5}\n")
    with pytest.raises(RecipeError, match="typed_base.yaml"):
        load_recipe(path)


def test_value_from_override_is_reported_against_the_override(tmp_path):
    path = write(tmp_path, "r.yaml", "{}\n")
    with pytest.raises(RecipeError, match=r"override 'sparsity.target=1.5'"):
        load_recipe(path, ["sparsity.target=1.5"])


def test_inherit_cycle(tmp_path):
    write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_validate_recipe_on_code_built_recipe():
    recipe = Recipe()
    recipe.sparsity.method = "topk"
    with pytest.raises(RecipeError, match="sparsity.method"):
        validate_recipe(recipe)
    assert validate_recipe(Recipe()) == Recipe()


def test_recipe_from_dict_checks_like_a_file():
    assert recipe_from_dict({"training": {"epochs": 3}}, ["training.max_steps=4"]).training.max_steps == 4
    with pytest.raises(RecipeError, match="training.epoch"):
        recipe_from_dict({"training": {"epoch": 3}})


# --------------------------------------------------------------------------- round trip

def test_yaml_round_trip_is_exact(tmp_path):
    write(tmp_path, "base.yaml", "optimizer: {weight_decay: 5e-5, base_lr: 0.2}\n")
    path = write(tmp_path, "run.yaml", """
        inherit: base.yaml
        description: "round: trip # with YAML-special characters"
        model: {kwargs: {output_stride: 8, stem_type: deep}}
        data: {mean: [0.2860], std: [0.3530], input_size: [1, 28, 28], train_subset: 1000}
    """)
    recipe = load_recipe(path, ["model.in_chans=1", "training.max_steps=20"])
    saved = save_recipe(recipe, tmp_path / "out" / "recipe.yaml")
    again = load_recipe(saved)
    assert again == recipe
    assert recipe_to_dict(again) == recipe_to_dict(recipe)
    assert recipe_to_yaml(again) == recipe_to_yaml(recipe)


def test_recipe_to_dict_is_plain_data():
    d = recipe_to_dict(Recipe())
    assert d["sparsity"]["method"] == "st3"
    assert set(d) == {f.name for f in dataclasses.fields(Recipe)}


# --------------------------------------------------------------------------- batch size and lr scaling

@pytest.mark.parametrize("batch, procs, accum", [(256, 1, 1), (256, 8, 1), (64, 8, 4), (128, 16, 2)])
def test_global_batch_and_linear_lr_scaling(batch, procs, accum):
    recipe = recipe_from_dict({
        "data": {"batch_size": batch},
        "training": {"gradient_accumulation_steps": accum},
        "optimizer": {"base_lr": 0.2, "base_batch_size": 512},
    })
    expected_batch = batch * procs * accum
    assert global_batch_size(recipe, procs) == expected_batch
    assert resolve_lr(recipe, procs) == pytest.approx(0.2 * expected_batch / 512, rel=1e-12)


def test_explicit_lr_is_not_scaled():
    recipe = recipe_from_dict({"optimizer": {"lr": 0.05}, "data": {"batch_size": 1024}})
    assert resolve_lr(recipe, 8) == 0.05


def test_reference_batch_gives_reference_lr():
    # ImageNet reference: lr 0.2 at a global batch of 512 (2 processes x 256)
    recipe = recipe_from_dict({"data": {"batch_size": 256}, "optimizer": {"base_lr": 0.2, "base_batch_size": 512}})
    assert resolve_lr(recipe, 2) == pytest.approx(0.2)
    assert resolve_lr(recipe, 8) == pytest.approx(0.8)


def test_global_batch_needs_a_process():
    with pytest.raises(ValueError):
        global_batch_size(Recipe(), 0)


def test_override_replaces_a_mapping_instead_of_merging():
    from st3_hf.recipe import load_recipe

    base = load_recipe((Path(__file__).resolve().parents[1] / "recipes") / "fmnist_st3_90.yaml")
    assert base.model.kwargs == {"output_stride": 8}
    assert load_recipe((Path(__file__).resolve().parents[1] / "recipes") / "fmnist_st3_90.yaml", ["model.kwargs={}"]).model.kwargs == {}
    assert load_recipe((Path(__file__).resolve().parents[1] / "recipes") / "fmnist_st3_90.yaml", ["model.kwargs={drop_path_rate: 0.1}"]).model.kwargs == {
        "drop_path_rate": 0.1
    }
