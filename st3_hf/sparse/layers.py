"""Pruned Conv2d / Linear layers: straight-through, soft-thresholded, rescaled.

Mechanism (why a ``weight`` property): timm reads weights in more places than a
layer's own ``forward`` -- ``EvaAttention`` calls ``F.linear(x, self.qkv.weight)``,
``Conv2dSame`` pads and calls ``conv2d_same(x, self.weight, ...)``, MHA reads
``out_proj.weight``.  Pruning must therefore happen where the weight is *read*.  A
sparsified layer keeps the latent dense ``nn.Parameter`` where torch keeps it
(``_parameters["weight"]``: ``model.parameters()``, the optimizer, DDP/FSDP and
``model.state_dict()`` keys are exactly timm's) and its class gets a ``weight``
property that returns the pruned weight with the method's gradient.  A
parametrization would rename the key to ``parametrizations.weight.original`` and
recompute the effective weight in every forward; the property returns a view of an
effective-weight buffer that the :class:`~st3_hf.Sparsifier` refreshes once per
optimizer update (which is what makes ST-3 cost about as much as dense training).

* ``layer.weight``        -- what every reader gets: the effective weight (pruned mode),
  ``latent * mask`` (frozen), the latent weight (dense); differentiable towards the latent.
* ``layer.latent_weight`` -- the ``nn.Parameter`` itself (what the optimizer updates).

Modes of a layer:

* ``dense``  -- before pruning starts (ratio 0): readers get ``latent_weight``.
* ``pruned`` -- readers get the effective weight ``q``; the gradient goes
  straight through to the latent weight (or is masked, for GMP).
* ``frozen`` -- after :meth:`Sparsifier.freeze`: the latent weight holds ``q`` and the
  mask is fixed; readers get ``latent * mask``.

Extension point for other methods: :meth:`SparseLayerMixin.compute_effective`
returns ``(effective, mask)`` from the latent weight and threshold, and
:meth:`SparseLayerMixin.pruned_weight` applies the autograd function that gives the
method's gradient.  The :class:`~st3_hf.Sparsifier` fuses the built-in rules over
all layers at once (:mod:`st3_hf.sparse.fused_update`) and falls back to these per-layer
methods for anything else.
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf.errors import UnsupportedLayerError

#: set by :func:`st3_hf.sparse.macs.count_macs`: every weight read appends (layer, tensor read)
READ_LOG: Optional[list] = None

RESCALE_EPS = 1e-6
RESCALE_OFFSET = 0.01
RESCALE_NUMERATOR = 1.01


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of an FSDP2 DTensor, ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


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
def effective_weight(
    weight: torch.Tensor, threshold: torch.Tensor, soft_threshold: bool, rescale: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q, mask)`` of one layer for a threshold, as in docs/method.md (steps 1-2)."""
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
        kept = row_means((magnitude * mask).reshape(weight.shape[0], -1))
        total = row_means(magnitude.reshape(weight.shape[0], -1))
        scale = rescale_factor(kept, total)
        q = q * scale.view(-1, *([1] * (weight.dim() - 1)))
    return q, mask


