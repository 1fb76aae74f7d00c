"""Pruned Conv2d / Linear layers: the pruned weight is served where the weight is *read*.

Why a ``weight`` property: timm reads weights outside a layer's own ``forward`` (``EvaAttention``'s
``F.linear(x, self.qkv.weight)``, ``Conv2dSame``, MHA's ``out_proj.weight``). The latent dense ``nn.Parameter``
stays in ``_parameters["weight"]`` (parameters, optimizers, DDP/FSDP and ``state_dict`` keys are exactly timm's);
the property returns the pruned weight with the method's gradient: a view of an ``effective`` buffer refreshed
once per optimizer update (a parametrization would rename the key and recompute the weight in every forward).

Modes: ``dense`` (ratio 0: readers get ``latent_weight``), ``pruned`` (the effective weight ``q``, gradient by
the method), ``frozen`` (the latent weight holds ``q``, readers get ``latent * mask``). The rule is
``layer.sparsity_method``'s (:mod:`st3_hf.sparse.methods`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf.errors import ConfigError

#: set by :func:`st3_hf.sparse.macs.count_macs`: every weight read appends (layer, tensor read)
READ_LOG: Optional[list] = None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of an FSDP2 DTensor, ``t`` itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


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
    sparsity_method: Any  # the model's SparsityMethod (set by sparsify(); FSDP2 gives each layer its sharded read)

    @property
    def latent_weight(self) -> nn.Parameter:
        """The dense ``nn.Parameter`` the optimizer updates (``state_dict`` key ``weight``)."""
        return self._parameters["weight"]  # type: ignore[attr-defined,return-value]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """What any reader of the weight gets: the pruned weight, with the method's gradient to the latent one.
        In-place edits of the latent weight (optimizers, ``load_state_dict``, ``mul_`` under ``no_grad``) show in
        its version counter; edits through ``.data`` do not: call ``sparsifier.refresh()`` after those."""
        out = self.sparsity_method.read(self, self.latent_weight)
        if READ_LOG is not None and not torch.compiler.is_compiling():
            READ_LOG.append((self, out))
        return out

    def _init_sparse_state(self, method: Any) -> None:
        w = self.latent_weight
        # non-persistent: model.state_dict() stays exactly timm's; the Sparsifier saves these
        self.register_buffer("effective", torch.empty_like(w, requires_grad=False), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=w.device), persistent=False)  # type: ignore[attr-defined]
        c = method.config
        self.soft_threshold, self.rescale, self.straight_through = c.soft_threshold, c.rescale, c.straight_through
        self.sparse_mode, self._synced_version, self.sparsity_method = "dense", -1, method
        method.attach(self)

    @property
    def sigma(self) -> float:
        """``1 / sqrt(sum(weight.shape))``: the layer's scale for the ``l1std`` criterion."""
        return 1.0 / float(sum(self.latent_weight.shape)) ** 0.5

    @torch.no_grad()
    def compute_effective(self, latent: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(effective, mask)`` of this layer for ``threshold``: the method's rule."""
        return self.sparsity_method.effective(self, latent, threshold.to(latent.dtype))

    @torch.no_grad()
    def set_threshold(self, threshold: Optional[torch.Tensor]) -> None:
        """Prune with ``threshold`` now (mask and effective weight from the latent weight); ``None``: back to the
        dense layer (ratio 0), readers get the latent weight."""
        if self.sparse_mode == "frozen":
            raise RuntimeError("the layer is frozen; its mask no longer moves")
        if threshold is None:
            self.threshold.zero_()
            self.mask.fill_(True)
            self.sparse_mode = "dense"
            return self.mark_synced()
        self.threshold.copy_(threshold)
        self.sparse_mode = "pruned"
        self.refresh()

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

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
        self.refresh()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse_mode={self.sparse_mode}"  # type: ignore[misc]


class STConv2d(SparseLayerMixin, nn.Conv2d):
    """ST-3 ``nn.Conv2d`` (grouped and depthwise included)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class STLinear(SparseLayerMixin, nn.Linear):
    """ST-3 ``nn.Linear``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


_SPARSE_CLASS_CACHE: Dict[type, Type[nn.Module]] = {nn.Conv2d: STConv2d, nn.Linear: STLinear}

# Convs that transform their weight before using it: pruning the weight they read would be
# undone by the transform (standardising a sparse weight fills its zeros back in, and plain
# timm re-standardises the stored weight at load), so no zeros would reach the computation.
_WEIGHT_STANDARDISED = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def sparse_class_for(module: nn.Module) -> Type[nn.Module]:
    """The pruned class that replaces ``type(module)``; a subclass's ``forward`` (timm's ``Conv2dSame`` padding, a
    dtype cast) runs unchanged, reading the pruned ``self.weight``.  :class:`~st3_hf.errors.ConfigError` for
    weight-standardised convs and parametrized weights."""
    cls = type(module)
    if cls in _SPARSE_CLASS_CACHE:
        return _SPARSE_CLASS_CACHE[cls]
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        raise ConfigError(f"{cls.__name__} has a torch.nn.utils.parametrize parametrization on its weight, which "
                          "st3_hf cannot prune (the stored tensor is not the weight the layer uses); call torch.nn."
                          "utils.parametrize.remove_parametrizations(layer, 'weight') first, or keep it dense with "
                          "SparsityConfig(exclude=['<module name pattern>'])")
    if cls.__name__ in _WEIGHT_STANDARDISED or any(b.__name__ in _WEIGHT_STANDARDISED for b in cls.__mro__):
        raise ConfigError(f"{cls.__module__}.{cls.__name__} standardises its weight in every forward (weight "
                          "standardisation, BiT/resnetv2/NFNet): that fills the pruned zeros back in, and plain timm "
                          "re-standardises any stored weight at load, so no sparsity would survive; keep these "
                          "layers dense with SparsityConfig(exclude=['<module name pattern>']) or pick a model "
                          "with plain convs")
    torch_base = nn.Linear if issubclass(cls, nn.Linear) else nn.Conv2d
    if not issubclass(cls, torch_base):
        raise TypeError(f"{cls.__name__} is not a Conv2d or Linear")
    # the subclass's forward (padding, casts) wins: it reads self.weight
    body = {"__module__": __name__, **({"forward": cls.forward} if cls.forward is not torch_base.forward else {})}
    _SPARSE_CLASS_CACHE[cls] = type(f"ST3{cls.__name__}", (_SPARSE_CLASS_CACHE[torch_base], cls), body)
    return _SPARSE_CLASS_CACHE[cls]


def is_prunable(module: nn.Module) -> bool:
    """Every Conv2d and Linear (not yet sparsified) is prunable."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, SparseLayerMixin)
