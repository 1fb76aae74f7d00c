"""Optimizer and learning-rate schedule of a recipe (counted in optimizer steps)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from st3_hf.train.lrr import Phase, schedule_step
from st3_hf.train.recipe_schema import LRScheduleConfig, OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    own_groups: Sequence[Dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """SGD (reference) or AdamW, optionally without weight decay on norm layers and biases; ``own_groups``
    (ProbMask's probabilities: ``{"params": [...], "lr": 0.1, "weight_decay": 0.0}``) keep their settings
    and their parameters out of the model's groups (the lr schedule scales every group alike)."""
    taken = {id(p) for group in own_groups for p in group["params"]}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    groups: List[dict] = ([{"params": params}] if cfg.decay_norm_and_bias
                          else [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    groups += [dict(group) for group in own_groups if group["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)  # adamw (the recipe's choices)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduleConfig, steps_per_epoch: int, total_steps: int,
                       base_lr: float, phases: Optional[List[Phase]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per real optimizer update (accelerate checkpoints it): linear warm-up, then the
    schedule; with ``phases`` (:mod:`st3_hf.train.lrr`) it restarts where a phase rewinds the lr, and in the
    fine-tuning phase the cosine runs on past ``total_steps`` (rising again, as the reference's)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    min_factor = cfg.min_lr / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        step, past_end = (step, False) if phases is None else schedule_step(phases, step, steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * (progress if past_end else min(1.0, progress))))
        if cfg.name == "step":
            return cfg.gamma ** sum(1 for m in cfg.milestones if step / steps_per_epoch >= m)
        return 1.0  # constant

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
