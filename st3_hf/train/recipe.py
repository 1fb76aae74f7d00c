"""Load, validate, override and save recipes (one YAML file per training run).

A recipe's sections are the dataclasses of :mod:`st3_hf.train.recipe_schema`. ``inherit: base.yaml``
(relative to the recipe; or a list) deep-merges the bases first; ``section.key=value`` overrides,
parsed as YAML, come last. Everything is checked before any work starts, each problem as one line
naming the file (and line), the dotted key and the valid keys.

    >>> from st3_hf.train.recipe import load_recipe, resolve_lr
    >>> recipe = load_recipe("recipes/r50_st3_90.yaml", ["training.max_steps=20"])
    >>> recipe.training.max_steps, recipe.sparsity.target
    (20, 0.9)
    >>> resolve_lr(recipe, num_processes=8)  # 0.2 * (256 * 8) / 512
    0.8
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from st3_hf.errors import ConfigError, one_line
from st3_hf.train.recipe_schema import CHOICES, RANGES, Recipe, SparsityRecipe, sparsity_config

__all__ = ["RecipeError", "load_recipe", "recipe_from_dict", "validate_recipe", "recipe_to_dict", "recipe_to_yaml",
           "save_recipe", "global_batch_size", "resolve_lr", "parse_override", "keys_given"]

INHERIT_KEY = "inherit"
Path_ = Tuple[str, ...]
# YAML aliases let a few lines stand for billions of values ("billion laughs") or for a list that contains
# itself (`a: &x [*x]`); nothing in a recipe is that large or nested that deeply
MAX_VALUES = 100_000
MAX_DEPTH = 64
INT_LIMIT = 2**63  # ints go to torch / numpy / the OS (seeds, sizes, step counts): 64 bits is what they take
GIVEN_KEYS_ATTR = "_keys_given_by_recipe"
# data keys a pretrained start's pretrained_cfg provides when the recipe does not set them
START_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


class RecipeError(ConfigError):
    """A recipe file, an override or a recipe value is invalid (raised before any work starts)."""


# --------------------------------------------------------------------------- YAML

# YAML 1.2 floats: PyYAML (YAML 1.1) needs a dot and a signed exponent, and would read `5e-5` as a string
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


class _Loader(yaml.SafeLoader):
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise bare errors on `2001-13-45`, `!!bool maybe`, a 5000-digit int:
        # report them like any other YAML error, at the value's line and column
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            shown = _show(node.value) if isinstance(node, yaml.ScalarNode) else "value"
            why = f" ({exc})" if isinstance(exc, ValueError) and str(exc) else ""  # the others leak internals
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {str(node.tag).rsplit(':', 1)[-1]} {shown}{why}", node.start_mark) from exc


class _Dumper(yaml.SafeDumper):
    """Block mappings, one-line lists; quotes what the loader would read as a float (the string "5e-5")."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
# PyYAML writes NEL (U+0085) raw in a single-quoted scalar, where reading folds it into a space
_Dumper.add_representer(str, lambda d, data: d.represent_scalar("tag:yaml.org,2002:str", data,
                                                                  style='"' if "\x85" in data else None))


class _YAMLProblem(Exception):
    """A YAML text that cannot be read: where (1-based line and column, when known), why, what to do."""

    def __init__(self, line: Optional[int], column: Optional[int], problem: str, hint: str):
        super().__init__(problem)
        self.line, self.column, self.problem, self.hint = line, column, one_line(problem), hint


