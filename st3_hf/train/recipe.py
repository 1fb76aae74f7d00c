"""Load, validate, override and save recipes (one YAML file per training run).

A recipe is a YAML mapping whose sections mirror the dataclasses of
:mod:`st3_hf.train.recipe_schema` (``model``, ``data``, ``optimizer``, ``lr_schedule``,
``sparsity``, ``training``, ``evaluation``, ``hub``, ``logging``, ``expected``) plus
the top-level keys ``output_dir`` and ``description``.  Everything is checked
before any work starts: unknown keys (with a "did you mean" hint), value types,
and the values that only a few choices make sense for.

A recipe may start with ``inherit: base/some_base.yaml`` (a path relative to the
recipe, or a list of such paths); the base is loaded first and the recipe's own
keys are deep-merged over it.  Command-line style overrides ``section.key=value``
are applied last; their values are parsed as YAML (``training.max_steps=20``,
``sparsity.exclude=[fc]``, ``training.resume_from_checkpoint=null``).

Example::

    >>> from st3_hf.train.recipe import load_recipe, resolve_lr
    >>> recipe = load_recipe("recipes/r50_st3_90.yaml", ["training.max_steps=20"])
    >>> recipe.training.max_steps, recipe.sparsity.target
    (20, 0.9)
    >>> resolve_lr(recipe, num_processes=8)  # 0.2 * (256 * 8) / 512
    0.8
"""
from __future__ import annotations

import dataclasses
import functools
import difflib
import math
import re
import reprlib
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from st3_hf.errors import ConfigError
from st3_hf.train.recipe_schema import CHOICES, RANGES, Recipe, SparsityRecipe, sparsity_config

__all__ = [
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    "validate_recipe",
    "recipe_to_dict",
    "recipe_to_yaml",
    "save_recipe",
    "global_batch_size",
    "resolve_lr",
    "parse_override",
    "keys_given",
]

INHERIT_KEY = "inherit"

Path_ = Tuple[str, ...]

# Limits on the data of one document: YAML aliases let a few lines expand to billions of values
# ("billion laughs") or refer to themselves (`a: &x [*x]`), and nothing in a recipe is nested deeply.
MAX_VALUES = 100_000
MAX_DEPTH = 64
# ints are handed to torch / numpy / the OS (seeds, sizes, step counts): 64 bits is what they take
INT_LIMIT = 2**63


class RecipeError(ConfigError):
    """A recipe file, an override or a recipe value is invalid (raised before any work starts)."""


# --------------------------------------------------------------------------- YAML

