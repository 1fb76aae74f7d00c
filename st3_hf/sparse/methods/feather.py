"""Feather (Glentis Georgoulakis, Retsinas & Maragos, BMVC 2023; docs/method.md, "Feather"): the p-norm
thresholding operator ``q = sign(w) (|w|^p - t^p)^(1/p)`` on kept weights, and a straight-through gradient
scaled by ``theta`` on pruned ones, with ST-3's global ``l1`` threshold.

    >>> w = torch.tensor([-2.0, 0.5, 3.0])
    >>> q, mask = feather_weight(w, torch.tensor(1.0), p=3.0)
    >>> [round(float(v), 4) for v in q], mask.tolist()
    ([-1.9129, 0.0, 2.9625], [True, False, True])
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch

from st3_hf.sparse.methods.base import SparsityMethod, refuse, register

DEFAULT_P = 3.0
HIGH_SPARSITY = 0.95  # the reference halves the gradient of pruned weights above this target (theta 0.5, else 1)


@torch.no_grad()
def feather_weight(weight: torch.Tensor, threshold: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q, mask)`` of one layer: the p-norm thresholded weight and ``|w| > t``."""
    magnitude = weight.abs()
    mask = magnitude > threshold
    # |w|^p - t^p can round to 0 (or below) just above the threshold: clamp before the root
    excess = (magnitude.pow(p) - threshold.pow(p)).clamp_min(0.0)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    # torch.where: pruned entries are +0.0, never -0.0
    q = torch.where(mask, weight.sign() * excess.pow(1.0 / p), zero)
    return q, mask


class FeatherStraightThrough(torch.autograd.Function):
    """Forward returns the effective weight; backward scales the gradient of pruned weights by ``theta``."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, effective: torch.Tensor, mask: torch.Tensor, theta: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.theta = theta
        return effective.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad if ctx.theta == 1.0 else torch.where(mask, grad, grad * ctx.theta), None, None, None


@register("feather")
class Feather(SparsityMethod):
    """``p``: the p-norm exponent (default 3); ``theta``: the gradient scale of pruned weights (see HIGH_SPARSITY)."""

    soft_threshold = True  # the p-norm operator
    config_keys = ("p", "theta")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.p, self.theta = float(config.p), float(config.theta)

    @classmethod
    def check(cls, config: Any) -> None:
        config.p = DEFAULT_P if config.p is None else config.p
        config.theta = (0.5 if config.target > HIGH_SPARSITY else 1.0) if config.theta is None else config.theta
        if not (config.p > 0 and math.isfinite(config.p)):
            refuse("p", f"must be a finite number > 0, got {config.p}")
        if not 0.0 <= config.theta <= 1.0:
            refuse("theta", f"must be in [0, 1], got {config.theta}")
        if config.rescale:
            refuse("rescale", "must stay off: feather has no rescaling step (an ST-3 switch)")
        if not (config.soft_threshold and config.straight_through):
            refuse("soft_threshold", "and straight_through must stay on: feather always thresholds with its p-norm "
                                     "operator and a scaled straight-through gradient (theta=0 masks the gradient)")

    def effective(self, layer: Any, latent: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return feather_weight(latent, threshold, self.p)

    def forward_weight(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        return FeatherStraightThrough.apply(latent, layer.effective, layer.mask, self.theta)
