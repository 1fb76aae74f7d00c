"""Property tests of the recipe loader: whatever the document or override, the result is a valid
:class:`Recipe` (that survives a YAML round trip) or a one-line :class:`RecipeError`, never a crash.

The documents are built from the real schema (sections and keys read from the dataclasses of
:mod:`st3_hf.train.recipe_schema`) so that most of them get past the key checks into type coercion,
the semantic checks and the round trip; typo keys, values of every YAML type, raw YAML text
(syntax errors, anchors/aliases, unsafe tags) and malformed overrides cover the error paths.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from st3_hf.errors import ConfigError
from st3_hf.train.recipe import CHOICES, RecipeError, load_recipe, parse_override, recipe_from_dict, recipe_to_yaml
from st3_hf.train.recipe_schema import Recipe
# database=None: no .hypothesis/ folder in the checkout; deadline=None: file I/O timing varies on CI
PROPERTY = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HINTS = typing.get_type_hints(Recipe)
SECTIONS: Dict[str, type] = {
    f.name: HINTS[f.name] for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(HINTS[f.name])
}
TOP_SCALARS = [f.name for f in dataclasses.fields(Recipe) if f.name not in SECTIONS]
FIELD_TYPES: Dict[Tuple[str, str], Any] = {
    (section, name): tp for section, cls in SECTIONS.items() for name, tp in typing.get_type_hints(cls).items()
}
ALL_KEYS = sorted({name for _, name in FIELD_TYPES} | set(SECTIONS) | set(TOP_SCALARS))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # module scope: hypothesis reruns the test body many times within one function-scoped fixture
    return tmp_path_factory.mktemp("recipe_property")


# --------------------------------------------------------------------------- strategies

def _typo(name: str) -> st.SearchStrategy[str]:
    """``name`` with one character dropped, doubled or swapped; or an unrelated word."""
    edits = st.integers(0, max(len(name) - 1, 0)).flatmap(lambda i: st.sampled_from([
        name[:i] + name[i + 1:], name[:i] + name[i] * 2 + name[i + 1:] if name else "x",
        name[:i] + name[i + 1:i + 2] + name[i:i + 1] + name[i + 2:], name.upper(), name + "s",
    ]))
    return st.one_of(edits, st.text(max_size=12))


# 16**4000 has more than 4300 digits: str() of it raises ValueError (written in hex by _dump; built by a
# function because hypothesis prints the repr of a sampled_from strategy)
HUGE_INTS = st.one_of(st.sampled_from([10**400, -10**400, 2**63, -2**63 - 1, 2**64, 10**30]),
                      st.builds(lambda sign: sign * 16**4000, st.sampled_from([1, -1])))
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 1e-300])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), ODD_FLOATS,
    st.text(max_size=16), st.sampled_from(["5e-5", "yes", "no", "null", "~", "<<", "2001-13-45", "0x1F",
                                           "1:20", ".nan", "-.inf", "", " ", "a: b", "- x", "&a", "*a"]),
    st.dates(), st.datetimes(),
    st.datetimes(timezones=st.sampled_from([datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=-5))])),
)
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()),
                                               children, max_size=4)),
    max_leaves=12,
)


# values that fit the field and its range (and the fields it must agree with), so that most
# documents get through to the semantic checks and the round trip
GOOD: Dict[str, st.SearchStrategy[Any]] = {
    "model.in_chans": st.just(3),
    "data.input_size": st.builds(lambda h, w: [3, h, w], st.integers(1, 512), st.integers(1, 512)),
    "data.mean": st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3),
    "data.std": st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3),
    "sparsity.start_epoch": st.floats(0.0, 5.0),
    "sparsity.end_epoch": st.floats(5.0, 100.0),
    "lr_schedule.name": st.sampled_from(["cosine", "constant"]),
    "sparsity.method": st.sampled_from(["st3", "st3_sigma", "gmp", "ste_hard"]),
    "data.source": st.sampled_from(["imagefolder", "fashion_mnist"]),
    "model.kwargs": st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-10, 10), st.floats(0, 1),
                                                                  st.text(max_size=8), st.booleans(), st.none(),
                                                                  st.dates(), st.lists(st.integers(0, 9))),
                                    max_size=3),
}


def good(tp: Any, dotted: str) -> st.SearchStrategy[Any]:
    """A value of the field's type, in range."""
    if dotted in GOOD:
        return GOOD[dotted]
    if dotted in CHOICES:
        return st.sampled_from(CHOICES[dotted])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return st.one_of(st.none(), good([a for a in args if a is not type(None)][0], dotted))
    if origin in (list, List):
        return st.lists(good(args[0], dotted), max_size=3)
    if origin in (dict, Dict):
        return GOOD["model.kwargs"]
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(1, 1000)
    if tp is float:
        return st.one_of(st.floats(0.01, 0.99), st.just(1))  # int 1 is read as 1.0 (every range allows it)
    if tp is str:
        return st.text(max_size=12)
    return yaml_values


