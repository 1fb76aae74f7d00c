"""Load, override, validate and save recipes (one YAML file per training run).

OmegaConf reads the YAML (``1e-3`` is a float, dates stay text, no Python tags) onto ``OmegaConf.structured(Recipe)``
(:mod:`st3_hf.train.recipe_schema`). ``inherit: base.yaml`` (relative to the file; or a list) merges the bases
first; ``section.key=value`` overrides (the value read as YAML) come last. Every problem is one
:class:`ConfigError` line naming the file (and the line, for YAML syntax), the dotted key and the valid keys.

    >>> recipe = load_recipe("recipes/r50_st3_90.yaml", ["training.max_steps=20"])
    >>> recipe.training.max_steps, recipe.sparsity.target, resolve_lr(recipe, num_processes=8)  # 0.2 * 256 * 8 / 512
    (20, 0.9, 0.8)
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError,
                              OmegaConfBaseException, ValidationError)

from st3_hf.errors import ConfigError, one_line
from st3_hf.train.recipe_schema import CHOICES, FIELDS, SECTIONS, Recipe, choice_problem, problems, show

__all__ = ["load_recipe", "recipe_from_dict", "validate_recipe", "recipe_to_dict", "recipe_to_yaml",
           "save_recipe", "global_batch_size", "resolve_lr", "parse_override", "keys_given"]

INHERIT_KEY = "inherit"
GIVEN_KEYS_ATTR = "_keys_given_by_recipe"
# data keys a pretrained start's pretrained_cfg provides when the recipe does not set them
START_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
# what OmegaConf raises, and what PyYAML raises for a value its constructors cannot build (`!!bool maybe`)
_ERRORS = (OmegaConfBaseException, yaml.YAMLError, ArithmeticError, LookupError, TypeError, ValueError)
_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}  # an int may stand for a float
KEYS = {section: list(fields) + ([] if section else [INHERIT_KEY]) for section, fields in FIELDS.items()}
Layer = Tuple[str, Optional[Path], Dict[str, Any]]  # (who set it, the folder of that file, the data)
_SCHEMA = OmegaConf.structured(Recipe)  # built once: a copy is several times faster than OmegaConf.structured


def _valid(section: str) -> str:
    return f"valid keys of {f'section {section!r}' if section else 'the top level'}: {', '.join(KEYS[section])}"


def _got(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {show(value)}"


def _why(exc: BaseException) -> str:  # OmegaConf's message, without its full_key / object_type lines
    return one_line(str(exc).split("\n")[0] or type(exc).__name__)


def _check_types(layer: Dict[Any, Any], source: str, section: str = "") -> None:
    """Values keep their YAML type (OmegaConf would read '0.1' as 0.1, 1 as true, 3 as '3'); a YAML 1.1
    boolean word at a text key is that word (`training.mixed_precision=no` means "no")."""
    for key, value in layer.items():
        if key in SECTIONS and not section:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' is a section and must be a mapping of keys, got {_got(value)}; "
                                  f"{_valid(key)}")
            _check_types(value, source, key)
            continue
        tp, written = FIELDS[section].get(key, (None, ""))  # unknown keys: OmegaConf's merge refuses them
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        one = args[0] if typing.get_origin(tp) in (Union, list) and len(args) == 1 else tp  # Optional[T], List[T]: T
        if isinstance(value, bool) and (one is str or typing.get_origin(one) is Literal):
            layer[key] = value = "yes" if value else "no"
        items = value if typing.get_origin(tp) is list and isinstance(value, list) else [value]
        if one in _TYPES and any(v is not None and type(v) not in _TYPES[one] for v in items):
            dotted = f"{section}.{key}" if section else key
            raise ConfigError(f"{source}: '{dotted}' must be {written}, got {_got(value)}; {_valid(section)}")


def _omegaconf_error(exc: Exception, source: str) -> ConfigError:
    """OmegaConf's error at its ``full_key`` as one line: an unknown key with the closest valid one, a value
    outside a ``Literal``'s choices, a wrong type; and the section's valid keys."""
    full_key = str(getattr(exc, "full_key", None) or "")
    parts = re.sub(r"\[.*", "", full_key).split(".")  # data.input_size[1] -> data.input_size
    section = parts[0] if len(parts) > 1 and parts[0] in SECTIONS else ""
    key, name, valid = ".".join(parts[:2]), parts[bool(section)], _valid(section)
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and len(parts) <= 2:
        close = difflib.get_close_matches(parts[-1], KEYS[section], 1)
        hint = f" (did you mean '{section + '.' if section else ''}{close[0]}'?)" if close else ""
        return ConfigError(f"{source}: unknown key '{full_key}'{hint}; {valid}")
    if key in CHOICES and not isinstance(exc, InterpolationResolutionError):
        return ConfigError(f"{source}: invalid value: '{key}' {choice_problem(key, exc.value)} ({valid})")
    if isinstance(exc, ValidationError) and not isinstance(exc, InterpolationResolutionError) and full_key:
        written = FIELDS[section].get(name, (None, "another type"))[1]
        return ConfigError(f"{source}: '{full_key}' must be {written}, got {_got(exc.value)}; {valid}")
    return ConfigError(f"{source}: {f'{full_key!r}: ' if full_key else ''}{_why(exc)}; {valid}")


def _yaml_problem(exc: yaml.YAMLError, text: str) -> Tuple[Optional[int], Optional[int], str]:
    """(line, column, problem) of PyYAML's error; the line where a construct began when it is noticed later."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow (NUL...): a position, no mark
        pos, char = exc.position, f"special character #x{exc.character:04x} is not allowed"
        return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos), char
    mark, begin, context = (getattr(exc, name, None) for name in ("problem_mark", "context_mark", "context"))
    problem = getattr(exc, "problem", None) or str(exc)
    if problem.startswith("but ") and context:  # "expected a single document ... but found another"
        problem = f"{context} {problem}"
    elif context and begin is not None and mark is not None and begin.line != mark.line:
        problem += f"; {context} at line {begin.line + 1}, column {begin.column + 1}"
    mark = mark or begin
    return (mark and mark.line + 1, mark and mark.column + 1, one_line(problem))


