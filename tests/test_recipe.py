"""st3_hf.train.recipe: loading, inherit, overrides, type and value checks, round trip, lr scaling."""
from __future__ import annotations

import dataclasses
import textwrap
import typing
from pathlib import Path

import pytest

from st3_hf.errors import ConfigError
from st3_hf.train.recipe import (
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
from st3_hf.train.recipe_schema import Recipe, SparsityRecipe, TrainingConfig


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
    path = write(tmp_path, "r.yaml", f"data: {{mean: [{text}, 0.5, 0.5]}}\n")
    assert load_recipe(path).data.mean[0] == pytest.approx(value, rel=1e-12)


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


def test_inherit_chain_with_an_override_of_an_inherited_nested_key(tmp_path):
    write(tmp_path, "base/root.yaml", """
        model: {kwargs: {output_stride: 8, drop_path_rate: 0.1}}
        training: {epochs: 10, seed: 1}
    """)
    write(tmp_path, "base/mid.yaml", """
        inherit: root.yaml
        model: {kwargs: {drop_path_rate: 0.2}}
        training: {seed: 2}
    """)
    path = write(tmp_path, "run.yaml", "inherit: base/mid.yaml\ndata: {batch_size: 4}\n")
    recipe = load_recipe(path)
    assert recipe.model.kwargs == {"output_stride": 8, "drop_path_rate": 0.2}  # mappings merge key by key
    assert (recipe.training.epochs, recipe.training.seed, recipe.data.batch_size) == (10, 2, 4)
    recipe = load_recipe(path, ["model.kwargs.drop_path_rate=0.3", "training.seed=3"])
    assert recipe.model.kwargs == {"output_stride": 8, "drop_path_rate": 0.3}
    assert (recipe.training.epochs, recipe.training.seed) == (10, 3)
    # an invalid value is reported against whoever set it: the base that set it, or the override
    with pytest.raises(ConfigError, match=r"override 'training.epochs=0': invalid value: 'training.epochs' must be"):
        load_recipe(path, ["training.epochs=0"])
    write(tmp_path, "base/root.yaml", "training: {epochs: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    base = (tmp_path / "base" / "root.yaml").resolve()
    assert str(info.value).startswith(f"{base} (inherited by {path}): invalid value: 'training.epochs' must be > 0")


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
    "nonfinite steps 0": ("training: {max_consecutive_nonfinite_steps: 0}\n", [],
                          "training.max_consecutive_nonfinite_steps", TRAINING_KEYS),
    "nonfinite steps negative in override": ("{}\n", ["training.max_consecutive_nonfinite_steps=-3"],
                                             "training.max_consecutive_nonfinite_steps", TRAINING_KEYS),
    "nonfinite steps not an int": ("training: {max_consecutive_nonfinite_steps: 2.5}\n", [],
                                   "training.max_consecutive_nonfinite_steps", TRAINING_KEYS),
    "collective timeout 0": ("training: {collective_timeout_s: 0}\n", [], "training.collective_timeout_s",
                             TRAINING_KEYS),
    "collective timeout negative": ("{}\n", ["training.collective_timeout_s=-1.5"], "training.collective_timeout_s",
                                    TRAINING_KEYS),
    "collective timeout inf": ("training: {collective_timeout_s: .inf}\n", [], "training.collective_timeout_s",
                               TRAINING_KEYS + ["finite"]),
    "collective timeout null": ("training: {collective_timeout_s: null}\n", [], "training.collective_timeout_s",
                                TRAINING_KEYS),
    "nan lr": ("{}\n", ["optimizer.lr=.nan"], "optimizer.lr", section_keys("optimizer") + ["finite"]),
    "nan in a list": ("data: {mean: [0.5, .nan, 0.5]}\n", [], "data.mean", section_keys("data") + ["finite"]),
    "seed beyond its range": (f"training: {{seed: {2**64}}}\n", [], "training.seed", TRAINING_KEYS + ["[0, 2**32)"]),
    # the sparsity method's own rules come from SparsityConfig, reported at the recipe's key
    "feather with rescale": ("sparsity: {method: feather, rescale: true}\n", [], "'sparsity.rescale' must stay off",
                             section_keys("sparsity")),
    "feather without soft threshold": ("sparsity: {method: feather, soft_threshold: false}\n", [],
                                       "'sparsity.soft_threshold'", section_keys("sparsity")),
    "feather p not positive": ("{}\n", ["sparsity.method=feather", "sparsity.p=0"], "'sparsity.p' must be a finite",
                               section_keys("sparsity")),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_file_key_and_valid_keys(tmp_path, case):
    text, overrides, key, listed = ERROR_CASES[case]
    path = write(tmp_path, "my_recipe.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "my_recipe.yaml" in message
    assert key in message
    for name in listed:
        assert name in message, f"{name!r} missing from: {message}"


@pytest.mark.parametrize("nonfinite_steps", [None, 1, 50])
def test_new_training_keys_accept_valid_values(tmp_path, nonfinite_steps):
    path = write(tmp_path, "r.yaml", "training: {collective_timeout_s: 60}\n")
    value = "null" if nonfinite_steps is None else nonfinite_steps
    recipe = load_recipe(path, [f"training.max_consecutive_nonfinite_steps={value}"])
    assert recipe.training.max_consecutive_nonfinite_steps == nonfinite_steps
    assert recipe.training.collective_timeout_s == 60.0 and type(recipe.training.collective_timeout_s) is float


@pytest.mark.parametrize("text, line, column, problem", [
    # the problem is on line 4 (the indentation), PyYAML sees it at the ':'
    ("description: ok\ntraining:\n  epochs: 3\n   seed: 1\n", 4, 8, "mapping values are not allowed here"),
    # a missing ':' is noticed on the next line; the message also names the line of the key
    ("description: ok\ntraining:\n  epochs: 3\n  max_steps 5\n  seed: 1\n", 5, 3,
     "could not find expected ':'; while scanning a simple key at line 4, column 3"),
    ("a: 1\nb: 2\nc: 3\nd: 4\ne: 5\nf: 6\ng: 7\nh: 8\ni: 9\nj: 10\nk: 11\nl: [1, 2\n", 13, 1,
     "expected ',' or ']'"),
    ("training: {epochs: 1}\n\tmodel: {}\n", 2, 1, "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, line, column, problem):
    path = write(tmp_path, "recipes/broken.yaml", "")
    path.write_text(text, encoding="utf-8")  # not dedented: the indentation is the point
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:{column}: invalid YAML: "), message
    assert problem in message
    assert "fix the syntax" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, overrides, expected", [
    ("model: {kwargs: {flag: !!bool maybe}}\n", [], "r.yaml: invalid YAML value: 'maybe'"),
    ("model: !!python/object:os.system {}\n", [], ":1:8: invalid YAML: could not determine a constructor"),
    ("description: \"nul \x00\"\n", [], ":1:19: invalid YAML: special character #x0000"),
    ("description: a\ndescription: b\n", [], ":2:1: invalid YAML: found duplicate key description"),
    ("{}\n", ["description=[1"], "override 'description=[1': value is not valid YAML at column 3"),
    ("{}\n", ["training.epochs=2001-13-45"], "override 'training.epochs=2001-13-45': 'training.epochs' must be int"),
    ("{}\n", ["description=a\nb", "training.epochs=x"], "'training.epochs' must be int"),
    ("{}\n", ["model.kwargs.a=???"], "override 'model.kwargs.a=???': 'model.kwargs.a': Missing mandatory value"),
])
@pytest.mark.slow
def test_malformed_input_gives_one_line_recipe_error(tmp_path, text, overrides, expected):
    # each of these once escaped as a bare PyYAML / OmegaConf error or a multi-line message
    path = write(tmp_path, "r.yaml", "")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    assert expected in str(info.value)
    assert len(str(info.value).splitlines()) == 1, str(info.value)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: is not UTF-8 text"):
        load_recipe(path)


def test_single_invalid_value_is_one_line_and_several_are_one_line_each(tmp_path):
    path = write(tmp_path, "r.yaml", "sparsity: {target: 1.5}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: invalid value: 'sparsity.target' must be in [0, 1)")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["training.collective_timeout_s=0", "optimizer.lr=.inf"])
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: invalid values:"
    assert len(lines) == 4
    assert any("'training.collective_timeout_s' must be > 0" in line for line in lines[1:])
    assert any("'optimizer.lr' must be a finite number, got inf" in line for line in lines[1:])


@pytest.mark.parametrize("text", ["5e-5", "1E3", "-2e-3", ".5e1", "a\x85b", "\x85", "yes", "<<", "2001-01-01",
                                  "\\", "x ??? y"])
def test_strings_that_look_like_other_values_round_trip(tmp_path, text):
    # the dumper must quote what the loader would read as a number, and escape NEL (U+0085)
    recipe = recipe_from_dict({"description": text, "model": {"kwargs": {text: text}}})
    again = load_recipe(save_recipe(recipe, tmp_path / "saved.yaml"))
    assert again == recipe
    assert again.description == text and again.model.kwargs == {text: text}


@pytest.mark.parametrize("text", ["${x}", "cost: ${5}", "a\\${x}", "a\\\\${x}", "${a}${b}", "$", "${"])
def test_a_literal_interpolation_mark_round_trips_as_text(tmp_path, text):
    # a recipe built in code may hold `${` as text: written escaped, it is not read back as an interpolation
    recipe = Recipe(description=text)
    recipe.model.kwargs = {"k": [text], text: text}
    again = load_recipe(save_recipe(recipe, tmp_path / "saved.yaml"))
    assert again == recipe


def test_choices_are_the_literal_annotations_and_the_core_methods():
    from st3_hf.sparse.config import Method
    from st3_hf.sparse.methods import METHODS, SparsityMethod
    from st3_hf.train.data import VALID_SOURCES
    from st3_hf.train.recipe_schema import CHOICES
    assert CHOICES["sparsity.method"] == typing.get_args(Method) == tuple(METHODS)
    assert all(issubclass(cls, SparsityMethod) and cls.name == name for name, cls in METHODS.items())
    assert CHOICES["data.source"] == VALID_SOURCES
    assert set(CHOICES) == {"model.head", "data.source", "data.interpolation", "optimizer.name", "lr_schedule.name",
                            "sparsity.method", "sparsity.schedule", "training.mixed_precision"}


def test_recipe_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("typo, suggestion", [
    ("training.max_step", "training.max_steps"),
    ("sparsity.targt", "sparsity.target"),
    ("optimizer.weightdecay", "optimizer.weight_decay"),
])
def test_unknown_key_suggests_closest(tmp_path, typo, suggestion):
    path = write(tmp_path, "r.yaml", "{}\n")
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_recipe(path, [f"{typo}=1"])


@pytest.mark.parametrize("text, overrides, unknown, closest, section", [
    ("outpt_dir: x\n", [], "outpt_dir", "output_dir", None),
    ("trainig: {epochs: 3}\n", [], "trainig", "training", None),
    ("training: {max_step: 3}\n", [], "training.max_step", "training.max_steps", "training"),
    ("data: {batchsize: 3}\n", [], "data.batchsize", "data.batch_size", "data"),
    ("{}\n", ["descripton=x"], "descripton", "description", None),
    ("{}\n", ["lr_schedule.warmup=1"], "lr_schedule.warmup", "lr_schedule.warmup_epochs", "lr_schedule"),
    ("{}\n", ["sparsity.targt=0.5"], "sparsity.targt", "sparsity.target", "sparsity"),
])
def test_unknown_key_anywhere_names_the_closest_key_and_the_sections_keys(tmp_path, text, overrides, unknown,
                                                                          closest, section):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert f"unknown key '{unknown}' (did you mean '{closest}'?)" in message
    where = f"valid keys of section '{section}': " if section else "valid keys of the top level: "
    assert where + ", ".join(section_keys(section) if section else TOP_KEYS + ["inherit"]) in message
    assert message.startswith(str(path)) and "\n" not in message
    if overrides:
        assert f"override '{overrides[0]}'" in message


@pytest.mark.parametrize("text, overrides, expected", [
    ("training: {label_smoothing: '0.1'}\n", [], "'training.label_smoothing' must be float, got str '0.1'"),
    ("training: {max_steps: 2.5}\n", [], "'training.max_steps' must be Optional[int], got float 2.5"),
    ("training: {checkpoint_every_epoch: 1}\n", [], "'training.checkpoint_every_epoch' must be bool, got int 1"),
    ("description: 3\n", [], "'description' must be str, got int 3"),
    ("data: {input_size: [3, 224.5, 224]}\n", [], "'data.input_size' must be List[int], got list [3, 224.5, 224]"),
    ("{}\n", ["training.epochs=ten"], "'training.epochs' must be int, got str 'ten'"),
    ("{}\n", ["training.epochs=null"], "'training.epochs' must be int, got null"),
    ("{}\n", ["model.pretrained=3"], "'model.pretrained' must be Union[bool, str], got int 3"),
    ("{}\n", ["sparsity.exclude=fc"], "'sparsity.exclude' must be List[str], got str 'fc'"),
    ("{}\n", ["model.kwargs=3"], "'model.kwargs' must be Dict[str, Any], got int 3"),
    ("{}\n", ["training.epochs.x=1"], "'training.epochs' must be int, got dict {'x': 1}"),
])
def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, text, overrides, expected):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert expected in message and message.startswith(str(path)) and "\n" not in message
    key = expected.split("'")[1]
    assert (f"valid keys of section '{key.split('.')[0]}'" if "." in key else "valid keys of the top level") in message


def test_yaml_11_boolean_words_at_text_keys_are_the_words(tmp_path):
    # PyYAML reads a bare `no` as false: at a key that holds text, it is the word (`mixed_precision=no`)
    path = write(tmp_path, "r.yaml", "description: yes\ntraining: {mixed_precision: no}\n")
    recipe = load_recipe(path)
    assert (recipe.description, recipe.training.mixed_precision) == ("yes", "no")
    override = load_recipe(write(tmp_path, "s.yaml", "{}\n"), ["training.mixed_precision=no"])
    assert override.training.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'training.mixed_precision' is 'yes'; valid values: no, fp16, bf16"):
        load_recipe(path, ["training.mixed_precision=on"])


def test_omegaconf_reads_numbers_and_dates_as_a_user_means_them(tmp_path):
    path = write(tmp_path, "r.yaml", "description: 2001-13-45\noptimizer: {weight_decay: 1e-3, lr: 5E-2}\n")
    recipe = load_recipe(path, ["sparsity.power=2e0"])
    assert recipe.description == "2001-13-45"  # a date-like text stays text
    assert (recipe.optimizer.weight_decay, recipe.optimizer.lr, recipe.sparsity.power) == (1e-3, 5e-2, 2.0)


def test_interpolations_resolve_and_a_bad_one_names_its_key(tmp_path):
    path = write(tmp_path, "r.yaml", "model: {name: resnet18}\noutput_dir: /tmp/runs/${model.name}\n")
    assert load_recipe(path).output_dir == "/tmp/runs/resnet18"
    assert load_recipe(path, ["model.name=resnet34"]).output_dir == "/tmp/runs/resnet34"
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["output_dir=/tmp/${nope}"])
    message = str(info.value)
    assert "override 'output_dir=/tmp/${nope}': 'output_dir': Interpolation key 'nope' not found" in message
    assert "\n" not in message


def test_error_in_base_file_names_the_base(tmp_path):
    write(tmp_path, "base/broken_base.yaml", "training: {epoch: 3}\n")
    path = write(tmp_path, "child.yaml", "inherit: base/broken_base.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert "broken_base.yaml" in str(info.value) and "child.yaml" in str(info.value)
    assert "training.epoch" in str(info.value)


def test_wrong_type_inherited_is_reported_against_the_base(tmp_path):
    write(tmp_path, "typed_base.yaml", "training: {epochs: many}\n")
    path = write(tmp_path, "child.yaml", "inherit: typed_base.yaml\nsparsity: {target: 0.5}\n")
    with pytest.raises(ConfigError, match="typed_base.yaml"):
        load_recipe(path)


def test_value_from_override_is_reported_against_the_override(tmp_path):
    path = write(tmp_path, "r.yaml", "{}\n")
    with pytest.raises(ConfigError, match=r"override 'sparsity.target=1.5'"):
        load_recipe(path, ["sparsity.target=1.5"])


def test_inherit_cycle(tmp_path):
    write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("files", [
    {"a.yaml": "inherit: a.yaml\n"},
    {"a.yaml": "inherit: sub/b.yaml\n", "sub/b.yaml": "inherit: ../c.yaml\n", "c.yaml": "inherit: [sub/b.yaml]\n"},
])
def test_inherit_cycle_is_one_line_naming_the_chain(tmp_path, files):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_recipe(tmp_path / "a.yaml")
    message = str(info.value)
    assert "\n" not in message and "'inherit' forms a cycle: " in message
    assert all(str((tmp_path / name).resolve()) in message for name in files), message


def test_a_base_may_be_inherited_twice_without_a_cycle(tmp_path):
    write(tmp_path, "base.yaml", "training: {epochs: 4}\n")
    write(tmp_path, "mid.yaml", "inherit: base.yaml\ntraining: {seed: 5}\n")
    path = write(tmp_path, "run.yaml", "inherit: [base.yaml, mid.yaml]\n")
    assert (load_recipe(path).training.epochs, load_recipe(path).training.seed) == (4, 5)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_validate_recipe_on_code_built_recipe():
    recipe = Recipe()
    recipe.sparsity.method = "topk"
    with pytest.raises(ConfigError, match="sparsity.method"):
        validate_recipe(recipe)
    assert validate_recipe(Recipe()) == Recipe()


def test_recipe_from_dict_checks_like_a_file():
    assert recipe_from_dict({"training": {"epochs": 3}}, ["training.max_steps=4"]).training.max_steps == 4
    with pytest.raises(ConfigError, match="training.epoch"):
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
    from st3_hf.train.recipe import load_recipe
    base = load_recipe((Path(__file__).resolve().parents[1] / "recipes") / "fmnist_st3_90.yaml")
    assert base.model.kwargs == {"output_stride": 8}
    assert load_recipe((Path(__file__).resolve().parents[1] / "recipes") / "fmnist_st3_90.yaml", ["model.kwargs={}"]).model.kwargs == {}
    assert load_recipe((Path(__file__).resolve().parents[1] / "recipes") / "fmnist_st3_90.yaml", ["model.kwargs={drop_path_rate: 0.1}"]).model.kwargs == {
        "drop_path_rate": 0.1
    }