def _yaml_load(text: str) -> Any:
    """The data of ``text``; raises :class:`_YAMLProblem` (never a bare PyYAML or Python error)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or type(exc).__name__
        if problem.startswith("but ") and exc.context:  # "expected a single document ... but found another"
            problem = f"{exc.context} {problem}"
        began = exc.context and exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line
        if began:  # PyYAML notices a missing ':' or ']' lines later; the context says where the construct began
            problem += f"; {exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        if isinstance(exc, yaml.constructor.ConstructorError):
            hint = ("a recipe holds plain data only: no Python or custom tags" if "could not determine a constructor"
                    in problem else "fix the value at that line, or quote it to keep it a string")
        else:
            hint = "fix the syntax between those lines" if began else "fix the syntax at that line"
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise _YAMLProblem(line, column, problem, hint) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL...): a position, no mark
        pos = max(0, min(exc.position, len(text)))
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise _YAMLProblem(text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos),
                           f"special character #x{char:04x} is not allowed",
                           "remove it or write it escaped in a double-quoted string") from exc
    except yaml.YAMLError as exc:
        raise _YAMLProblem(None, None, str(exc), "fix the syntax") from exc
    except RecursionError as exc:  # PyYAML composes nested collections recursively
        raise _YAMLProblem(None, None, "collections are nested too deeply",
                           f"a recipe nests at most {MAX_DEPTH} levels") from exc


# --------------------------------------------------------------------------- messages

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # the schema uses `from __future__ import annotations`


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


class _ShortRepr(reprlib.Repr):
    """Short reprs of user values (a list of 10**5 items; an int of 4300+ digits, whose repr raises)."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return repr(x)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 3, 6, 8, 8, 6
_SHORT.maxstring = _SHORT.maxother = 80
_show = _SHORT.repr


def _dotted(path: Path_) -> str:
    return one_line(".".join(path))


def _valid_keys(cls: type, section: Path_) -> str:
    names = [f.name for f in dataclasses.fields(cls)] + ([] if section else [INHERIT_KEY])
    where = f"section '{_dotted(section)}'" if section else "the top level"
    return f"valid keys of {where}: {', '.join(names)}"


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a raw value came from (a file of the inherit chain, or an override), for messages."""

    recipe: Path
    file: Path
    override: Optional[str] = None

    def __str__(self) -> str:
        if self.override is not None:
            return one_line(f"{self.recipe}: override '{self.override}'")
        return one_line(f"{self.file} (inherited by {self.recipe})" if self.file != self.recipe else self.file)


def _origin(origins: Mapping[Path_, _Source], path: Path_, default: _Source) -> _Source:
    return next((origins[path[:n]] for n in range(len(path), 0, -1) if path[:n] in origins), default)


# --------------------------------------------------------------------------- raw data

def _check_keys(raw: Mapping[str, Any], source: _Source, cls: type = Recipe, prefix: Path_ = ()) -> None:
    """Unknown keys and non-mapping sections, reported against the file that has them."""
    hints = _hints(cls)
    for key, value in raw.items():
        if not isinstance(key, str):
            raise RecipeError(f"{source}: key {_show(key)} of {_dotted(prefix) or 'the top level'} is not a string; "
                              f"{_valid_keys(cls, prefix)}")
        path = prefix + (key,)
        if key == INHERIT_KEY and not prefix:
            if source.override is None:
                continue
            raise RecipeError(f"{source}: '{INHERIT_KEY}' cannot be overridden (edit the recipe file); "
                              f"{_valid_keys(cls, prefix)}")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints) + ([] if prefix else [INHERIT_KEY]), n=1)
            hint = f" (did you mean '{_dotted(prefix + (close[0],))}'?)" if close else ""
            raise RecipeError(f"{source}: unknown key '{_dotted(path)}'{hint}; {_valid_keys(cls, prefix)}")
        if _is_section(hints[key]):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: '{_dotted(path)}' is a section and must be a mapping of keys, got "
                                  f"{type(value).__name__} {_show(value)}; {_valid_keys(hints[key], path)}")
            _check_keys(value, source, hints[key], path)


def _check_data(value: Any, source: Any, prefix: Path_ = ()) -> None:
    """Refuse data that contains itself, nests deeper than ``MAX_DEPTH`` or expands past ``MAX_VALUES``
    (copying, comparing or printing it would hang or overflow the stack)."""
    budget, active = [MAX_VALUES], set()  # ids of the collections on the current path: a repeat is a cycle

    def walk(item: Any, path: Path_) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise RecipeError(f"{source}: '{_dotted(path)}' takes the recipe past {MAX_VALUES} values "
                              f"(YAML aliases that multiply?); a recipe holds small, plain data")
        if not isinstance(item, (dict, list)):
            return
        if id(item) in active:
            raise RecipeError(f"{source}: '{_dotted(path)}' contains itself (a recursive YAML alias "
                              f"such as `a: &x [*x]`); a recipe holds plain, finite data")
        if len(path) - len(prefix) >= MAX_DEPTH:
            raise RecipeError(f"{source}: '{_dotted(path)}' is nested more than {MAX_DEPTH} levels deep; "
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


def _copy(value: Any) -> Any:
    """Plain data that shares nothing (YAML aliases share): call it on checked data only."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return [_copy(v) for v in value] if isinstance(value, list) else value


