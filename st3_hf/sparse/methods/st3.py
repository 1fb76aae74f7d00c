"""ST-3 and ST-3σ (docs/method.md, "ST-3"): soft threshold, per-channel rescale, straight-through gradient.

The same layer rule with switches off gives the baselines of :mod:`~st3_hf.sparse.methods.gmp`;
:mod:`~st3_hf.sparse.fused_update` computes this rule for all layers at once (bit-identical), and
:mod:`~st3_hf.sparse.fsdp` from the gathered weight.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from st3_hf.sparse.methods.base import SparsityMethod, register


def _share(effective: torch.Tensor) -> torch.Tensor:
    # eager: a view of the buffer, no copy per read (the buffer changes only in the optimizer
    # update, after backward); compiled graphs get a copy so no graph aliases a mutated buffer
    return effective.clone() if torch.compiler.is_compiling() else effective.view_as(effective)


class StraightThrough(torch.autograd.Function):
    """Forward returns the effective weight, backward passes the gradient to the latent one."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, effective: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _share(effective)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class MaskedGradient(torch.autograd.Function):
    """Forward returns the effective weight, backward masks the gradient (classic GMP)."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, effective: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return _share(effective)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


@torch.no_grad()
def effective_weight(weight: torch.Tensor, threshold: torch.Tensor, soft_threshold: bool, rescale: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q, mask)`` of one layer for a threshold, as in docs/method.md (steps 1-2)."""
    magnitude = weight.abs()
    mask = magnitude > threshold
    # torch.where, not "* mask": pruned entries become +0.0, never -0.0 (which would not
    # compress, and which some sparse formats treat as a non-zero)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    q = torch.where(mask, weight - weight.sign() * threshold if soft_threshold else weight, zero)
    if rescale:
        scale = rescale_factor(row_means((magnitude * mask).reshape(weight.shape[0], -1)),
                               row_means(magnitude.reshape(weight.shape[0], -1)))
        q = q * scale.view(-1, *([1] * (weight.dim() - 1)))
    return q, mask


def row_means(rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of each row of a 2-d tensor as one gemv, ``rows @ (1/n)`` (~50x faster on the CPU than ``mean(1)``;
    the fused update calls this same function, so both paths agree bit for bit)."""
    ones = torch.full((rows.shape[1],), 1.0 / rows.shape[1], dtype=rows.dtype, device=rows.device)
    return torch.mv(rows, ones, out=out) if out is not None else torch.mv(rows, ones)


def rescale_factor(kept_mean: torch.Tensor, total_mean: torch.Tensor) -> torch.Tensor:
    """Per-channel ST-3 rescale ``1.01 / (r + 0.01)``, ``r = (kept + 1e-6) / (total + 1e-6)`` (docs/method.md, step 2)."""
    return 1.01 / ((kept_mean + 1e-6) / (total_mean + 1e-6) + 0.01)


@register("st3")
class ST3(SparsityMethod):
    """The layer rule of the switches (``soft_threshold``, ``rescale``, ``straight_through``) and the global threshold."""

    soft_threshold = rescale = straight_through = True

    def effective(self, layer: Any, latent: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return effective_weight(latent, threshold, layer.soft_threshold, layer.rescale)

    def forward_weight(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        return (StraightThrough.apply(latent, layer.effective) if layer.straight_through
                else MaskedGradient.apply(latent, layer.effective, layer.mask))

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        # a subclass with a rule or gradient of its own takes the per-layer path
        cls = type(self)
        return cls.effective is ST3.effective and cls.forward_weight is ST3.forward_weight and cls.read is ST3.read


@register("st3_sigma")
class ST3Sigma(ST3):
    """ST-3σ: ST-3 with the ``l1std`` criterion (layer threshold ``T * sigma_l``, ``sigma_l = 1 / sqrt(sum(shape))``)."""

    criterion = "l1std"
