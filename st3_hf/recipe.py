"""Load, validate, override and save recipes (one YAML file per training run).

A recipe is a YAML mapping whose sections mirror the dataclasses of
:mod:`st3_hf.recipe_schema` (``model``, ``data``, ``optimizer``, ``lr_schedule``,
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

    >>> from st3_hf.recipe import load_recipe, resolve_lr
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
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .errors import ConfigError
from .recipe_schema import Recipe

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
]

INHERIT_KEY = "inherit"

# Choices of the fields that only accept a few values.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "sparsity.method": ("st3", "st3_sigma", "gmp", "ste_hard", "dense"),
    "training.mixed_precision": ("no", "fp16", "bf16"),
    "data.source": ("imagefolder", "hf", "fashion_mnist"),
    "lr_schedule.name": ("cosine", "step", "constant"),
    "optimizer.name": ("sgd", "adamw"),
    "model.head": ("dense", "pruned"),
}

Path_ = Tuple[str, ...]


class RecipeError(ConfigError):
    """A recipe file, an override or a recipe value is invalid (raised before any work starts)."""


# --------------------------------------------------------------------------- YAML

class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``5e-5`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``5.0e-5``); ``5e-5`` would
    silently become the *string* "5e-5".  YAML 1.2 (and every user) reads it as a number.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _RecipeDumper(yaml.SafeDumper):
    """Block-style mappings, one-line lists (``input_size: [3, 224, 224]``)."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------- schema helpers

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    # the schema uses `from __future__ import annotations`: resolve the strings
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fmt_path(path: Path_) -> str:
    return ".".join(path)


def _valid_keys_text(cls: type, section: Path_) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"section '{_fmt_path(section)}'" if section else "the top level"
    extra = [INHERIT_KEY] if not section else []
    return f"valid keys of {where}: {', '.join(names + extra)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        names = " or ".join(_type_name(a) for a in inner)
        return f"{names} or null" if len(inner) < len(args) else names
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Dict):
        return "a mapping"
    if _is_dataclass_type(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


_NO_MATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to the annotation ``tp``, or ``_NO_MATCH``.

    int is accepted (and converted) for float; bool is never accepted for int/float.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            out = _coerce(value, arg)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if origin in (list, List):
        if not isinstance(value, list):
            return _NO_MATCH
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp) for v in value]
        return _NO_MATCH if any(i is _NO_MATCH for i in items) else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            return _NO_MATCH
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            ck, cv = _coerce(k, key_tp), _coerce(v, val_tp)
            if ck is _NO_MATCH or cv is _NO_MATCH:
                return _NO_MATCH
            out[ck] = cv
        return out
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _NO_MATCH
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `no` as False: `training.mixed_precision=no` means the string
            return "yes" if value else "no"
        return value if isinstance(value, str) else _NO_MATCH
    return value if isinstance(value, tp) else _NO_MATCH


# --------------------------------------------------------------------------- raw dict handling

class _Source:
    """Where a raw value came from, for error messages."""

    def __init__(self, recipe_path: Path, file: Path, override: Optional[str] = None):
        self.recipe_path = recipe_path
        self.file = file
        self.override = override

    def __str__(self) -> str:
        if self.override is not None:
            return f"{self.recipe_path}: override '{self.override}'"
        if self.file != self.recipe_path:
            return f"{self.file} (inherited by {self.recipe_path})"
        return str(self.file)