def _record(origins: Dict[Path_, _Source], path: Path_, source: _Source) -> None:
    """``source`` set the value at ``path`` and everything below it."""
    for stale in [p for p in origins if p[:len(path)] == path]:
        del origins[stale]
    origins[path] = source


def _deep_merge(base: Dict[str, Any], over: Mapping[str, Any], origins: Dict[Path_, _Source], source: _Source,
                prefix: Path_ = ()) -> Dict[str, Any]:
    """Merge ``over`` into ``base`` in place: mappings merge key by key, everything else replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, origins, source, prefix + (key,))
        else:
            base[key] = _copy(value)
            _record(origins, prefix + (key,), source)
    return base


def _read_file(path: Path, recipe_path: Path, chain: Tuple[Path, ...], origins: Dict[Path_, _Source]) -> Dict[str, Any]:
    """The raw mapping of ``path`` with its ``inherit`` chain merged in (bases first)."""
    source = _Source(recipe_path, path)
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"{source}: cannot read recipe file ({one_line(exc.strerror or str(exc))})") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{source}: is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save the recipe as UTF-8") from exc
    except _YAMLProblem as exc:
        where = f"{path}:{exc.line}:{exc.column}" if exc.line is not None else str(path)
        inherited = f"; {path} is inherited by {recipe_path}" if path != recipe_path else ""
        raise RecipeError(one_line(f"{where}: invalid YAML: {exc.problem} ({exc.hint}){inherited}")) from exc
    _check_data(raw, source)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections, got {got}; "
                          f"{_valid_keys(Recipe, ())}")
    _check_keys(raw, source)
    merged: Dict[str, Any] = {}
    parents = raw.pop(INHERIT_KEY, None)
    parents = [parents] if isinstance(parents, str) else parents
    if parents is not None and not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise RecipeError(f"{source}: '{INHERIT_KEY}' must be a path (or a list of paths) relative to the "
                          f"recipe, got {_show(parents)}; {_valid_keys(Recipe, ())}")
    for parent in parents or ():
        parent_path = (path.parent / parent).resolve()
        if parent_path in chain:
            raise RecipeError(one_line(f"{source}: '{INHERIT_KEY}' forms a cycle: "
                                       + " -> ".join(str(p) for p in chain + (parent_path,))))
        if not parent_path.is_file():
            raise RecipeError(one_line(f"{source}: '{INHERIT_KEY}: {parent}' does not exist (looked for {parent_path};"
                                       f" the path is relative to the recipe file); {_valid_keys(Recipe, ())}"))
        _deep_merge(merged, _read_file(parent_path, recipe_path, chain + (parent_path,), origins),
                    origins, _Source(recipe_path, parent_path))
    return _deep_merge(merged, raw, origins, source)


def parse_override(text: str) -> Tuple[Path_, Any]:
    """``"training.max_steps=20"`` -> ``(("training", "max_steps"), 20)``; the value is parsed as YAML.

    >>> parse_override("sparsity.exclude=[fc]")
    (('sparsity', 'exclude'), ['fc'])
    """
    shown = one_line(text)
    if "=" not in text:
        raise RecipeError(f"override '{shown}' is not of the form section.key=value (missing '=')")
    key, value_text = text.split("=", 1)
    path = tuple(part.strip() for part in key.strip().split("."))
    if not all(path):
        raise RecipeError(f"override '{shown}' has an empty key (expected section.key=value)")
    try:
        value = _yaml_load(value_text)
    except _YAMLProblem as exc:
        where = "" if exc.line is None else f" at line {exc.line}, column {exc.column}" if exc.line > 1 \
            else f" at column {exc.column}"
        hint = exc.hint if "plain data" in exc.hint else "quote the value to make it a string"
        raise RecipeError(f"override '{shown}': value is not valid YAML{where}: {exc.problem} ({hint})") from exc
    _check_data(value, f"override '{shown}'", path)
    return path, value


# --------------------------------------------------------------------------- typed construction

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
    if origin is list:
        items = [_coerce(v, args[0]) for v in value] if isinstance(value, list) else [_NO_MATCH]
        return _NO_MATCH if any(item is _NO_MATCH for item in items) else items
    if origin is dict:
        pairs = [(_coerce(k, args[0]), _coerce(v, args[1])) for k, v in value.items()] if isinstance(value, dict) \
            else [(_NO_MATCH, None)]
        return _NO_MATCH if any(_NO_MATCH in (k, v) for k, v in pairs) else dict(pairs)
    if tp is str or origin is Literal:  # YAML 1.1 reads a bare `no` as False: `mixed_precision=no` means "no"
        return ("yes" if value else "no") if isinstance(value, bool) else value if isinstance(value, str) else _NO_MATCH
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range reads like YAML's 1e400: infinity
            return math.inf if value > 0 else -math.inf
    return value if type(value) is tp else _NO_MATCH


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        names = " or ".join(_type_name(a) for a in inner)
        return f"{names} or null" if len(inner) < len(args) else names
    if origin in (list, dict):
        return f"a list of {_type_name(args[0])}" if origin is list else "a mapping with string keys"
    return "str" if origin is Literal else "any value" if tp is Any else tp.__name__  # Literal: choices checked later


def _build(cls: type, raw: Mapping[str, Any], origins: Mapping[Path_, _Source], default: _Source,
           prefix: Path_ = ()) -> Any:
    kwargs: Dict[str, Any] = {}
    for key, value in raw.items():
        path, tp = prefix + (key,), _hints(cls)[key]  # unknown keys were refused by _check_keys
        kwargs[key] = _build(tp, value, origins, default, path) if _is_section(tp) else _coerce(value, tp)
        if kwargs[key] is _NO_MATCH:
            raise RecipeError(f"{_origin(origins, path, default)}: '{_dotted(path)}' must be {_type_name(tp)}, got "
                              f"{type(value).__name__} {_show(value)}; {_valid_keys(cls, prefix)}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- value checks

def _bad_number(value: Any) -> Optional[str]:
    """Why ``value`` (lists and mappings included) holds a number torch cannot take: NaN / inf (``nan <= 0``
    is False: range rules would let it through) or an int beyond 64 bits."""
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
        key = "start_epoch" if exc.key == "start_step" else exc.key if hasattr(unset, exc.key) else "method"
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
            need(abs(sp.target - final) <= 1e-6, "sparsity.target", f"must be 1 - (1 - round_fraction)^(rounds - 1)"
                 f" = {final:.6f} for sparsity.schedule iterative, got {sp.target}")
    else:
        for key in ("rounds", "round_fraction"):
            need(getattr(sp, key) == getattr(unset, key), f"sparsity.{key}", f"is an iterative-pruning setting; "
                 f"sparsity.schedule {_show(sp.schedule)} does not use it (set sparsity.schedule=iterative)")
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
    need(all(v > 0 for v in data.input_size), "data.input_size", f"values must be > 0, got {_show(data.input_size)}")
    scale, ratio = data.scale, data.ratio
    need(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.scale",
         f"must be [min, max] with 0 < min <= max <= 1 (fractions of the image area), got {_show(scale)}")
    need(len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "data.ratio",
         f"must be [min, max] with 0 < min <= max (aspect ratios), got {_show(ratio)}")
    from st3_hf.hub.pretrained import UNSAFE_MODEL_ARGS
    unsafe = sorted(set(model.kwargs) & set(UNSAFE_MODEL_ARGS))
    need(not unsafe, "model.kwargs", f"must not set {', '.join(unsafe)}: they make timm load files of its own; "
         f"start from weights with model.pretrained or model.init_from")
    need(not isinstance(model.pretrained, str) or bool(model.pretrained.strip()), "model.pretrained",
         "is an empty string; give true, a Hub id (ORG/NAME) or a folder")
    need(model.pretrained is False or not model.init_from, "model.pretrained",
         "and model.init_from are both set: model.init_from continues a sparse export with frozen masks, "
         "model.pretrained prunes dense weights; choose one")
    need(data.source != "hf" or bool(data.hf_name or data.root), "data.hf_name",
         "data.source 'hf' needs data.hf_name (or data.root, a saved dataset)")
    return errors


def _raise_value_errors(recipe: Recipe, recipe_path: Path, origins: Mapping[Path_, _Source], default: _Source) -> None:
    errors = _field_errors(recipe)
    bad = {key for key, _ in errors}  # a NaN / huge / out-of-range key gets that one problem, no cross-field one
    errors += [(key, problem) for key, problem in _cross_field_errors(recipe) if key not in bad]
    lines = []
    for key, problem in errors:
        section = key.split(".")[0]
        lines.append((_origin(origins, tuple(key.split(".")), default),
                      f"'{key}' {problem} ({_valid_keys(_hints(Recipe)[section], (section,))})"))
    if len(lines) == 1:  # one problem, one line (the scripts print it as is)
        raise RecipeError(f"{lines[0][0]}: invalid value: {lines[0][1]}")
    if lines:
        raise RecipeError(f"{one_line(recipe_path)}: invalid values:\n" + "\n".join(f"  {o}: {t}" for o, t in lines))


# --------------------------------------------------------------------------- public API

def validate_recipe(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """Check the values of a typed recipe (choices, ranges, consistency); raise :class:`RecipeError`.

    :func:`load_recipe` calls this; call it yourself for a :class:`Recipe` built in code.

    >>> validate_recipe(Recipe()).sparsity.method
    'st3'
    """
    _raise_value_errors(recipe, Path(source), {}, _Source(Path(source), Path(source)))
    return recipe


def recipe_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Recipe:
    """A validated :class:`Recipe` from a plain mapping (as a recipe file would hold; no ``inherit``).

    >>> recipe_from_dict({"training": {"epochs": 3}}).training.epochs
    3
    """
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(raw).__name__}; "
                          f"{_valid_keys(Recipe, ())}")
    src = _Source(Path(source), Path(source))
    _check_data(dict(raw), src)  # _copy would recurse forever on a mapping that contains itself
    raw = _copy(dict(raw))
    _check_keys(raw, src)
    if INHERIT_KEY in raw:
        raise RecipeError(f"{source}: '{INHERIT_KEY}' is only supported in recipe files (load_recipe)")
    return _finish(raw, overrides, Path(source), {}, src)


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``inherit``), override and validate a recipe file.

    Raises :class:`RecipeError` naming the file, the dotted key and the valid keys of its section (one
    line per problem; invalid YAML as ``file:line:column: invalid YAML: ...``); nothing else escapes.

    >>> r = load_recipe("recipes/quickstart.yaml", ["training.max_steps=20", "output_dir=/tmp/x"])
    >>> r.output_dir, r.training.max_steps
    ('/tmp/x', 20)
    """
    overrides = [overrides] if isinstance(overrides, str) else overrides  # not one override per character
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise RecipeError(f"{recipe_path}: recipe file not found")
    origins: Dict[Path_, _Source] = {}
    raw = _read_file(recipe_path, recipe_path, (recipe_path.resolve(),), origins)
    return _finish(raw, overrides, recipe_path, origins, _Source(recipe_path, recipe_path))


