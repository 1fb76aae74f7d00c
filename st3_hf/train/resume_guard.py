"""Resuming with a recipe that differs from the checkpoint's: refused unless asked for explicitly.

A checkpoint holds the sparsity schedule, optimizer and data position of the run that wrote it; a
different batch size, target or learning rate would mix two runs into one that neither recipe
describes. Keys that only say how a run is observed or stored (logging, hub, checkpoint cadence,
``max_steps`` to extend a run...) may change freely.

    >>> from st3_hf.train.recipe_schema import Recipe
    >>> a, b = Recipe(), Recipe()
    >>> b.sparsity.target = 0.95
    >>> run_changing_differences(a, b)
    {'sparsity.target': (0.9, 0.95)}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

from st3_hf.errors import ModelError
from st3_hf.train.recipe_schema import Recipe

ALLOW_KEY = "training.allow_recipe_change"

# dotted keys (or section prefixes) whose value does not change what is computed
NOT_RUN_CHANGING = (
    "output_dir", "description", "expected", "logging", "hub", "evaluation", "data.num_workers", "data.eval_batch_size",
    "training.max_steps", "training.resume_from_checkpoint", "training.allow_recipe_change", "training.overwrite_output_dir",
    "training.checkpoint_every_steps", "training.checkpoint_every_epoch", "training.keep_checkpoints",
    "training.log_every_steps", "training.max_consecutive_nonfinite_steps", "training.collective_timeout_s",
)


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a recipe as ``dataclasses.asdict`` gives it, as dotted keys)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: Dict[str, Any] = {}
    for key, sub in value.items():
        out.update(flatten(sub, f"{prefix}.{key}" if prefix else key))
    return out


def run_changing_differences(saved: Recipe, current: Recipe) -> Dict[str, Tuple[Any, Any]]:
    """The dotted keys that differ between two recipes and change the run (sorted), with both values."""
    a, b = flatten(dataclasses.asdict(saved)), flatten(dataclasses.asdict(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == prefix or k.startswith(prefix + ".") for prefix in NOT_RUN_CHANGING)}


def check_resume_recipe(saved: Recipe, current: Recipe, checkpoint: str) -> List[str]:
    """Raise :class:`~st3_hf.errors.ModelError` listing the run-changing differences, unless
    ``training.allow_recipe_change`` is set; returns the differences (used with the new values)."""
    differences = run_changing_differences(saved, current)
    if differences and not current.training.allow_recipe_change:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(differences.items())[:8])
        more = f" and {len(differences) - 8} more" if len(differences) > 8 else ""
        raise ModelError(f"checkpoint {checkpoint} was written by a different recipe: {shown}{more}; resume with "
                         f"the checkpoint's recipe.yaml, start a new output_dir, or pass {ALLOW_KEY}=true to "
                         f"continue with the new values")
    return list(differences)
