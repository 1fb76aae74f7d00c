"""Pruned Conv2d / Linear layers: straight-through, soft-thresholded, rescaled.

A sparsified layer keeps ``weight`` as the latent dense ``nn.Parameter`` that the
optimizer updates, and holds the *effective* weight used by the forward pass in a
non-persistent buffer that the :class:`~st3_hf.Sparsifier` recomputes once per
optimizer update (not in every forward, which is what makes ST-3 cost about as
much as dense training).  The layers stay instances of ``nn.Conv2d`` /
``nn.Linear`` so timm, torch and accelerate tooling keep working.

Modes of a layer:

* ``dense``  – before pruning starts (ratio 0): forward uses ``weight``.
* ``pruned`` – forward uses the effective weight ``q``; the gradient goes
  straight through to ``weight`` (or is masked, for GMP).
* ``frozen`` – after :meth:`Sparsifier.freeze`: ``weight`` holds ``q`` and the
  mask is fixed; forward uses ``weight * mask``.
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

RESCALE_EPS = 1e-6
RESCALE_OFFSET = 0.01
RESCALE_NUMERATOR = 1.01


class _StraightThrough(torch.autograd.Function):
    """Forward returns the effective weight, backward passes the gradient to the latent one."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, effective: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return effective.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class _MaskedGradient(torch.autograd.Function):
    """Forward returns the effective weight, backward masks the gradient (classic GMP)."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, effective: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return effective.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


@torch.no_grad()
def effective_weight(
    weight: torch.Tensor, threshold: torch.Tensor, soft_threshold: bool, rescale: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q, mask)`` of one layer for a threshold, as in the method page (steps 1-2)."""
    magnitude = weight.abs()
    mask = magnitude > threshold
    # torch.where, not "* mask": pruned entries become +0.0, never -0.0 (which would not
    # compress, and which some sparse formats treat as a non-zero)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    if soft_threshold:
        q = torch.where(mask, weight - weight.sign() * threshold, zero)
    else:
        q = torch.where(mask, weight, zero)
    if rescale:
        dims = tuple(range(1, weight.dim()))
        kept = (magnitude * mask).mean(dim=dims) if dims else magnitude * mask
        total = magnitude.mean(dim=dims) if dims else magnitude
        ratio = (kept + RESCALE_EPS) / (total + RESCALE_EPS)
        scale = RESCALE_NUMERATOR / (ratio + RESCALE_OFFSET)
        q = q * scale.view(-1, *([1] * (weight.dim() - 1)))
    return q, mask


class WeightRule(Protocol):
    """A method's own forward weight and gradient path (:mod:`st3_hf.feather`, :mod:`st3_hf.probmask`).

    Layers without a rule use the ST-3 switches (soft threshold, rescale, straight through).
    """

    def effective(self, layer: nn.Module, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, mask)`` now, without gradient (cached by the layer, used for evaluation and freezing)."""

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        """The forward weight before pruning starts."""

    def forward_weight(self, layer: nn.Module) -> torch.Tensor:
        """The forward weight while pruned, with the method's gradient path to the latent weight."""