def _layers(path: Path, recipe: Path, chain: Tuple[Path, ...]) -> List[Layer]:
    """The layers of ``path`` and of its ``inherit`` chain, bases first. PyYAML's parser names where the syntax
    breaks; OmegaConf builds the values."""
    base = path != recipe
    source = one_line(f"{path} (inherited by {recipe})" if base else path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # composes nodes only: builds no object
        data = OmegaConf.to_container(OmegaConf.create(text)) if isinstance(node, yaml.MappingNode) else None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read recipe file ({one_line(exc.strerror or str(exc))})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        line, column, problem = _yaml_problem(exc, text)
        hint = ("a recipe holds plain data only" if isinstance(exc, yaml.constructor.ConstructorError)
                else "fix the syntax at that line")
        raise ConfigError(f"{one_line(f'{path}:{line}:{column}' if line else path)}: invalid YAML: {problem} "
                          f"({hint}){one_line(f'; {path} is inherited by {recipe}') if base else ''}") from exc
    except _ERRORS as exc:
        raise ConfigError(f"{source}: invalid YAML value: {_why(exc)} (quote it to keep it a string)") from exc
    if data is None:
        got = "an empty file" if node is None else "a list" if isinstance(node, yaml.SequenceNode) else "a scalar"
        raise ConfigError(f"{source}: a recipe must be a YAML mapping of sections, got {got}; {_valid('')}")
    parents = data.pop(INHERIT_KEY, None)
    parents = [parents] if isinstance(parents, str) else parents
    if parents is not None and not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"{source}: '{INHERIT_KEY}' must be a path (or a list of paths) relative to the recipe, "
                          f"got {_got(parents)}; {_valid('')}")
    layers: List[Layer] = []
    for parent in parents or ():
        parent_path = (path.parent / parent).resolve()
        if parent_path in chain:
            raise ConfigError(one_line(f"{source}: '{INHERIT_KEY}' forms a cycle: "
                                       + " -> ".join(str(p) for p in chain + (parent_path,))))
        if not parent_path.is_file():
            raise ConfigError(one_line(f"{source}: '{INHERIT_KEY}: {parent}' does not exist (looked for {parent_path};"
                                       f" the path is relative to the recipe file); {_valid('')}"))
        layers += _layers(parent_path, recipe, chain + (parent_path,))
    return layers + [(source, path.resolve().parent, data)]