def _finish(raw: Dict[str, Any], overrides: Sequence[str], recipe_path: Path,
            origins: Dict[Path_, _Source], default: _Source) -> Recipe:
    for text in overrides:
        try:
            key_path, value = parse_override(text)
        except RecipeError as exc:  # name the valid keys of the section the override seems to aim at
            first = text.split("=", 1)[0].strip().split(".")[0]
            tp = _hints(Recipe).get(first)
            valid = _valid_keys(tp, (first,)) if _is_section(tp) else _valid_keys(Recipe, ())
            raise RecipeError(f"{recipe_path}: {exc}; {valid}") from exc
        src = _Source(recipe_path, recipe_path, override=text)
        nested = value
        for key in reversed(key_path):
            nested = {key: nested}
        _check_keys(nested, src)
        parent = raw  # an override replaces the value at its key (`model.kwargs={}` empties it), it does not merge
        for key in key_path[:-1]:
            if not isinstance(parent.get(key), dict):
                parent[key] = {}
            parent = parent[key]
        parent[key_path[-1]] = _copy(value)
        _record(origins, key_path, src)
    recipe = _build(Recipe, raw, origins, default)
    # which data keys the recipe (its bases, its overrides) set: the others may come from a pretrained model
    object.__setattr__(recipe.data, GIVEN_KEYS_ATTR, frozenset(raw.get("data") or {}))
    _raise_value_errors(recipe, recipe_path, origins, default)
    _resolve_paths(recipe, origins, default)
    return recipe


