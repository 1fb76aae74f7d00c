"""Keep a recipe's description and dataset claim true when overrides change what it trains.

``r50_st3_98.yaml model.name=resnet10t data.root=/my/folder`` does not train "ResNet-50 /
ImageNet-1k": the description then names the overrides (what the model is first, then every
other one that changes the run: ``training.*``, ``data.hflip``, ``data.batch_size``...), and
``hub.dataset_name`` (which the card and the Hub metadata show) is dropped unless it was
overridden too.

    >>> from st3_hf.train.recipe_schema import Recipe
    >>> shipped, run = Recipe(description="ResNet-50 / ImageNet"), Recipe(description="ResNet-50 / ImageNet")
    >>> run.model.name = "resnet10t"
    >>> describe_overrides(run, shipped).description
    'ResNet-50 / ImageNet (overridden for this run: model.name=resnet10t)'
"""
from __future__ import annotations

import copy
from typing import Any

from st3_hf.train.recipe_schema import Recipe
from st3_hf.train.resume_guard import run_changing_differences

# what a description and a dataset name speak about
IDENTITY_KEYS = ("model.name", "model.num_classes", "model.in_chans", "model.init_from",
                 "data.source", "data.root", "data.hf_name", "data.input_size")
DATA_KEYS = ("data.source", "data.root", "data.hf_name")


def _get(recipe: Recipe, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def describe_overrides(run: Recipe, shipped: Recipe) -> Recipe:
    """A copy of ``run`` whose description names the identity overrides (and without an inherited dataset claim)."""
    keys = [k for k in IDENTITY_KEYS if _get(run, k) != _get(shipped, k)]
    others = {k: new for k, (_, new) in run_changing_differences(shipped, run).items() if k not in IDENTITY_KEYS}
    if run.training.max_steps != shipped.training.max_steps:  # a cut run is not the recipe's schedule
        others["training.max_steps"] = run.training.max_steps
    if not keys and not others:
        return run
    out = copy.deepcopy(run)
    if run.description == shipped.description:
        shown = ", ".join([f"{k}={_format(_get(run, k))}" for k in keys]
                          + [f"{k}={_format(v)}" for k, v in others.items()])
        out.description = f"{run.description} (overridden for this run: {shown})".strip()
    if any(k in keys for k in DATA_KEYS) and run.hub.dataset_name == shipped.hub.dataset_name:
        out.hub.dataset_name = run.data.hf_name if run.data.source == "hf" else None
    if "model.init_from" in keys and run.hub.base_model == shipped.hub.base_model:
        out.hub.base_model = None  # the recipe's base model is not the one this run started from
    return out


def _format(value: Any) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