def parse_override(text: str) -> Tuple[Tuple[str, ...], Any]:
    """``"training.max_steps=20"`` -> ``(("training", "max_steps"), 20)``; the value is read as YAML.

    >>> parse_override("sparsity.exclude=[fc]")
    (('sparsity', 'exclude'), ['fc'])
    """
    shown = one_line(text)
    if "=" not in text:
        raise ConfigError(f"override '{shown}' is not of the form section.key=value (missing '=')")
    key, value = text.split("=", 1)
    path = tuple(part.strip() for part in key.strip().split("."))
    if not all(path):
        raise ConfigError(f"override '{shown}' has an empty key (expected section.key=value)")
    try:
        yaml.compose(value, Loader=yaml.SafeLoader)  # where the syntax breaks, in PyYAML's words
        return path, OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]))["value"]
    except yaml.YAMLError as exc:
        line, column, problem = _yaml_problem(exc, value)
        where = "" if line is None else f" at line {line}, column {column}" if line > 1 else f" at column {column}"
        raise ConfigError(f"override '{shown}': value is not valid YAML{where}: {problem} "
                          f"(quote the value to make it a string)") from exc
    except _ERRORS as exc:
        raise ConfigError(f"override '{shown}': invalid value: {_why(exc)} (quote it to keep it a string)") from exc


def _apply(cfg: Any, layer: Dict[str, Any], source: str, folder: Optional[Path], origins: Dict[str, Any],
           path: Tuple[str, ...] = ()) -> None:
    """Merge ``layer`` into ``cfg`` (an override at ``path`` replaces the value there instead); note who set what."""
    _check_types(layer, source)
    # an override replaces (`model.kwargs={}` empties it), but a whole section merges (a mapping of the schema's keys)
    updates = [(".".join(path), functools.reduce(lambda d, k: d[k], path, layer))] if path else layer.items()
    try:
        for key, value in updates:
            OmegaConf.update(cfg, key, value, merge=len(path) < 2)
    except _ERRORS as exc:
        raise _omegaconf_error(exc, source) from None
    for key, value in layer.items():
        names = [f"{key}.{name}" for name in value] if key in SECTIONS and isinstance(value, dict) else [key]
        origins.update(dict.fromkeys(names, (source, folder)))


def _build(layers: List[Layer], overrides: Sequence[str], recipe: str) -> Recipe:
    from st3_hf.hub.pretrained import LOCAL_PREFIX
    from st3_hf.train.init_source import resolve_init_from

    cfg, origins = copy.deepcopy(_SCHEMA), {}  # "section.key" -> (who set it, the folder of that file)
    for source, folder, data in layers:
        _apply(cfg, data, source, folder, origins)
    for text in [overrides] if isinstance(overrides, str) else overrides:  # not one override per character
        try:
            path, value = parse_override(text)
            if path[0] == INHERIT_KEY:
                raise ConfigError(f"override '{one_line(text)}': '{INHERIT_KEY}' cannot be overridden (edit the "
                                  f"recipe file)")
        except ConfigError as exc:  # name the valid keys of the section the override seems to aim at
            section = text.split("=", 1)[0].strip().split(".")[0]
            raise ConfigError(f"{recipe}: {exc}; {_valid(section if section in SECTIONS else '')}") from exc
        layer = functools.reduce(lambda nested, key: {key: nested}, reversed(path), value)
        _apply(cfg, layer, f"{recipe}: override '{one_line(text)}'", None, origins, path)
    try:
        result = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except _ERRORS as exc:
        key = ".".join(str(getattr(exc, "full_key", "")).split(".")[:2])
        raise _omegaconf_error(exc, origins.get(key, (recipe,))[0]) from None
    # which data keys the recipe (its bases, its overrides) set: the others may come from a pretrained model
    setattr(result.data, GIVEN_KEYS_ATTR, frozenset(k.split(".")[1] for k in origins if k.startswith("data.")))
    validate_recipe(result, recipe, origins)
    # `~` is the home folder (no shell expands it in a YAML file); a relative model.init_from / pretrained is
    # relative to the file that set it (else the working directory), like `inherit:`
    result.output_dir = str(Path(result.output_dir).expanduser())
    result.data.root = result.data.root and str(Path(result.data.root).expanduser())
    for key in ("init_from", "pretrained"):
        value = getattr(result.model, key)
        if isinstance(value, str) and value:
            prefix = LOCAL_PREFIX if key == "pretrained" and value.startswith(LOCAL_PREFIX) else ""
            base = origins.get(f"model.{key}", ("", None))[1] or Path.cwd()
            setattr(result.model, key, prefix + resolve_init_from(value[len(prefix):], base))
    return result