def _check_keys(raw: Mapping[str, Any], source: _Source, cls: type = Recipe, prefix: Path_ = ()) -> None:
    """Unknown keys and non-mapping sections, reported against the file that has them."""
    hints = _hints(cls)
    for key, value in raw.items():
        path = prefix + (str(key),)
        if not isinstance(key, str):
            raise RecipeError(f"{source}: key {key!r} of {_fmt_path(prefix) or 'the top level'} is not a string; "
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
                    f"{type(value).__name__} {value!r}; {_valid_keys_text(tp, path)}"
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
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


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
        raise RecipeError(f"{source}: cannot read recipe file ({exc.strerror or exc})") from exc
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from exc
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
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form section.key=value (missing '=')")
    key, value_text = text.split("=", 1)
    path = tuple(part.strip() for part in key.strip().split("."))
    if not path or any(not part for part in path):
        raise RecipeError(f"override '{text}' has an empty key (expected section.key=value)")
    try:
        value = _yaml_load(value_text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{text}': value is not valid YAML ({exc})") from exc
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
                f"{type(value).__name__} {value!r}; {_valid_keys_text(cls, prefix)}"
            )
        kwargs[key] = converted
    return cls(**kwargs)


def _semantic_errors(recipe: Recipe) -> List[Tuple[str, str]]:
    """``(dotted key, problem)`` for each value that has the right type but makes no sense."""
    errors: List[Tuple[str, str]] = []
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append((dotted, f"is {value!r}{hint}; valid values: {', '.join(choices)}"))

    sp = recipe.sparsity
    if not 0.0 <= sp.target < 1.0:
        errors.append(("sparsity.target", f"must be in [0, 1) (a fraction of pruned weights), got {sp.target}"))
    if sp.method == "dense" and sp.target != 0.0:
        errors.append(("sparsity.target", f"must be 0 when sparsity.method is 'dense', got {sp.target}"))
    if sp.start_epoch < 0:
        errors.append(("sparsity.start_epoch", f"must be >= 0, got {sp.start_epoch}"))
    if sp.start_epoch > sp.end_epoch:
        errors.append(("sparsity.start_epoch", f"must be <= sparsity.end_epoch, got start_epoch="
                                               f"{sp.start_epoch} > end_epoch={sp.end_epoch}"))
    if sp.power <= 0:
        errors.append(("sparsity.power", f"must be > 0, got {sp.power}"))

    positive = {
        "data.batch_size": recipe.data.batch_size,
        "training.epochs": recipe.training.epochs,
        "training.gradient_accumulation_steps": recipe.training.gradient_accumulation_steps,
        "optimizer.base_batch_size": recipe.optimizer.base_batch_size,
        "evaluation.every_epochs": recipe.evaluation.every_epochs,
        "training.log_every_steps": recipe.training.log_every_steps,
    }
    optional_positive = {
        "data.eval_batch_size": recipe.data.eval_batch_size,
        "training.max_steps": recipe.training.max_steps,
        "training.checkpoint_every_steps": recipe.training.checkpoint_every_steps,
        "data.train_subset": recipe.data.train_subset,
        "data.eval_subset": recipe.data.eval_subset,
        "evaluation.max_batches": recipe.evaluation.max_batches,
        "optimizer.lr": recipe.optimizer.lr,
        "training.grad_clip": recipe.training.grad_clip,
    }
    positive.update({k: v for k, v in optional_positive.items() if v is not None})
    for dotted, value in positive.items():
        if value <= 0:
            errors.append((dotted, f"must be > 0, got {value}"))
    if recipe.optimizer.base_lr <= 0 and recipe.optimizer.lr is None:
        errors.append(("optimizer.base_lr", f"must be > 0, got {recipe.optimizer.base_lr}"))
    if recipe.data.num_workers < 0:
        errors.append(("data.num_workers", f"must be >= 0, got {recipe.data.num_workers}"))
    if recipe.lr_schedule.warmup_epochs < 0:
        errors.append(("lr_schedule.warmup_epochs", f"must be >= 0, got {recipe.lr_schedule.warmup_epochs}"))
    if recipe.lr_schedule.name == "step" and not recipe.lr_schedule.milestones:
        errors.append(("lr_schedule.milestones", "must list the decay epochs when lr_schedule.name is 'step'"))
    if not 0.0 <= recipe.training.label_smoothing < 1.0:
        errors.append(("training.label_smoothing", f"must be in [0, 1), got {recipe.training.label_smoothing}"))
    if not 0.0 <= recipe.data.hflip <= 1.0:
        errors.append(("data.hflip", f"is a probability and must be in [0, 1], got {recipe.data.hflip}"))

    data, model = recipe.data, recipe.model
    if len(data.input_size) != 3:
        errors.append(("data.input_size", f"must be [channels, height, width], got {data.input_size}"))
    else:
        if data.input_size[0] != model.in_chans:
            errors.append(("data.input_size", f"has {data.input_size[0]} channels but model.in_chans is "
                                              f"{model.in_chans}"))
        for name in ("mean", "std"):
            values = getattr(data, name)
            if len(values) != data.input_size[0]:
                errors.append((f"data.{name}", f"needs one value per channel ({data.input_size[0]}), got {values}"))
    if any(s <= 0 for s in data.std):
        errors.append(("data.std", f"values must be > 0, got {data.std}"))
    if data.source == "hf" and not (data.hf_name or data.root):
        errors.append(("data.hf_name", "data.source 'hf' needs data.hf_name (or data.root, a saved dataset)"))
    return errors


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
        lines.append(f"  {origin}: '{key}' {problem} ({_valid_keys_text(section_cls, (section,))})")
    raise RecipeError(f"{recipe_path}: invalid value{'s' if len(errors) > 1 else ''}:\n" + "\n".join(lines))


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
    raw = _copy(dict(raw))
    _check_keys(raw, src)
    if INHERIT_KEY in raw:
        raise RecipeError(f"{source}: '{INHERIT_KEY}' is only supported in recipe files (load_recipe)")
    return _finish(raw, overrides, name, {}, src)


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``inherit``), override and validate a recipe file.

    Raises :class:`RecipeError` naming the file, the dotted key and the valid keys
    of its section on any unknown key, wrong type, malformed override or invalid value.

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
    _raise_semantic_errors(recipe, recipe_path, origins, default)
    return recipe


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The fully resolved recipe as plain Python data (what ``recipe_to_yaml`` writes)."""
    return dataclasses.asdict(recipe)


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
    header = "# Fully resolved recipe (inherit and overrides applied), written by st3_hf.recipe.save_recipe\n"
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