def _resolve_paths(recipe: Recipe, origins: Mapping[Path_, _Source], default: _Source) -> None:
    """Relative ``model.init_from`` / ``model.pretrained`` paths against the folder of the file that set
    them (the working directory for an override or a recipe built from a dict), like ``inherit:``."""
    from st3_hf.train.init_source import LOCAL_PREFIX, resolve_init_from

    def base_of(key: str) -> Path:
        source = _origin(origins, ("model", key), default)
        return source.file.resolve().parent if source.override is None and source.file.is_file() else Path.cwd()

    # `~` means the home folder wherever a path is read (a shell does not expand it inside a YAML file)
    recipe.output_dir = str(Path(recipe.output_dir).expanduser())
    if recipe.data.root:
        recipe.data.root = str(Path(recipe.data.root).expanduser())
    if recipe.model.init_from:
        recipe.model.init_from = resolve_init_from(recipe.model.init_from, base_of("init_from"))
    start = recipe.model.pretrained
    if isinstance(start, str) and start:
        local = start.startswith(LOCAL_PREFIX)
        resolved = resolve_init_from(start[len(LOCAL_PREFIX):] if local else start, base_of("pretrained"))
        recipe.model.pretrained = LOCAL_PREFIX + resolved if local else resolved


def keys_given(section: Any) -> frozenset:
    """The keys of a recipe section that the recipe file, its bases or an override set; for a section
    built in code, the fields that differ from the schema's defaults.

    >>> keys_given(recipe_from_dict({"data": {"batch_size": 8}}).data)
    frozenset({'batch_size'})
    """
    given = getattr(section, GIVEN_KEYS_ATTR, None)
    if given is not None:
        return given
    default = type(section)()
    return frozenset(f.name for f in dataclasses.fields(section)
                     if getattr(section, f.name) != getattr(default, f.name))


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The fully resolved recipe as plain data; preprocessing keys left to a ``model.pretrained`` start
    stay out (until the trainer fills them in), so that the written recipe still leaves them open."""
    raw = dataclasses.asdict(recipe)
    if recipe.model.pretrained is not False:
        for key in set(START_DATA_KEYS) - keys_given(recipe.data):
            raw["data"].pop(key, None)
    return raw


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; ``load_recipe`` of it gives back an equal recipe.

    >>> "max_steps: null" in recipe_to_yaml(Recipe())
    True
    """
    return yaml.dump(recipe_to_dict(recipe), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
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
    if recipe.optimizer.lr is not None:
        return float(recipe.optimizer.lr)
    return recipe.optimizer.base_lr * global_batch_size(recipe, num_processes) / recipe.optimizer.base_batch_size