def validate_recipe(recipe: Recipe, source: str = "<recipe>", origins: Optional[Mapping[str, Tuple]] = None) -> Recipe:
    """Check the values of a :class:`Recipe` built in code (choices, ranges, consistency) like :func:`load_recipe`
    (``origins``: who set each dotted key, named in the message).

    >>> validate_recipe(Recipe()).sparsity.method
    'st3'
    """
    lines = [((origins or {}).get(key, (source,))[0], f"'{key}' {problem} ({_valid(key.split('.')[0])})")
             for key, problem in problems(recipe, keys_given(recipe.data))]
    if len(lines) == 1:  # one problem, one line (the scripts print it as is)
        raise ConfigError(f"{lines[0][0]}: invalid value: {lines[0][1]}")
    if lines:
        raise ConfigError(f"{one_line(source)}: invalid values:\n" + "\n".join(f"  {o}: {t}" for o, t in lines))
    return recipe


def recipe_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Recipe:
    """A validated :class:`Recipe` from a plain mapping (as a recipe file would hold; no ``inherit``).

    >>> recipe_from_dict({"training": {"epochs": 3}}).training.epochs
    3
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(raw).__name__}; {_valid('')}")
    if INHERIT_KEY in raw:
        raise ConfigError(f"{source}: '{INHERIT_KEY}' is only supported in recipe files (load_recipe)")
    return _build([(source, None, copy.deepcopy(dict(raw)))], overrides, source)


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``inherit``), override and validate a recipe file; a :class:`ConfigError` names the file,
    the dotted key and the valid keys of its section (invalid YAML: ``file:line:column: invalid YAML: ...``).

    >>> r = load_recipe("recipes/quickstart.yaml", ["training.max_steps=20", "output_dir=/tmp/x"])
    >>> r.output_dir, r.training.max_steps
    ('/tmp/x', 20)
    """
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise ConfigError(f"{recipe_path}: recipe file not found")
    return _build(_layers(recipe_path, recipe_path, (recipe_path.resolve(),)), overrides, one_line(recipe_path))


def keys_given(section: Any) -> frozenset:
    """The keys of a recipe section that the recipe file, its bases or an override set; for a section
    built in code, the fields that differ from the schema's defaults.

    >>> keys_given(recipe_from_dict({"data": {"batch_size": 8}}).data)
    frozenset({'batch_size'})
    """
    given, default = getattr(section, GIVEN_KEYS_ATTR, None), type(section)()
    return given if given is not None else frozenset(
        f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name))


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The fully resolved recipe as plain data; preprocessing left to a ``model.pretrained`` start stays out."""
    raw, left = dataclasses.asdict(recipe), set(START_DATA_KEYS) - keys_given(recipe.data)
    raw["data"] = {k: v for k, v in raw["data"].items() if recipe.model.pretrained is False or k not in left}
    return raw


def _as_text(value: Any) -> Any:
    """``value`` with each ``${`` in its strings escaped: the text, not an interpolation, when read back."""
    if isinstance(value, (dict, list, tuple)):
        return {k: _as_text(v) for k, v in value.items()} if isinstance(value, dict) else list(map(_as_text, value))
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value) if isinstance(value, str) else value


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; ``load_recipe`` of it gives back an equal recipe.

    >>> "max_steps: null" in recipe_to_yaml(Recipe())
    True
    """
    return OmegaConf.to_yaml(_as_text(recipe_to_dict(recipe)))


def save_recipe(recipe: Recipe, path: Union[str, Path]) -> Path:
    """Write the fully resolved recipe (e.g. ``output_dir/recipe.yaml``, to document a run)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("# Fully resolved recipe (inherit and overrides applied), written by st3_hf.train.recipe."
                          "save_recipe\n" + recipe_to_yaml(recipe), encoding="utf-8")
    return Path(path)


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