class SparseLayerMixin:
    """What every sparsified layer adds to its ``nn.Conv2d`` / ``nn.Linear`` base."""

    weight: nn.Parameter
    effective: torch.Tensor
    mask: torch.Tensor
    threshold: torch.Tensor
    weight_rule: Optional[WeightRule] = None  # set by sparsify() for methods other than the ST-3 family

    def _init_sparse_state(self, soft_threshold: bool, rescale: bool, straight_through: bool) -> None:
        w = self.weight
        # non-persistent: model.state_dict() stays exactly timm's; the Sparsifier saves these
        self.register_buffer("effective", torch.empty_like(w, requires_grad=False), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=w.device), persistent=False)  # type: ignore[attr-defined]
        self.sparse_mode = "dense"
        self.soft_threshold = soft_threshold
        self.rescale = rescale
        self.straight_through = straight_through
        self._synced_version = -1

    @property
    def sigma(self) -> float:
        """``1 / sqrt(sum(weight.shape))``: the layer's scale for the ``l1std`` criterion."""
        return 1.0 / float(sum(self.weight.shape)) ** 0.5

    @torch.no_grad()
    def set_threshold(self, threshold: torch.Tensor) -> None:
        """Prune with ``threshold`` now: recompute mask and effective weight from ``weight``."""
        if self.sparse_mode == "frozen":
            raise RuntimeError("the layer is frozen; its mask no longer moves")
        self.threshold.copy_(threshold)
        self.sparse_mode = "pruned"
        self.refresh()

    @torch.no_grad()
    def make_dense(self) -> None:
        """Back to the dense layer (ratio 0): forward uses ``weight``."""
        if self.sparse_mode == "frozen":
            raise RuntimeError("the layer is frozen; its mask no longer moves")
        self.threshold.zero_()
        self.mask.fill_(True)
        self.sparse_mode = "dense"
        self._synced_version = self.weight._version

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the effective weight from the current latent weight and threshold."""
        if self.sparse_mode == "pruned":
            q, mask = self._effective_and_mask()
            self.effective.copy_(q)
            self.mask.copy_(mask)
        elif self.sparse_mode == "frozen":
            self.weight.masked_fill_(~self.mask, 0.0)
        self._synced_version = self.weight._version

    def _effective_and_mask(self) -> Tuple[torch.Tensor, torch.Tensor]:
        threshold = self.threshold.to(self.weight.dtype)
        if self.weight_rule is not None:
            return self.weight_rule.effective(self, threshold)
        return effective_weight(self.weight, threshold, self.soft_threshold, self.rescale)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the latent weight by the effective one and fix the mask."""
        if self.sparse_mode == "pruned":
            self.refresh()
            self.weight.copy_(self.effective)
        elif self.sparse_mode == "dense":
            self.mask.copy_(self.weight != 0)
        self.sparse_mode = "frozen"
        self.refresh()

    @torch.no_grad()
    def used_weight(self) -> torch.Tensor:
        """The weight the forward pass uses now, detached (fresh even after an edit of ``weight``)."""
        if self.sparse_mode == "pruned":
            if self.weight._version != self._synced_version:
                self.refresh()
            return self.effective.detach()
        if self.sparse_mode == "frozen":
            return (self.weight * self.mask).detach()
        return self.weight.detach()

    def current_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (with the right gradient path).

        Edits of ``weight`` through autograd-visible in-place ops (optimizers,
        ``load_state_dict``, ``with torch.no_grad(): w.mul_(...)``) are detected
        by the tensor's version counter; edits through ``weight.data`` are not:
        call ``sparsifier.refresh()`` after those.
        """
        mode = self.sparse_mode
        if mode == "dense":
            return self.weight if self.weight_rule is None else self.weight_rule.dense_weight(self)
        if mode == "frozen":
            return self.weight * self.mask
        if not torch.compiler.is_compiling() and self.weight._version != self._synced_version:
            # the latent weight changed outside the optimizer hook (loaded, edited): never use stale q
            self.refresh()
        if self.weight_rule is not None:
            return self.weight_rule.forward_weight(self)
        if self.straight_through:
            return _StraightThrough.apply(self.weight, self.effective)
        return _MaskedGradient.apply(self.weight, self.effective, self.mask)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
        self.refresh()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse_mode={self.sparse_mode}"  # type: ignore[misc]


class STConv2d(SparseLayerMixin, nn.Conv2d):
    """ST-3 ``nn.Conv2d`` (grouped and depthwise included)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.current_weight(), self.bias)


class STLinear(SparseLayerMixin, nn.Linear):
    """ST-3 ``nn.Linear``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.current_weight(), self.bias)


_SPARSE_CLASS_CACHE: Dict[type, Type[nn.Module]] = {nn.Conv2d: STConv2d, nn.Linear: STLinear}


def sparse_class_for(module: nn.Module) -> Type[nn.Module]:
    """The pruned class that replaces ``type(module)``; subclasses keep their base type.

    Raises ``NotImplementedError`` for Conv2d subclasses with their own forward
    (e.g. weight-standardised convs), which cannot be pruned faithfully here:
    exclude them with ``SparsityConfig(exclude=[...])``.
    """
    cls = type(module)
    if cls in _SPARSE_CLASS_CACHE:
        return _SPARSE_CLASS_CACHE[cls]
    if issubclass(cls, nn.Linear):
        base = STLinear  # timm's Linear only adds a dtype cast, which STLinear.forward does too
    elif issubclass(cls, nn.Conv2d):
        if cls.forward is not nn.Conv2d.forward:
            raise NotImplementedError(
                f"{cls.__module__}.{cls.__name__} overrides Conv2d.forward and cannot be pruned by st3_hf; "
                "keep it dense with SparsityConfig(exclude=['<module name pattern>'])"
            )
        base = STConv2d
    else:
        raise TypeError(f"{cls.__name__} is not a Conv2d or Linear")
    sparse_cls = type(f"ST3{cls.__name__}", (base, cls), {"__module__": __name__})
    _SPARSE_CLASS_CACHE[cls] = sparse_cls
    return sparse_cls


def is_prunable(module: nn.Module) -> bool:
    """Every Conv2d and Linear (not yet sparsified) is prunable."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, SparseLayerMixin)