def row_means(rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of each row of a 2-d tensor, as one matrix-vector product.

    ``rows @ ones / n`` instead of ``rows.mean(1)``: the same value up to float rounding,
    but a BLAS gemv, ~50x faster on the CPU than the generic reduction; the fused
    update uses this same function so both paths agree bit for bit.
    """
    ones = torch.full((rows.shape[1],), 1.0 / rows.shape[1], dtype=rows.dtype, device=rows.device)
    return torch.mv(rows, ones, out=out) if out is not None else torch.mv(rows, ones)


def rescale_factor(kept_mean: torch.Tensor, total_mean: torch.Tensor) -> torch.Tensor:
    """Per-channel ST-3 rescale ``1.01 / (r + 0.01)``, ``r = (kept + 1e-6) / (total + 1e-6)`` (docs/method.md, step 2)."""
    ratio = (kept_mean + RESCALE_EPS) / (total_mean + RESCALE_EPS)
    return RESCALE_NUMERATOR / (ratio + RESCALE_OFFSET)


class WeightRule(Protocol):
    """A method's own forward weight and gradient path (:mod:`st3_hf.sparse.feather`, :mod:`st3_hf.sparse.probmask`).

    Layers without a rule use the ST-3 switches (soft threshold, rescale, straight through).
    """

    def effective(self, layer: nn.Module, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, mask)`` now, without gradient (cached by the layer, used for evaluation and freezing)."""

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        """The forward weight before pruning starts."""

    def forward_weight(self, layer: nn.Module) -> torch.Tensor:
        """The forward weight while pruned, with the method's gradient path to the latent weight."""


class SparseLayerMixin:
    """What every sparsified layer adds to its ``nn.Conv2d`` / ``nn.Linear`` base.

    >>> import torch
    >>> from st3_hf import sparsify
    >>> lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> sp = sparsify(lin, method="st3", target=0.5, end_step=10); sp.apply(0.5)
    >>> layer = lin[0]
    >>> bool((layer.weight == 0).float().mean() == 0.5), type(layer.latent_weight).__name__
    (True, 'Parameter')
    >>> list(lin.state_dict())
    ['0.weight', '0.bias']
    """

    effective: torch.Tensor
    mask: torch.Tensor
    threshold: torch.Tensor
    weight_rule: Optional[WeightRule] = None  # set by sparsify() for methods other than the ST-3 family

    @property
    def latent_weight(self) -> nn.Parameter:
        """The dense ``nn.Parameter`` the optimizer updates (``state_dict`` key ``weight``)."""
        return self._parameters["weight"]  # type: ignore[attr-defined,return-value]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """What any reader of the weight gets: the pruned weight, differentiable to the latent one."""
        return self.current_weight()

    def _init_sparse_state(self, soft_threshold: bool, rescale: bool, straight_through: bool) -> None:
        w = self.latent_weight
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
        return 1.0 / float(sum(self.latent_weight.shape)) ** 0.5

    # ------------------------------------------------------------- per-method extension point
    @torch.no_grad()
    def compute_effective(self, latent: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(effective, mask)`` of this layer for ``threshold`` (steps 1-2 of docs/method.md, or the layer's ``weight_rule``)."""
        threshold = threshold.to(latent.dtype)
        if self.weight_rule is not None:
            return self.weight_rule.effective(self, threshold)
        return effective_weight(latent, threshold, self.soft_threshold, self.rescale)

    def pruned_weight(self, latent: torch.Tensor) -> torch.Tensor:
        """The effective weight, through the autograd function that gives the method's gradient."""
        if self.weight_rule is not None:
            return self.weight_rule.forward_weight(self)
        if self.straight_through:
            return StraightThrough.apply(latent, self.effective)
        return MaskedGradient.apply(latent, self.effective, self.mask)

    # ------------------------------------------------------------- state changes
    @torch.no_grad()
    def set_threshold(self, threshold: torch.Tensor) -> None:
        """Prune with ``threshold`` now: recompute mask and effective weight from the latent weight."""
        if self.sparse_mode == "frozen":
            raise RuntimeError("the layer is frozen; its mask no longer moves")
        self.threshold.copy_(threshold)
        self.sparse_mode = "pruned"
        self.refresh()

    @torch.no_grad()
    def make_dense(self) -> None:
        """Back to the dense layer (ratio 0): readers get the latent weight."""
        if self.sparse_mode == "frozen":
            raise RuntimeError("the layer is frozen; its mask no longer moves")
        self.threshold.zero_()
        self.mask.fill_(True)
        self.sparse_mode = "dense"
        self._synced_version = local_tensor(self.latent_weight)._version

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the effective weight from the current latent weight and threshold."""
        latent = local_tensor(self.latent_weight)
        if self.sparse_mode == "pruned":
            q, mask = self.compute_effective(latent, self.threshold)
            self.effective.copy_(q)
            self.mask.copy_(mask)
        elif self.sparse_mode == "frozen":
            latent.masked_fill_(~self.mask, 0.0)
        self._synced_version = latent._version

    def mark_synced(self) -> None:
        """Record that ``effective``/``mask`` match the latent weight now (after an outside refresh)."""
        self._synced_version = local_tensor(self.latent_weight)._version

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the latent weight by the effective one and fix the mask."""
        latent = local_tensor(self.latent_weight)
        if self.sparse_mode == "pruned":
            self.refresh()
            latent.copy_(self.effective)
        elif self.sparse_mode == "dense":
            self.mask.copy_(latent != 0)
        self.sparse_mode = "frozen"
        self.refresh()

    # ------------------------------------------------------------- reads
    @torch.no_grad()
    def used_weight(self) -> torch.Tensor:
        """The weight readers get now, detached (this process's rows under FSDP2)."""
        latent = local_tensor(self.latent_weight)
        if self.sparse_mode == "pruned":
            if latent._version != self._synced_version:
                self.refresh()
            return self.effective.detach()
        if self.sparse_mode == "frozen":
            return (latent * self.mask).detach()
        return latent.detach()

    def current_weight(self) -> torch.Tensor:
        """The weight readers get (with the method's gradient path); ``layer.weight`` returns it.

        Edits of the latent weight through autograd-visible in-place ops (optimizers,
        ``load_state_dict``, ``with torch.no_grad(): layer.latent_weight.mul_(...)``) are
        detected by the tensor's version counter; edits through ``.data`` are not:
        call ``sparsifier.refresh()`` after those.
        """
        latent = self.latent_weight
        mode = self.sparse_mode
        if getattr(self.weight_rule, "reads_in_forward", False):
            # FSDP2 (st3_hf/sparse/fsdp.py): the gathered weight is only here during forward/backward
            out = self.weight_rule.read(self, latent)  # type: ignore[union-attr]
        elif mode == "dense":
            out = latent if self.weight_rule is None else self.weight_rule.dense_weight(self)
        elif mode == "frozen":
            out = latent * self.mask
        else:
            if not torch.compiler.is_compiling() and latent._version != self._synced_version:
                # the latent weight changed outside the optimizer hook (loaded, edited): never use stale q
                self.refresh()
            out = self.pruned_weight(latent)
        if READ_LOG is not None and not torch.compiler.is_compiling():
            READ_LOG.append((self, out))
        return out

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

# Convs that transform their weight before using it: pruning the weight they read would be
# undone by the transform (standardising a sparse weight fills its zeros back in, and plain
# timm re-standardises the stored weight at load), so no zeros would reach the computation.
_WEIGHT_STANDARDISED = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def sparse_class_for(module: nn.Module) -> Type[nn.Module]:
    """The pruned class that replaces ``type(module)``; subclasses keep their own ``forward``.

    A subclass's ``forward`` (timm's ``Conv2dSame`` padding, a dtype cast) runs
    unchanged: it reads ``self.weight``, which is the pruned weight.  Raises
    :class:`~st3_hf.errors.UnsupportedLayerError` for weight-standardised convs and for
    layers whose weight is a ``torch.nn.utils.parametrize`` parametrization.
    """
    cls = type(module)
    if cls in _SPARSE_CLASS_CACHE:
        return _SPARSE_CLASS_CACHE[cls]
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        raise UnsupportedLayerError(
            f"{cls.__name__} has a torch.nn.utils.parametrize parametrization on its weight, which st3_hf "
            "cannot prune (the stored tensor is not the weight the layer uses); call "
            "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') first, or keep it dense "
            "with SparsityConfig(exclude=['<module name pattern>'])"
        )
    if cls.__name__ in _WEIGHT_STANDARDISED or any(b.__name__ in _WEIGHT_STANDARDISED for b in cls.__mro__):
        raise UnsupportedLayerError(
            f"{cls.__module__}.{cls.__name__} standardises its weight in every forward (weight standardisation, "
            "BiT/resnetv2/NFNet): that fills the pruned zeros back in, and plain timm re-standardises any stored "
            "weight at load, so no sparsity would survive; keep these layers dense with "
            "SparsityConfig(exclude=['<module name pattern>']) or pick a model with plain convs"
        )
    if issubclass(cls, nn.Linear):
        base: Type[nn.Module] = STLinear
        own_forward = cls.forward is not nn.Linear.forward
    elif issubclass(cls, nn.Conv2d):
        base = STConv2d
        own_forward = cls.forward is not nn.Conv2d.forward
    else:
        raise TypeError(f"{cls.__name__} is not a Conv2d or Linear")
    # the subclass's own forward (padding, casts) must win over ST*.forward: it reads self.weight
    body = {"__module__": __name__}
    if own_forward:
        body["forward"] = cls.forward
    sparse_cls = type(f"ST3{cls.__name__}", (base, cls), body)
    _SPARSE_CLASS_CACHE[cls] = sparse_cls
    return sparse_cls


def is_prunable(module: nn.Module) -> bool:
    """Every Conv2d and Linear (not yet sparsified) is prunable."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, SparseLayerMixin)
