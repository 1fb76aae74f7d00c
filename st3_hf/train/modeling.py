"""timm models from a recipe (new, or from a dense pretrained start), and the checks on them that run before any
expensive work: a bad model name fails in seconds.

>>> check_model_name("resnet50")
>>> check_model_name("resnet5O")  # doctest: +ELLIPSIS
Traceback (most recent call last):
st3_hf.errors.ConfigError: model.name 'resnet5O' is not a timm model (did you mean ...
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from st3_hf.errors import ConfigError
from st3_hf.sparse.config import SparsityConfig
from st3_hf.train.recipe_schema import ModelConfig

if TYPE_CHECKING:
    from st3_hf.hub.dense_start import DenseStart
    from st3_hf.train.recipe_schema import Recipe
def create_model(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised timm model as the recipe describes it (no download)."""
    import timm
    return set_bn_momentum(timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes,
                                             in_chans=cfg.in_chans, drop_rate=cfg.drop_rate, **cfg.kwargs), cfg.bn_momentum)


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` naming the closest timm models when ``name`` is not one."""
    import timm
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(f"model.name {name!r} is not a timm model{hint}; list the valid names with "
                      f"python -c \"import timm; print(timm.list_models('{name[:4]}*'))\"")


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters (and buffers) of the recipe's model, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = create_model(cfg)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def set_bn_momentum(model: nn.Module, momentum: Optional[float]) -> nn.Module:
    """Every BatchNorm's momentum (PyTorch convention); ``None`` keeps timm's."""
    if momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
    return model


def create_pretrained_model(cfg: ModelConfig, start: "DenseStart") -> nn.Module:
    """The dense model of ``start`` (located from ``cfg.pretrained``), with the recipe's head size and options."""
    from st3_hf.hub.dense_start import build_dense_model
    return set_bn_momentum(build_dense_model(start, num_classes=cfg.num_classes, in_chans=cfg.in_chans,
                                             drop_rate=cfg.drop_rate, kwargs=cfg.kwargs), cfg.bn_momentum)


def sparsity_config_for_start(sparsity: SparsityConfig, model: nn.Module, cfg: ModelConfig, start: "DenseStart") -> SparsityConfig:
    """``sparsity`` with a new head kept dense when ``model.head`` is "dense" (an inherited head is pruned as usual)."""
    if int(cfg.num_classes) == start.num_classes or cfg.head != "dense":  # the head is inherited, or pruned
        return sparsity
    from st3_hf.hub.pretrained import classifier_names
    heads = [h for h in classifier_names(model) if h not in sparsity.exclude]
    return dataclasses.replace(sparsity, exclude=tuple(sparsity.exclude) + tuple(heads))


def with_start_preprocessing(recipe: "Recipe", start: "DenseStart") -> "Recipe":
    """``recipe`` (re-validated) with the data keys it does not set itself (input size, mean/std,
    interpolation, crop) taken from the start's ``pretrained_cfg``."""
    from st3_hf.hub.dense_start import check_in_chans, data_defaults
    from st3_hf.train.recipe import GIVEN_KEYS_ATTR, keys_given, validate_recipe
    check_in_chans(start, recipe.model.in_chans)
    given = keys_given(recipe.data)
    updates = {key: value for key, value in data_defaults(start).items() if key not in given}
    if not updates:
        return recipe
    data = dataclasses.replace(recipe.data, **updates)
    object.__setattr__(data, GIVEN_KEYS_ATTR, frozenset(f.name for f in dataclasses.fields(data)))  # check them all now
    return validate_recipe(dataclasses.replace(recipe, data=data), source=f"recipe with the preprocessing of {start.name}")
