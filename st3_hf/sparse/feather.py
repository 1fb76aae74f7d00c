"""Feather (Glentis Georgoulakis, Retsinas & Maragos, BMVC 2023): the p-norm thresholding
operator and its scaled straight-through gradient.  Torch only.

Forward, per element, with the layer's threshold ``t``::

    q = sign(w) * (|w|^p - t^p)^(1/p)   where |w| > t,   0 elsewhere

(``p = 1`` is soft thresholding, ``p -> inf`` hard thresholding).  Backward is
straight through, scaled by ``theta`` on pruned weights:
``dL/dw = dL/dq`` where ``|w| > t`` and ``theta * dL/dq`` elsewhere.

    >>> w = torch.tensor([-2.0, 0.5, 3.0])
    >>> q, mask = feather_weight(w, torch.tensor(1.0), p=3.0)
    >>> [round(float(v), 4) for v in q], mask.tolist()
    ([-1.9129, 0.0, 2.9625], [True, False, True])
"""
from __future__ import annotations

from typing import Tuple

import torch

DEFAULT_P = 3.0
HIGH_SPARSITY = 0.95  # the reference halves the gradient of pruned weights above this target


def default_theta(target: float) -> float:
    """The reference's rule: ``theta = 0.5`` when the target sparsity exceeds 0.95, else 1.0.

    >>> default_theta(0.9), default_theta(0.98)
    (1.0, 0.5)
    """
    return 0.5 if target > HIGH_SPARSITY else 1.0


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


class FeatherRule:
    """How a Feather layer turns its latent weight into the forward weight (used by the pruned layers).

    >>> rule = FeatherRule(p=3.0, theta=0.5)
    >>> layer = torch.nn.Linear(2, 1)
    >>> with torch.no_grad(): _ = layer.latent_weight.copy_(torch.tensor([[0.2, -1.5]]))
    >>> q, mask = rule.effective(layer, torch.tensor(1.0))
    >>> mask.tolist()
    [[False, True]]
    """

    def __init__(self, p: float, theta: float):
        self.p = float(p)
        self.theta = float(theta)

    def effective(self, layer: torch.nn.Module, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return feather_weight(layer.latent_weight, threshold, self.p)  # type: ignore[arg-type]

    def dense_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        return layer.latent_weight  # type: ignore[return-value]

    def forward_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        return FeatherStraightThrough.apply(layer.latent_weight, layer.effective, layer.mask, self.theta)

    def __repr__(self) -> str:
        return f"FeatherRule(p={self.p}, theta={self.theta})"


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
        if ctx.theta == 1.0:
            return grad, None, None, None
        return torch.where(mask, grad, grad * ctx.theta), None, None, None