def edge(tp: Any, dotted: str) -> st.SearchStrategy[Any]:
    """A value of (nearly) the field's type but at or past the edge of its range."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dotted in CHOICES:
        return st.one_of(st.text(max_size=8), st.sampled_from([c.upper() for c in CHOICES[dotted]]), st.booleans())
    if origin is typing.Union:
        return edge([a for a in args if a is not type(None)][0], dotted)
    if origin in (list, List):
        return st.lists(st.one_of(edge(args[0], dotted), good(args[0], dotted)), max_size=5)
    if origin in (dict, Dict):
        return st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), yaml_values, max_size=3)
    if tp is int:
        return st.one_of(st.integers(), st.sampled_from([0, -1, 2**63 - 1]), HUGE_INTS)
    if tp is float:
        return st.one_of(st.floats(), ODD_FLOATS, st.sampled_from([0, 0.0, -1, 1.0, 1]), HUGE_INTS)
    if tp is str:
        return st.one_of(st.sampled_from(["5e-5", "yes", "no", "null", "<<", "2001-01-01", ".nan", "", "a: b",
                                          "'", "#x", "\n", "\u2028", "\x85", "~"]), st.booleans())
    return yaml_values


def value_for(draw, section: str, name: str) -> Any:
    """Mostly a good value; sometimes an edge value or a value of any YAML type."""
    tp, dotted = FIELD_TYPES[(section, name)], f"{section}.{name}"
    roll = draw(st.integers(0, 19))
    return draw(good(tp, dotted) if roll < 16 else edge(tp, dotted) if roll < 19 else yaml_values)


@st.composite
def sections(draw) -> Dict[Any, Any]:
    """A recipe document of real sections and keys; two in five also get one or two perturbations:
    a typo or non-string key, a section that is not a mapping, a value of any type at a real key."""
    doc: Dict[Any, Any] = {}
    for name in draw(st.lists(st.sampled_from(TOP_SCALARS), max_size=2, unique=True)):
        doc[name] = draw(st.text(max_size=12))
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        names = [n for s, n in FIELD_TYPES if s == section]
        doc[section] = {name: value_for(draw, section, name)
                        for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True))}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        where = draw(st.sampled_from(sorted(SECTIONS) + [None]))
        kind = draw(st.integers(0, 3))
        target = doc if where is None else doc.setdefault(where, {})
        if not isinstance(target, dict):
            continue
        if kind == 0:  # a typo of a real key
            names = [n for s, n in FIELD_TYPES if s == where] if where else ALL_KEYS
            target[draw(st.sampled_from(names).flatmap(_typo))] = draw(yaml_values)
        elif kind == 1:  # a key that is not a string
            target[draw(st.one_of(st.integers(), st.floats(), st.none(), st.booleans(), st.dates()))] = 1
        elif kind == 2 and where is not None:  # the section is not a mapping
            doc[where] = draw(st.one_of(scalars, st.lists(scalars, max_size=3)))
        else:  # any YAML value at a real key
            names = [n for s, n in FIELD_TYPES if s == where] if where else TOP_SCALARS
            target[draw(st.sampled_from(names))] = draw(yaml_values)
    return doc


class _Dumper(yaml.SafeDumper):
    """Writes ints too long for str() (> 4300 digits) in hex, which YAML reads back exactly."""


_Dumper.add_representer(int, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:int", hex(value) if value.bit_length() > 10_000 else str(value)))


def _dump(value: Any, flow: bool) -> str:
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=flow, allow_unicode=True, width=1000)


# raw YAML built from fragments: the sections and keys of the schema, anchors, aliases, tags, brackets
FRAGMENTS = st.one_of(
    st.sampled_from(ALL_KEYS + [f"{k}:" for k in ALL_KEYS]),
    st.sampled_from([": ", "\n", "\n  ", "\n    ", "- ", "{", "}", "[", "]", ", ", "&a ", "*a", "&b ", "*b",
                     "<<: *a", "!!python/object:os.system {}", "!!python/name:os.system", "!!python/tuple [1]",
                     "!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!set", "!!omap", "!!str", "!!map",
                     "!foo", "? ", "'", '"', "#", "---", "...", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "\t",
                     "|", ">", "2001-13-45", "2001-12-14t21:59:43.10-05:00", "0b2", "0o9", "0x" + "f" * 20,
                     "1" * 5000, "1e400", ".nan", "-.inf", "~", "null", "yes", "\x00", "\ufeff", "\x85",
                     "\u2028", "\r", "\\x", "@", "`"]),
    st.text(max_size=6),
)
raw_yaml = st.one_of(
    st.lists(FRAGMENTS, max_size=30).map("".join),
    st.builds(lambda doc, flow: _dump(doc, flow), sections(), st.booleans()),
    st.text(max_size=80),
)


@st.composite
def mutated_yaml(draw) -> str:
    """A valid recipe document with a few characters inserted or deleted (near-miss syntax errors)."""
    text = _dump(draw(sections()), draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and i < len(text):
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + draw(st.sampled_from([":", " ", "\n", "[", "{", "'", "-", "&x ", "*x", "\t"])) + text[i:]
    return text


def _value_text(value: Any) -> str:
    text = _dump(value, True).strip()
    return text[:-3].strip() if text.endswith("...") else text


@st.composite
def override(draw) -> str:
    """``section.key=value`` with real keys and mostly good values; or typo keys, junk values, malformed."""
    kind = draw(st.integers(0, 19))
    if kind < 15:
        section, name = draw(st.sampled_from(sorted(FIELD_TYPES)))
        return f"{section}.{name}={_value_text(value_for(draw, section, name))}"
    if kind == 15:
        section, name = draw(st.sampled_from(sorted(FIELD_TYPES)))
        key = f"{section}.{draw(_typo(name))}" if draw(st.booleans()) else \
            f"{section}.{name}.{draw(st.text(max_size=5))}"  # deeper than the schema (model.kwargs.x is fine)
        return f"{key}={_value_text(draw(yaml_values))}"
    if kind == 16:
        return f"{draw(st.sampled_from(TOP_SCALARS + sorted(SECTIONS)))}={_value_text(draw(yaml_values))}"
    if kind == 17:  # the value is random text: YAML syntax errors, tags, aliases
        return f"{draw(st.sampled_from(ALL_KEYS))}.{draw(st.sampled_from(ALL_KEYS))}={draw(raw_yaml)}"
    if kind == 18:
        return draw(st.sampled_from(["training.max_steps", "max_steps", "=3", ".epochs=1", "training.=1",
                                     "training..epochs=1", " = ", "inherit=base.yaml", "inherit.x=1",
                                     "inherit=[a.yaml]", "model.kwargs.a.b=1", "training.epochs.x=1",
                                     "output_dir.x=1", "model=3", "model={}", "model.kwargs=&x [*x]",
                                     "training.seed=" + "9" * 5000, "optimizer.lr=.nan",
                                     "training.collective_timeout_s=-.inf", "description=a\nb",
                                     "training.max_consecutive_nonfinite_steps=0"]))
    return draw(st.text(max_size=30))


overrides = st.lists(override(), max_size=3)


# --------------------------------------------------------------------------- the property

# each level multiplies by 10: 10**9 strings if copied naively
BILLION_LAUGHS_KWARGS = ("model:\n  kwargs:\n    a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    {c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))


def check(load, workdir: Path) -> None:
    """``load()`` gives a valid, round-trippable Recipe or raises a clear RecipeError."""
    try:
        recipe = load()
    except RecipeError as exc:
        assert isinstance(exc, ConfigError)
        message = str(exc)
        assert message.strip()
        lines = message.splitlines()
        # only the report of several invalid values has one line per problem (after a header)
        assert len(lines) == 1 or (lines[0].endswith("invalid values:") and len(lines) >= 3), message
        # `--hypothesis-show-statistics` shows how deep the examples got
        kinds = ["invalid YAML", "invalid value", "unknown key", "must be a mapping", "is not a string",
                 "must be", "override"]
        event("error: " + next((kind for kind in kinds if kind in message), "other"))
        return
    event("valid recipe")
    assert isinstance(recipe, Recipe)
    text = recipe_to_yaml(recipe)
    path = workdir / "round_trip.yaml"
    path.write_text(text, encoding="utf-8")
    again = load_recipe(path)
    assert again == recipe, text
    assert recipe_to_yaml(again) == text


@PROPERTY
@given(doc=sections(), flow=st.booleans(), ovr=overrides,
       inherit=st.sampled_from([None, None, "base", "base", "self", "missing", "list"]), base=sections())
@example(doc={}, flow=False, ovr=["optimizer.lr=.nan"], inherit=None, base={})
@example(doc={"description": "5e-5", "model": {"kwargs": {"x": "1e3", "<<": 1, "y": "2001-01-01"}}},
         flow=False, ovr=[], inherit=None, base={})
@example(doc={"training": {"collective_timeout_s": math.inf, "max_consecutive_nonfinite_steps": 0}},
         flow=True, ovr=[], inherit=None, base={})
@example(doc={"optimizer": {"lr": 10**400}, "sparsity": {"start_epoch": -10**400}}, flow=False, ovr=[],
         inherit=None, base={})
@example(doc={"model": {"kwargs": {"d": datetime.date(2001, 1, 1), "n": [math.nan]}}}, flow=False, ovr=[],
         inherit="base", base={"model": {"kwargs": {"n": 1}}})
def test_recipe_files_load_or_raise_recipe_error(workdir, doc, flow, ovr, inherit, base):
    path = workdir / "doc.yaml"
    if inherit is not None:  # the document inherits a base (or itself, or a file that does not exist)
        (workdir / "base.yaml").write_text(_dump(base, flow), encoding="utf-8")
        doc = {"inherit": {"base": "base.yaml", "self": "doc.yaml", "missing": "nope.yaml",
                           "list": ["base.yaml", "base.yaml"]}[inherit], **doc}
    path.write_text(_dump(doc, flow), encoding="utf-8")
    check(lambda: load_recipe(path, ovr), workdir)


@PROPERTY
@given(text=st.one_of(raw_yaml, mutated_yaml()), ovr=overrides)
@example(text="a: 2001-13-45\n", ovr=[])
@example(text="description: 2001-13-45\n", ovr=[])
@example(text="model: {kwargs: {a: !!int ''}}\n", ovr=[])
@example(text="model: {kwargs: {a: !!bool maybe, b: !!timestamp foo}}\n", ovr=[])
@example(text="training: {seed: " + "1" * 5000 + "}\n", ovr=[])
@example(text="training: {seed: 0x" + "f" * 5000 + "}\n", ovr=[])
@example(text="model: {kwargs: {a: " + "[" * 3000 + "]" * 3000 + "}}\n", ovr=[])
@example(text="model: {kwargs: &x {a: *x}}\n", ovr=[])
@example(text="model: &x {kwargs: *x}\n", ovr=[])
@example(text="model: {kwargs: {a: &x [*x]}}\n", ovr=[])
@example(text=BILLION_LAUGHS_KWARGS, ovr=[])
@example(text="model: !!python/object:os.system {}\n", ovr=[])
@example(text="training: {epochs: [1\n", ovr=[])
@example(text="model: {kwargs: {a: 1}}\n", ovr=["model.kwargs.a.b=&x [*x]"])
@example(text="\ufeffdescription: bom\n", ovr=[])
def test_raw_yaml_loads_or_raises_recipe_error(workdir, text, ovr):
    path = workdir / "raw.yaml"
    path.write_text(text, encoding="utf-8")
    check(lambda: load_recipe(path, ovr), workdir)


@PROPERTY
@given(data=st.binary(max_size=60))
@example(data=b"description: \xff\xfe\n")
def test_undecodable_files_raise_recipe_error(workdir, data):
    path = workdir / "bytes.yaml"
    path.write_bytes(data)
    check(lambda: load_recipe(path), workdir)


@PROPERTY
@given(doc=st.one_of(sections(), sections(), st.dictionaries(st.sampled_from(ALL_KEYS), yaml_values, max_size=3)),
       ovr=overrides)
@example(doc={"inherit": "base.yaml"}, ovr=[])
@example(doc={"model": {"kwargs": {"a": 2**64}}}, ovr=[])
def test_recipe_from_dict_returns_recipe_or_raises_recipe_error(workdir, doc, ovr):
    check(lambda: recipe_from_dict(doc, ovr), workdir)


@PROPERTY
@given(text=override())
def test_parse_override_returns_path_and_value_or_raises_recipe_error(text):
    try:
        path, _ = parse_override(text)
    except RecipeError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return
    assert path and all(isinstance(part, str) and part for part in path)