class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``5e-5`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``5.0e-5``); ``5e-5`` would
    silently become the *string* "5e-5".  YAML 1.2 (and every user) reads it as a number.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise bare ValueError / KeyError / IndexError / AttributeError
        # on malformed values (`2001-13-45`, `!!bool maybe`, `!!int ''`, a 5000-digit int):
        # report them like any other YAML error, at the value's line and column
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            shown = _show(node.value) if isinstance(node, yaml.ScalarNode) else "value"
            # a ValueError says why ("month must be in 1..12"); the others only leak PyYAML internals
            why = f" ({_one_line(str(exc))})" if isinstance(exc, ValueError) and str(exc) else ""
            raise yaml.constructor.ConstructorError(None, None, f"invalid {kind} {shown}{why}",
                                                    node.start_mark) from exc


_FLOAT_RESOLVER = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RESOLVER, list("-+0123456789."))


class _RecipeDumper(yaml.SafeDumper):
    """Block-style mappings, one-line lists (``input_size: [3, 224, 224]``)."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # PyYAML writes NEL (U+0085) raw inside a single-quoted scalar, where reading folds it into a
    # space: escape it in a double-quoted scalar (as \\N) so that the string reads back unchanged
    style = '"' if "\x85" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_RecipeDumper.add_representer(str, _represent_str)
# the dumper quotes a string only if its resolver would read it as something else: without the
# loader's float rule the string "5e-5" would be written bare and read back as a float
_RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RESOLVER, list("-+0123456789."))


class _YAMLProblem(Exception):
    """A YAML text that cannot be read: where (1-based line and column, when known), why, what to do."""

    def __init__(self, line: Optional[int], column: Optional[int], problem: str, hint: str):
        super().__init__(problem)
        self.line, self.column, self.problem, self.hint = line, column, problem, hint

    def where(self, name: str) -> str:
        """``name:line:column`` (what editors and CI logs link to), or ``name`` alone."""
        return f"{name}:{self.line}:{self.column}" if self.line is not None else name


def _yaml_load(text: str) -> Any:
    """The data of ``text``; raises :class:`_YAMLProblem` (never a bare PyYAML or Python error)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or type(exc).__name__
        if problem.startswith("but ") and exc.context:  # "expected a single document ... but found another"
            problem = f"{exc.context} {problem}"
        began = ""
        if exc.context and exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            # PyYAML notices a missing ':' or ']' lines later; the context says where the construct began
            began = f"; {exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        if isinstance(exc, yaml.constructor.ConstructorError):
            hint = ("a recipe holds plain data only: no Python or custom tags"
                    if "could not determine a constructor" in problem
                    else "fix the value at that line, or quote it to keep it a string")
        else:
            hint = "fix the syntax between those lines" if began else "fix the syntax at that line"
        problem += began
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise _YAMLProblem(line, column, _one_line(problem), hint) from exc
    except yaml.reader.ReaderError as exc:
        # a character YAML does not allow (NUL, most control characters): no mark, only a position
        pos = max(0, min(exc.position, len(text)))
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise _YAMLProblem(line, column, f"special character #x{char:04x} is not allowed",
                           "remove it or write it escaped in a double-quoted string") from exc
    except yaml.YAMLError as exc:
        raise _YAMLProblem(None, None, _one_line(str(exc)), "fix the syntax") from exc
    except RecursionError as exc:  # PyYAML composes nested collections recursively
        raise _YAMLProblem(None, None, "collections are nested too deeply",
                           f"a recipe nests at most {MAX_DEPTH} levels") from exc


# --------------------------------------------------------------------------- schema helpers

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    # the schema uses `from __future__ import annotations`: resolve the strings
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# every character str.splitlines() breaks at, escaped: a single-problem message stays on one line
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(text: str) -> str:
    """``text`` (a key, an override, a YAML problem) with its line breaks escaped."""
    return str(text).translate(_LINE_BREAKS)


class _ShortRepr(reprlib.Repr):
    """Short reprs of user values for messages (a list of 10**5 items, a 400-digit int)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 6, 8, 8, 6
        self.maxstring, self.maxother = 80, 80

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr of a > 4300-digit int even raises ValueError
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return repr(x)


_SHORT_REPR = _ShortRepr()


def _show(value: Any) -> str:
    """A short one-line repr of a user value."""
    return _one_line(_SHORT_REPR.repr(value))


def _fmt_path(path: Path_) -> str:
    return _one_line(".".join(str(p) for p in path))


def _valid_keys_text(cls: type, section: Path_) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"section '{_fmt_path(section)}'" if section else "the top level"
    extra = [INHERIT_KEY] if not section else []
    return f"valid keys of {where}: {', '.join(names + extra)}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        names = " or ".join(_type_name(a) for a in inner)
        return f"{names} or null" if len(inner) < len(args) else names
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping with string keys"
    if origin is Literal:
        return "str"  # which strings: the semantic check lists them (with the closest)
    return "any value" if tp is Any else tp.__name__


_NO_MATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as the annotation ``tp`` (int -> float is allowed, bool -> number is not), or ``_NO_MATCH``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        tried = (_coerce(value, arg) for arg in args if arg is not type(None))
        return next((out for out in tried if out is not _NO_MATCH), _NO_MATCH)
    if origin in (list, dict):
        if not isinstance(value, origin):
            return _NO_MATCH
        if origin is list:
            items = [_coerce(v, args[0]) for v in value]
        else:
            items = [(_coerce(k, args[0]), _coerce(v, args[1])) for k, v in value.items()]
        if any(_NO_MATCH in (pair if origin is dict else (pair,)) for pair in items):
            return _NO_MATCH
        return dict(items) if origin is dict else items
    if tp is str or origin is Literal:
        # YAML 1.1 reads a bare `no` as False: `training.mixed_precision=no` means the string
        return ("yes" if value else "no") if isinstance(value, bool) else value if isinstance(value, str) else _NO_MATCH
    if isinstance(value, bool) or tp is bool:
        return value if tp is bool and isinstance(value, bool) else _NO_MATCH
    if tp is float and isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range reads like YAML's 1e400: infinity
            return math.inf if value > 0 else -math.inf
    return value if type(value) is tp else _NO_MATCH


# --------------------------------------------------------------------------- raw dict handling

class _Source:
    """Where a raw value came from, for error messages."""

    def __init__(self, recipe_path: Path, file: Path, override: Optional[str] = None):
        self.recipe_path = recipe_path
        self.file = file
        self.override = override

    def __str__(self) -> str:
        if self.override is not None:
            return _one_line(f"{self.recipe_path}: override '{self.override}'")
        if self.file != self.recipe_path:
            return _one_line(f"{self.file} (inherited by {self.recipe_path})")
        return _one_line(str(self.file))


def _check_keys(raw: Mapping[str, Any], source: _Source, cls: type = Recipe, prefix: Path_ = ()) -> None:
    """Unknown keys and non-mapping sections, reported against the file that has them."""
    hints = _hints(cls)
    for key, value in raw.items():
        path = prefix + (str(key),)
        if not isinstance(key, str):
            raise RecipeError(f"{source}: key {_show(key)} of {_fmt_path(prefix) or 'the top level'} is not a string; "
                              f"{_valid_keys_text(cls, prefix)}")
        if key == INHERIT_KEY and not prefix:
            if source.override is None:
                continue
            raise RecipeError(f"{source}: '{INHERIT_KEY}' cannot be overridden (edit the recipe file); "
                              f"{_valid_keys_text(cls, prefix)}")
        if key not in hints:
            candidates = list(hints) + ([INHERIT_KEY] if not prefix else [])
            close = difflib.get_close_matches(key, candidates, n=1)
            hint = f" (did you mean '{_fmt_path(prefix + (close[0],))}'?)" if close else ""
            raise RecipeError(f"{source}: unknown key '{_fmt_path(path)}'{hint}; {_valid_keys_text(cls, prefix)}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise RecipeError(
                    f"{source}: '{_fmt_path(path)}' is a section and must be a mapping of keys, got "
                    f"{type(value).__name__} {_show(value)}; {_valid_keys_text(tp, path)}"
                )
            _check_keys(value, source, tp, path)


def _deep_merge(base: Dict[str, Any], over: Mapping[str, Any], origins: Dict[Path_, _Source],
                source: _Source, prefix: Path_ = ()) -> Dict[str, Any]:
    """Merge ``over`` into ``base`` in place: mappings merge key by key, everything else replaces.

    ``origins`` records which file (or override) set each value, for error messages.
    """
    for key, value in over.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, origins, source, path)
            continue
        base[key] = _copy(value)
        for stale in [p for p in origins if p[: len(path)] == path]:
            del origins[stale]
        origins[path] = source
    return base


def _copy(value: Any) -> Any:
    """A copy of plain data that shares nothing (YAML aliases share): call it on checked data only."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return [_copy(v) for v in value] if isinstance(value, list) else value


def _check_data(value: Any, source: Any, prefix: Path_ = ()) -> None:
    """Refuse data that refers to itself, nests deeper than ``MAX_DEPTH`` or expands past ``MAX_VALUES``.

    YAML aliases are shared references: a 10-line file can stand for 10**9 values, or for a list
    that contains itself; copying, comparing or printing either would hang or overflow the stack.
    """
    budget = [MAX_VALUES]
    active: set = set()  # ids of the collections on the current path (a repeat is a cycle)

    def walk(item: Any, path: Path_) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise RecipeError(f"{source}: '{_fmt_path(path)}' takes the recipe past {MAX_VALUES} values "
                              f"(YAML aliases that multiply?); a recipe holds small, plain data")
        if not isinstance(item, (dict, list)):
            return
        if id(item) in active:
            raise RecipeError(f"{source}: '{_fmt_path(path)}' contains itself (a recursive YAML alias "
                              f"such as `a: &x [*x]`); a recipe holds plain, finite data")
        if len(path) - len(prefix) >= MAX_DEPTH:
            raise RecipeError(f"{source}: '{_fmt_path(path)}' is nested more than {MAX_DEPTH} levels deep; "
                              f"a recipe holds plain, shallow data")
        active.add(id(item))
        if isinstance(item, dict):
            for key, sub in item.items():
                walk(key, path + (_show(key),))
                walk(sub, path + (str(key),))
        else:
            for index, sub in enumerate(item):
                walk(sub, path[:-1] + (f"{path[-1] if path else ''}[{index}]",))
        active.discard(id(item))

    walk(value, prefix)


def _origin(origins: Mapping[Path_, _Source], path: Path_, default: _Source) -> _Source:
    for n in range(len(path), 0, -1):
        if path[:n] in origins:
            return origins[path[:n]]
    return default


def _read_file(path: Path, recipe_path: Path, chain: Tuple[Path, ...],
               origins: Dict[Path_, _Source]) -> Dict[str, Any]:
    """The raw mapping of ``path`` with its ``inherit`` chain merged in (base first)."""
    source = _Source(recipe_path, path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{source}: cannot read recipe file ({_one_line(exc.strerror or str(exc))})") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{source}: is not UTF-8 text (byte {exc.start}: {_one_line(exc.reason)}); "
                          f"save the recipe as UTF-8") from exc
    try:
        raw = _yaml_load(text)
    except _YAMLProblem as exc:
        where = _one_line(exc.where(str(path)))
        inherited = _one_line(f"; {path} is inherited by {recipe_path}") if path != recipe_path else ""
        raise RecipeError(f"{where}: invalid YAML: {exc.problem} ({exc.hint}){inherited}") from exc
    _check_data(raw, source)
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: a recipe must be a YAML mapping of sections, got "
            f"{'an empty file' if raw is None else type(raw).__name__}; {_valid_keys_text(Recipe, ())}"
        )
    _check_keys(raw, source)

    merged: Dict[str, Any] = {}
    parents = raw.pop(INHERIT_KEY, None)
    if parents is not None:
        if isinstance(parents, str):
            parents = [parents]
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise RecipeError(f"{source}: '{INHERIT_KEY}' must be a path (or a list of paths) relative to the "
                              f"recipe, got {parents!r}; {_valid_keys_text(Recipe, ())}")
        for parent in parents:
            parent_path = (path.parent / parent).resolve()
            if parent_path in chain:
                cycle = " -> ".join(str(p) for p in chain + (parent_path,))
                raise RecipeError(f"{source}: '{INHERIT_KEY}' forms a cycle: {cycle}")
            if not parent_path.is_file():
                raise RecipeError(f"{source}: '{INHERIT_KEY}: {parent}' does not exist (looked for {parent_path}; "
                                  f"the path is relative to the recipe file); {_valid_keys_text(Recipe, ())}")
            _deep_merge(merged, _read_file(parent_path, recipe_path, chain + (parent_path,), origins),
                        origins, _Source(recipe_path, parent_path))
    return _deep_merge(merged, raw, origins, source)


def parse_override(text: str) -> Tuple[Path_, Any]:
    """``"training.max_steps=20"`` -> ``(("training", "max_steps"), 20)``; the value is parsed as YAML.

    >>> parse_override("sparsity.exclude=[fc]")
    (('sparsity', 'exclude'), ['fc'])
    """
    shown = _one_line(text)
    if "=" not in text:
        raise RecipeError(f"override '{shown}' is not of the form section.key=value (missing '=')")
    key, value_text = text.split("=", 1)
    path = tuple(part.strip() for part in key.strip().split("."))
    if not path or any(not part for part in path):
        raise RecipeError(f"override '{shown}' has an empty key (expected section.key=value)")
    try:
        value = _yaml_load(value_text)
    except _YAMLProblem as exc:
        where = "" if exc.line is None else \
            f" at line {exc.line}, column {exc.column}" if exc.line > 1 else f" at column {exc.column}"
        hint = exc.hint if "plain data" in exc.hint else "quote the value to make it a string"
        raise RecipeError(f"override '{shown}': value is not valid YAML{where}: {exc.problem} ({hint})") from exc
    _check_data(value, f"override '{shown}'", path)
    return path, value


def _keys_hint(text: str) -> str:
    """Valid keys of the section a (malformed) override seems to aim at, else of the top level."""
    first = text.split("=", 1)[0].strip().split(".")[0]
    tp = _hints(Recipe).get(first)
    return _valid_keys_text(tp, (first,)) if _is_dataclass_type(tp) else _valid_keys_text(Recipe, ())


def _nest(path: Path_, value: Any) -> Dict[str, Any]:
    for key in reversed(path[1:]):
        value = {key: value}
    return {path[0]: value}


# --------------------------------------------------------------------------- typed construction

def _build(cls: type, raw: Mapping[str, Any], origins: Mapping[Path_, _Source], default: _Source,
           prefix: Path_ = ()) -> Any:
    hints = _hints(cls)
    kwargs: Dict[str, Any] = {}
    for key, value in raw.items():
        path = prefix + (key,)
        tp = hints[key]  # unknown keys were rejected by _check_keys
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value, origins, default, path)
            continue
        converted = _coerce(value, tp)
        if converted is _NO_MATCH:
            raise RecipeError(
                f"{_origin(origins, path, default)}: '{_fmt_path(path)}' must be {_type_name(tp)}, got "
                f"{type(value).__name__} {_show(value)}; {_valid_keys_text(cls, prefix)}"
            )
        kwargs[key] = converted
    return cls(**kwargs)


def _bad_number(value: Any) -> Optional[str]:
    """Why ``value`` (a field's value, lists and mappings included) holds a number torch cannot take:
    NaN / inf (``nan <= 0`` is False: range rules would let it through) or an int beyond 64 bits."""
    stack, seen = [value], set()  # a recipe built in code may hold a self-referencing kwargs
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) not in seen:
                seen.add(id(item))
                stack.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
        elif isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number, got {_show(item)}" if item is value else \
                f"must hold finite numbers only, got {_show(item)} in {_show(value)}"
        elif isinstance(item, int) and not isinstance(item, bool) and not -INT_LIMIT <= item < INT_LIMIT:
            return f"must fit a 64-bit integer (|value| < 2**63), got {_show(item)}"
    return None


def _field_errors(recipe: Recipe) -> List[Tuple[str, str]]:
    """Each field against its own declaration: finite numbers, its ``Literal`` choices, its range rule."""
    errors = []
    for section in dataclasses.fields(recipe):
        config = getattr(recipe, section.name)
        for f in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
            value, dotted = getattr(config, f.name), f"{section.name}.{f.name}"
            problem = _bad_number(value)
            if problem is None and dotted in CHOICES and value not in CHOICES[dotted]:
                close = difflib.get_close_matches(str(value), CHOICES[dotted], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problem = f"is {_show(value)}{hint}; valid values: {', '.join(CHOICES[dotted])}"
            if problem is None and "range" in f.metadata and value is not None:
                check, text = RANGES[f.metadata["range"]]
                problem = None if check(value) else f"{text}, got {_show(value)}"
            if problem:
                errors.append((dotted, problem))
    return errors


def _cross_field_errors(recipe: Recipe) -> List[Tuple[str, str]]:
    """The rules that tie fields together (several sections, or one key only some methods read)."""
    from st3_hf.sparse.config import SparsityConfigError
    from st3_hf.train.lrr import round_sparsity
    sp, data, model, errors = recipe.sparsity, recipe.data, recipe.model, []

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            errors.append((key, problem))

    unset = SparsityRecipe()
    try:  # the method's own rules are the core's (SparsityConfig), stated once there
        if not any(_bad_number(value) for value in dataclasses.astuple(sp)):
            sparsity_config(sp, steps_per_epoch=1)
    except SparsityConfigError as exc:  # a core-only key (criterion, ...) follows from the method
        key = {"start_step": "start_epoch"}.get(exc.key, exc.key if hasattr(unset, exc.key) else "method")
        need(False, f"sparsity.{key}", exc.problem)
    need(sp.start_epoch <= sp.end_epoch, "sparsity.start_epoch",
         f"must be <= sparsity.end_epoch, got start_epoch={sp.start_epoch} > end_epoch={sp.end_epoch}")
    for key in ("probas_lr", "probas_momentum", "probas_weight_decay"):
        need(getattr(sp, key) == getattr(unset, key) or sp.method == "probmask", f"sparsity.{key}",
             f"is a probmask setting; sparsity.method {_show(sp.method)} does not use it "
             f"(remove it or set sparsity.method=probmask)")
    need(sp.method != "probmask" or recipe.optimizer.name == "sgd" or sp.probas_momentum is None,
         "sparsity.probas_momentum", "applies to optimizer.name sgd only")
    need(recipe.optimizer.lr is not None or recipe.optimizer.base_lr > 0, "optimizer.base_lr",
         f"must be > 0, got {recipe.optimizer.base_lr}")
    need(recipe.lr_schedule.name != "step" or bool(recipe.lr_schedule.milestones), "lr_schedule.milestones",
         "must list the decay epochs when lr_schedule.name is 'step'")
    every, epochs = recipe.evaluation.every_epochs, recipe.training.epochs
    # the rewind reloads the best evaluation of the run / round before it: its last epoch must be evaluated
    need(sp.schedule == "ramp" or every <= 0 or epochs % every == 0, "evaluation.every_epochs",
         f"must divide training.epochs={_show(epochs)} for sparsity.schedule {_show(sp.schedule)} (the rewind "
         f"reloads the best evaluation of each run or round), got {_show(every)}")
    if sp.schedule == "iterative":
        need(sp.method == "gmp", "sparsity.method", "must be 'gmp' for sparsity.schedule iterative (hard "
                                                    f"threshold, masked gradients), got {_show(sp.method)}")
        need(sp.rounds >= 2, "sparsity.rounds", f"must be >= 2 for sparsity.schedule iterative (round 0 is "
                                                f"dense), got {_show(sp.rounds)}")
        need(0.0 < sp.round_fraction < 1.0, "sparsity.round_fraction", f"must be in (0, 1), got {sp.round_fraction}")
        if 2 <= sp.rounds < INT_LIMIT and 0.0 < sp.round_fraction < 1.0:
            final = round_sparsity(sp.rounds - 1, sp.round_fraction)
            need(abs(sp.target - final) <= 1e-6, "sparsity.target", f"must be 1 - (1 - round_fraction)^(rounds - 1) "
                                                                    f"= {final:.6f} for sparsity.schedule iterative, "
                                                                    f"got {sp.target}")
    else:
        for key in ("rounds", "round_fraction"):
            need(getattr(sp, key) == getattr(unset, key), f"sparsity.{key}", f"is an iterative-pruning setting; sparsity.schedule "
                                                                 f"{_show(sp.schedule)} does not use it "
                                                                 "(set sparsity.schedule=iterative)")
        need(sp.schedule != "lrr" or sp.method != "dense", "sparsity.schedule",
             "lrr rewinds a pruning run: sparsity.method 'dense' prunes nothing")
    # input size and mean/std that a recipe leaves to its pretrained start are checked once they are
    # known (st3_hf.train.modeling.with_start_preprocessing validates again)
    if model.pretrained is False or not {"input_size", "mean", "std"} - keys_given(data):
        if len(data.input_size) != 3:
            need(False, "data.input_size", f"must be [channels, height, width], got {_show(data.input_size)}")
        else:
            need(data.input_size[0] == model.in_chans, "data.input_size",
                 f"has {_show(data.input_size[0])} channels but model.in_chans is {_show(model.in_chans)}")
            for name in ("mean", "std"):
                need(len(getattr(data, name)) == data.input_size[0], f"data.{name}", f"needs one value per channel "
                     f"({_show(data.input_size[0])}), got {_show(getattr(data, name))}")
    need(all(s > 0 for s in data.std), "data.std", f"values must be > 0, got {_show(data.std)}")
    need(not isinstance(model.pretrained, str) or bool(model.pretrained.strip()), "model.pretrained",
         "is an empty string; give true, a Hub id (ORG/NAME) or a folder")
    need(model.pretrained is False or not model.init_from, "model.pretrained",
         "and model.init_from are both set: model.init_from continues a sparse export with frozen masks, "
         "model.pretrained prunes dense weights; choose one")
    need(data.source != "hf" or bool(data.hf_name or data.root), "data.hf_name",
         "data.source 'hf' needs data.hf_name (or data.root, a saved dataset)")
    return errors


def _semantic_errors(recipe: Recipe) -> List[Tuple[str, str]]:
    """``(dotted key, problem)`` for each value that has the right type but makes no sense."""
    errors = _field_errors(recipe)
    # a key that is NaN / inf / huge or out of range gets that one problem, not also a cross-field verdict
    bad = {key for key, _ in errors}
    return errors + [(key, problem) for key, problem in _cross_field_errors(recipe) if key not in bad]


def validate_recipe(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """Check the values of a typed recipe (choices, ranges, consistency); raise :class:`RecipeError`.

    :func:`load_recipe` calls this; call it yourself for a :class:`Recipe` built in code.

    >>> validate_recipe(Recipe()).sparsity.method
    'st3'
    """
    src = Path(source)
    _raise_semantic_errors(recipe, src, {}, _Source(src, src))
    return recipe


def _raise_semantic_errors(recipe: Recipe, recipe_path: Path, origins: Mapping[Path_, _Source],
                           default: _Source) -> None:
    errors = _semantic_errors(recipe)
    if not errors:
        return
    lines = []
    for key, problem in errors:
        origin = _origin(origins, tuple(key.split(".")), default)
        section = key.split(".")[0]
        section_cls = _hints(Recipe)[section]
        lines.append(f"{origin}: '{key}' {problem} ({_valid_keys_text(section_cls, (section,))})")
    if len(lines) == 1:  # one problem, one line (the scripts print it as is)
        origin = _origin(origins, tuple(errors[0][0].split(".")), default)
        raise RecipeError(lines[0].replace(f"{origin}: ", f"{origin}: invalid value: ", 1))
    raise RecipeError(f"{_one_line(str(recipe_path))}: invalid values:\n" + "\n".join("  " + line for line in lines))


# --------------------------------------------------------------------------- public API

def recipe_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Recipe:
    """A validated :class:`Recipe` from a plain mapping (as a recipe file would hold; no ``inherit``).

    >>> recipe_from_dict({"training": {"epochs": 3}}).training.epochs
    3
    """
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(raw).__name__}; "
                          f"{_valid_keys_text(Recipe, ())}")
    name = Path(source)
    src = _Source(name, name)
    _check_data(dict(raw), src)  # _copy would recurse forever on a mapping that contains itself
    raw = _copy(dict(raw))
    _check_keys(raw, src)
    if INHERIT_KEY in raw:
        raise RecipeError(f"{source}: '{INHERIT_KEY}' is only supported in recipe files (load_recipe)")
    return _finish(raw, overrides, name, {}, src)


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``inherit``), override and validate a recipe file.

    Raises :class:`RecipeError` naming the file, the dotted key and the valid keys
    of its section on any unknown key, wrong type, malformed override or invalid value
    (one line per problem; invalid YAML as ``file:line:column: invalid YAML: ...``).
    Nothing else escapes: bad dates, NaN, huge ints, recursive or exploding aliases included.

    >>> r = load_recipe("recipes/quickstart.yaml", ["training.max_steps=20", "output_dir=/tmp/x"])
    >>> r.output_dir, r.training.max_steps
    ('/tmp/x', 20)
    """
    if isinstance(overrides, str):  # a lone "a.b=c" would otherwise be iterated character by character
        overrides = [overrides]
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise RecipeError(f"{recipe_path}: recipe file not found")
    origins: Dict[Path_, _Source] = {}
    raw = _read_file(recipe_path, recipe_path, (recipe_path.resolve(),), origins)
    return _finish(raw, overrides, recipe_path, origins, _Source(recipe_path, recipe_path))


def _finish(raw: Dict[str, Any], overrides: Sequence[str], recipe_path: Path,
            origins: Dict[Path_, _Source], default: _Source) -> Recipe:
    for text in overrides:
        src = _Source(recipe_path, recipe_path, override=text)
        try:
            key_path, value = parse_override(text)
        except RecipeError as exc:
            raise RecipeError(f"{recipe_path}: {exc}; {_keys_hint(text)}") from exc
        nested = _nest(key_path, value)
        _check_keys(nested, src)
        # an override replaces the value at its key (`model.kwargs={}` empties it), it does not merge
        parent = raw
        for key in key_path[:-1]:
            if not isinstance(parent.get(key), dict):
                parent[key] = {}
            parent = parent[key]
        parent.pop(key_path[-1], None)
        _deep_merge(raw, nested, origins, src)
    recipe = _build(Recipe, raw, origins, default)
    # which data keys the recipe (its bases, its overrides) set: the others may come from a pretrained model
    object.__setattr__(recipe.data, GIVEN_KEYS_ATTR, frozenset(raw.get("data") or {}))
    _raise_semantic_errors(recipe, recipe_path, origins, default)
    _resolve_paths(recipe, origins, default)
    return recipe


def _resolve_paths(recipe: Recipe, origins: Mapping[Path_, _Source], default: _Source) -> None:
    """Relative ``model.init_from`` / ``model.pretrained`` paths against the folder of the file that set
    them (the working directory for an override or a recipe built from a dict), like ``inherit:``."""
    from st3_hf.train.init_source import LOCAL_PREFIX, resolve_init_from

    def base_of(key: str) -> Path:
        source = _origin(origins, ("model", key), default)
        from_file = source.override is None and source.file.is_file()
        return source.file.resolve().parent if from_file else Path.cwd()

    if recipe.model.init_from:
        recipe.model.init_from = resolve_init_from(recipe.model.init_from, base_of("init_from"))
    start = recipe.model.pretrained
    if isinstance(start, str) and start:
        local = start.startswith(LOCAL_PREFIX)
        path = start[len(LOCAL_PREFIX):] if local else start
        resolved = resolve_init_from(path, base_of("pretrained"))
        recipe.model.pretrained = LOCAL_PREFIX + resolved if local else resolved


GIVEN_KEYS_ATTR = "_keys_given_by_recipe"


def keys_given(section: Any) -> frozenset:
    """The keys of a recipe section that the recipe file, its bases or an override set.

    For a section built in code (no file behind it): the fields that differ from the schema's defaults.

    >>> keys_given(recipe_from_dict({"data": {"batch_size": 8}}).data)
    frozenset({'batch_size'})
    """
    given = getattr(section, GIVEN_KEYS_ATTR, None)
    if given is not None:
        return given
    default = type(section)()
    return frozenset(f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name))


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The fully resolved recipe as plain Python data (what ``recipe_to_yaml`` writes).

    Preprocessing keys a recipe leaves to its ``model.pretrained`` start are left out (until the
    trainer fills them in from the checkpoint), so that the written recipe still leaves them open.
    """
    raw = dataclasses.asdict(recipe)
    if recipe.model.pretrained is not False:
        for key in set(START_DATA_KEYS) - keys_given(recipe.data):
            raw["data"].pop(key, None)
    return raw


# data keys a pretrained start's pretrained_cfg provides when the recipe does not set them
START_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; ``load_recipe`` of it gives back an equal recipe.

    >>> "max_steps: null" in recipe_to_yaml(Recipe())
    True
    """
    return yaml.dump(recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


def save_recipe(recipe: Recipe, path: Union[str, Path]) -> Path:
    """Write the fully resolved recipe (e.g. ``output_dir/recipe.yaml``, to document a run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Fully resolved recipe (inherit and overrides applied), written by st3_hf.train.recipe.save_recipe\n"
    path.write_text(header + recipe_to_yaml(recipe), encoding="utf-8")
    return path


def global_batch_size(recipe: Recipe, num_processes: int) -> int:
    """Examples per optimizer step: per-device batch x processes x gradient accumulation.

    >>> global_batch_size(Recipe(), num_processes=8)  # 256 * 8 * 1
    2048
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    return recipe.data.batch_size * num_processes * recipe.training.gradient_accumulation_steps


def resolve_lr(recipe: Recipe, num_processes: int) -> float:
    """``optimizer.lr`` if set, else the linear scaling rule ``base_lr * global_batch / base_batch_size``.

    >>> resolve_lr(Recipe(), num_processes=2)  # 0.2 * 512 / 512
    0.2
    """
    opt = recipe.optimizer
    if opt.lr is not None:
        return float(opt.lr)
    return opt.base_lr * global_batch_size(recipe, num_processes) / opt.base_batch_size
