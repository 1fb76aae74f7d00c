"""Recipes compared: a resume with a recipe that differs from the checkpoint's is refused unless asked for (it
would mix two runs into one that neither recipe describes; keys that only say how a run is observed or stored may
change), and a run whose overrides change what a shipped recipe trains says so in its description.

    >>> from st3_hf.train.recipe_schema import Recipe
    >>> a, b = Recipe(), Recipe()
    >>> b.sparsity.target = 0.95
    >>> run_changing_differences(a, b)
    {'sparsity.target': (0.9, 0.95)}
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Tuple

from st3_hf.errors import ModelError
from st3_hf.train.recipe_schema import Recipe

# dotted keys (or section prefixes) whose value does not change what is computed
NOT_RUN_CHANGING = (
    "output_dir", "description", "expected", "logging", "hub", "evaluation", "data.num_workers", "data.eval_batch_size",
    "training.max_steps", "training.resume_from_checkpoint", "training.allow_recipe_change", "training.overwrite_output_dir",
    "training.checkpoint_every_steps", "training.checkpoint_every_epoch", "training.keep_checkpoints",
    "training.log_every_steps", "training.max_consecutive_nonfinite_steps", "training.collective_timeout_s",
)
# what a description and a dataset name speak about
IDENTITY_KEYS = ("model.name", "model.num_classes", "model.in_chans", "model.init_from",
                 "data.source", "data.root", "data.hf_name", "data.input_size")
DATA_KEYS = ("data.source", "data.root", "data.hf_name")


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a recipe as ``dataclasses.asdict`` gives it, as dotted keys)."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}.{key}" if prefix else key).items()}


def run_changing_differences(saved: Recipe, current: Recipe) -> Dict[str, Tuple[Any, Any]]:
    """The dotted keys that differ between two recipes and change the run (sorted), with both values."""
    a, b = flatten(dataclasses.asdict(saved)), flatten(dataclasses.asdict(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == prefix or k.startswith(prefix + ".") for prefix in NOT_RUN_CHANGING)}


def check_resume_recipe(saved: Recipe, current: Recipe, checkpoint: str) -> List[str]:
    """Raise :class:`~st3_hf.errors.ModelError` for another model, or listing the run-changing differences unless
    ``training.allow_recipe_change`` is set; returns the differences (used with the new values)."""
    # another network cannot take these weights, whatever training.allow_recipe_change says
    if (saved.model.name, saved.model.num_classes) != (current.model.name, current.model.num_classes):
        raise ModelError(f"checkpoint {checkpoint} was written for model {saved.model.name} with "
                         f"{saved.model.num_classes} classes, this recipe trains {current.model.name} with "
                         f"{current.model.num_classes}; resume with the recipe saved in {checkpoint}/recipe.yaml or "
                         f"start a new output_dir")
    differences = run_changing_differences(saved, current)
    if differences and not current.training.allow_recipe_change:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(differences.items())[:8])
        more = f" and {len(differences) - 8} more" if len(differences) > 8 else ""
        raise ModelError(f"checkpoint {checkpoint} was written by a different recipe: {shown}{more}; resume with "
                         f"the checkpoint's recipe.yaml, start a new output_dir, or pass "
                         f"training.allow_recipe_change=true to continue with the new values")
    return list(differences)


def describe_overrides(run: Recipe, shipped: Recipe) -> Recipe:
    """A copy of ``run`` whose description names the overrides that change the run (the identity keys first),
    without an inherited ``hub.dataset_name`` / ``hub.base_model`` claim that they made untrue.

    >>> from st3_hf.train.recipe_schema import Recipe
    >>> shipped, run = Recipe(description="ResNet-50 / ImageNet"), Recipe(description="ResNet-50 / ImageNet")
    >>> run.model.name = "resnet10t"
    >>> describe_overrides(run, shipped).description
    'ResNet-50 / ImageNet (overridden for this run: model.name=resnet10t)'
    """
    new, old = flatten(dataclasses.asdict(run)), flatten(dataclasses.asdict(shipped))
    changed = {k: new[k] for k in IDENTITY_KEYS if new[k] != old[k]}
    changed.update((k, v) for k, (_, v) in run_changing_differences(shipped, run).items() if k not in IDENTITY_KEYS)
    if run.training.max_steps != shipped.training.max_steps:  # a cut run is not the recipe's schedule
        changed["training.max_steps"] = run.training.max_steps
    if not changed:
        return run
    out = copy.deepcopy(run)
    if run.description == shipped.description:
        shown = ", ".join(f"{k}={'[' + ','.join(map(str, v)) + ']' if isinstance(v, list) else v}" for k, v in changed.items())
        out.description = f"{run.description} (overridden for this run: {shown})".strip()
    if any(k in changed for k in DATA_KEYS) and run.hub.dataset_name == shipped.hub.dataset_name:
        out.hub.dataset_name = run.data.hf_name if run.data.source == "hf" else None
    if "model.init_from" in changed and run.hub.base_model == shipped.hub.base_model:
        out.hub.base_model = None  # the recipe's base model is not the one this run started from
    return out
