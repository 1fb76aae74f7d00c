"""Property tests of the recipe loader: a recipe survives a YAML round trip (recipe -> yaml -> recipe), and
``key=value`` overrides, good or bad, give a valid recipe (that round-trips too) or one clear
:class:`ConfigError`, never another exception.

The documents are built from the real schema (sections, keys and types read from the dataclasses of
:mod:`st3_hf.train.recipe_schema`), so most of them get past the key and type checks into the value checks.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from st3_hf.errors import ConfigError
from st3_hf.train.recipe import load_recipe, recipe_from_dict, recipe_to_yaml, save_recipe
from st3_hf.train.recipe_schema import CHOICES, Recipe

# database=None: no .hypothesis/ folder in the checkout; deadline=None: file I/O timing varies on CI
PROPERTY = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

HINTS = typing.get_type_hints(Recipe)
SECTIONS = {f.name: HINTS[f.name] for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(HINTS[f.name])}
FIELD_TYPES: Dict[Tuple[str, str], Any] = {
    (section, name): tp for section, cls in SECTIONS.items() for name, tp in typing.get_type_hints(cls).items()
}
# text with what YAML or OmegaConf could read as something else: numbers, booleans, `${` interpolations, escapes
CHARS = st.one_of(st.sampled_from("${}\\?:#-'\"\n\x85 e.0123456789yesnoul~*&!<>[]"),
                  st.characters(exclude_categories=["Cs"]))  # surrogates cannot be written as UTF-8
TEXT = st.text(CHARS, max_size=12).filter(lambda t: t.strip("\\") != "???")  # `???` is OmegaConf's "missing"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # module scope: hypothesis reruns the test body many times within one function-scoped fixture
    return tmp_path_factory.mktemp("recipe_property")


# values that fit the field, its range and the fields it must agree with
GOOD: Dict[str, st.SearchStrategy[Any]] = {
    "model.in_chans": st.just(3),
    "model.pretrained": st.just(False),
    "model.init_from": st.none(),
    "data.input_size": st.builds(lambda h, w: [3, h, w], st.integers(1, 512), st.integers(1, 512)),
    "data.mean": st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3),
    "data.std": st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3),
    "data.scale": st.just([0.08, 1.0]),
    "data.ratio": st.just([0.75, 1.25]),
    "data.source": st.sampled_from(["imagefolder", "fashion_mnist"]),
    "training.seed": st.integers(0, 2**32 - 1),
    "sparsity.method": st.sampled_from(["st3", "st3_sigma", "gmp", "ste_hard"]),
    "sparsity.schedule": st.just("ramp"),
    "sparsity.start_epoch": st.floats(0.0, 5.0),
    "sparsity.end_epoch": st.floats(5.0, 100.0),
    "lr_schedule.name": st.sampled_from(["cosine", "constant"]),
    "model.kwargs": st.dictionaries(TEXT, st.one_of(st.integers(-10, 10), st.floats(0, 1), TEXT, st.booleans(),
                                                    st.none(), st.lists(st.integers(0, 9), max_size=3)), max_size=3),
}
SKIPPED = {"sparsity.p", "sparsity.theta", "sparsity.probas_lr", "sparsity.probas_momentum",
           "sparsity.probas_weight_decay", "sparsity.rounds", "sparsity.round_fraction"}  # one method's keys


def good(tp: Any, dotted: str) -> st.SearchStrategy[Any]:
    """A value of the field's type, in range."""
    if dotted in GOOD:
        return GOOD[dotted]
    if dotted in CHOICES:
        return st.sampled_from(CHOICES[dotted])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return st.one_of(st.none(), good([a for a in args if a is not type(None)][0], dotted))
    if origin is list:
        return st.lists(good(args[0], dotted), max_size=3)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(1, 1000)
    if tp is float:
        return st.one_of(st.floats(0.01, 0.99), st.just(1))  # int 1 is read as 1.0 (every range allows it)
    return TEXT


@st.composite
def documents(draw) -> Dict[str, Any]:
    """A recipe document of real sections and keys with good values (a few sections, a few keys each)."""
    doc: Dict[str, Any] = {"description": draw(TEXT)}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        names = [n for s, n in FIELD_TYPES if s == section and f"{s}.{n}" not in SKIPPED]
        doc[section] = {name: draw(good(FIELD_TYPES[(section, name)], f"{section}.{name}"))
                        for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True))}
    return doc


def _value_text(value: Any) -> str:
    """``value`` as an override writes it: YAML flow style on one line."""
    return OmegaConf.to_yaml({"v": value}, default_flow_style=True)[4:-2]


@st.composite
def override(draw) -> str:
    """``section.key=value``: mostly real keys with good values; or typo keys, junk values, malformed text."""
    section, name = draw(st.sampled_from(sorted(FIELD_TYPES)))
    kind = draw(st.integers(0, 9))
    if kind < 6:
        return f"{section}.{name}={_value_text(draw(good(FIELD_TYPES[(section, name)], f'{section}.{name}')))}"
    if kind == 6:  # a typo of a real key
        return f"{section}.{name[:-1]}={_value_text(draw(st.integers()))}"
    if kind == 7:  # a value of another type
        return f"{section}.{name}={_value_text(draw(st.one_of(TEXT, st.integers(), st.floats(), st.booleans())))}"
    if kind == 8:
        return draw(st.sampled_from(["training.max_steps", "=3", "training..epochs=1", "inherit=a.yaml", "model=3",
                                     "model.kwargs={}", "sparsity.exclude=[fc, conv1]", "data.mean=[1",
                                     "optimizer.lr=.nan", "model.kwargs.a.b=1", "training.epochs.x=1"]))
    return draw(st.text(max_size=20))


def check(load, workdir: Path) -> None:
    """``load()`` gives a valid Recipe that survives the round trip, or raises a one-line ConfigError."""
    try:
        recipe = load()
    except ConfigError as exc:
        lines = str(exc).splitlines()
        # only the report of several invalid values has one line per problem (after a header)
        assert len(lines) == 1 or (lines[0].endswith("invalid values:") and len(lines) >= 3), str(exc)
        return
    assert isinstance(recipe, Recipe)
    text = recipe_to_yaml(recipe)
    again = load_recipe(save_recipe(recipe, workdir / "round_trip.yaml"))
    assert again == recipe, text
    assert recipe_to_yaml(again) == text


@PROPERTY
@given(doc=documents())
@example(doc={"description": "5e-5", "model": {"kwargs": {"x": "1e3", "<<": 1, "y": "2001-01-01", "z": "${w}"}}})
def test_recipe_round_trips_through_yaml(workdir, doc):
    check(lambda: recipe_from_dict(doc), workdir)


@PROPERTY
@given(text=TEXT, kwargs=GOOD["model.kwargs"])
@example(text="${x}", kwargs={"a\\${b}": ["${c}", "\\"]})
def test_any_text_round_trips_as_text(workdir, text, kwargs):
    recipe = Recipe(description=text, output_dir=str(workdir / "out"))
    recipe.model.kwargs = kwargs
    check(lambda: recipe, workdir)


@PROPERTY
@given(doc=documents(), ovr=st.lists(override(), max_size=3))
@example(doc={}, ovr=["training.mixed_precision=no", "model.kwargs.drop_path_rate=0.1"])
@example(doc={"model": {"kwargs": {"a": 1}}}, ovr=["model.kwargs={}"])
def test_overrides_give_a_recipe_or_one_recipe_error(workdir, doc, ovr):
    path = workdir / "doc.yaml"
    path.write_text(OmegaConf.to_yaml(doc), encoding="utf-8")
    check(lambda: load_recipe(path, ovr), workdir)
