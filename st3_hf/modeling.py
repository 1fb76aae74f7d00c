"""timm models from a recipe, and the recipe's sparsity section as a :class:`SparsityConfig`."""
from __future__ import annotations

import torch.nn as nn

from .config import SparsityConfig
from .recipe_schema import ModelConfig, SparsityRecipe


def create_model(cfg: ModelConfig, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised timm model as the recipe describes it (no download)."""
    import timm

    model = timm.create_model(
        cfg.name,
        pretrained=False,
        num_classes=cfg.num_classes if num_classes is None else num_classes,
        in_chans=cfg.in_chans,
        drop_rate=cfg.drop_rate,
        **cfg.kwargs,
    )
    if cfg.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.bn_momentum
    return model


def sparsity_config(cfg: SparsityRecipe, steps_per_epoch: int) -> SparsityConfig:
    """Convert the recipe's epoch-based ramp to optimizer steps."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return SparsityConfig(
        method=cfg.method,
        target=cfg.target,
        start_step=int(round(cfg.start_epoch * steps_per_epoch)),
        end_step=int(round(cfg.end_epoch * steps_per_epoch)),
        power=cfg.power,
        exclude=tuple(cfg.exclude),
    )
