"""The interface of a sparsity method (:class:`SparsityMethod`) and the registry (:func:`register`).

A method is one subclass in its own file of this package, registered under the name
``SparsityConfig(method=...)`` takes. :func:`~st3_hf.sparsify` makes one instance per model and
gives it to every pruned layer: the layers and the :class:`~st3_hf.Sparsifier` hold no
method-specific code, they call these hooks (docs/method.md, "Adding a method").
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from st3_hf.errors import ConfigError
from st3_hf.sparse.distributed_quantile import sharded_quantile
from st3_hf.sparse.layers import local_tensor
from st3_hf.sparse.threshold import exact_quantile


def refuse(key: str, problem: str, message: Optional[str] = None) -> None:
    """Raise the :class:`~st3_hf.errors.ConfigError` of the :class:`~st3_hf.SparsityConfig` field ``key``."""
    raise ConfigError(message or f"{key} {problem}", key=key, problem=problem)


class SparsityMethod(abc.ABC):
    """One sparsity method: its layer rule, its prune step and its own state.

    ``layer`` arguments are the model's pruned layers (:class:`~st3_hf.SparseLayerMixin`), ``latent``
    their latent weight (this process's rows under FSDP2), ``sp`` the :class:`~st3_hf.Sparsifier`.
    """

    name: ClassVar[str] = ""  # set by @register
    # the layer switches the method implies: SparsityConfig takes them where the user left None
    # (ablations); check() refuses the overrides the method cannot run
    criterion: ClassVar[str] = "l1"
    soft_threshold = rescale = False
    straight_through: ClassVar[bool] = True
    # SparsityConfig fields only this method reads (None = unset); any other method refuses them
    config_keys: ClassVar[Tuple[str, ...]] = ()
    # per-layer buffers attach() adds, equal on every rank by construction: DDP must not broadcast them
    layer_buffers: ClassVar[Tuple[str, ...]] = ()
    # prune() runs after every update, also while the scheduled ratio is still 0
    prune_every_step: ClassVar[bool] = False
    # the fused whole-model update (fused_update.py) and FSDP2's sharded read compute exactly this rule
    fusable: bool = False
    # once frozen, some of the method's parameters get no gradient (DDP must be told to expect that)
    frozen_leaves_parameters_unused: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def check(cls, config: Any) -> None:
        """Fill this method's own defaults in ``config`` and :func:`refuse` what it cannot run."""

    def attach(self, layer: Any) -> None:
        """Add the per-layer parameters and buffers the method needs (once per layer, by ``sparsify``)."""

    @abc.abstractmethod
    def effective(self, layer: Any, latent: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, mask)`` of the layer for ``threshold``, without gradient (kept in ``layer.effective`` / ``layer.mask``)."""

    @abc.abstractmethod
    def forward_weight(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        """The forward weight while pruned, with the method's gradient path to ``latent``."""

    def dense_weight(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        """The forward weight before pruning starts."""
        return latent

    def read(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        """What every reader of ``layer.weight`` gets, by the layer's mode."""
        if layer.sparse_mode == "dense":
            return self.dense_weight(layer, latent)
        if layer.sparse_mode == "frozen":
            return latent * layer.mask
        if not torch.compiler.is_compiling() and latent._version != layer._synced_version:
            # the latent weight changed outside the optimizer hook (loaded, edited): never use stale q
            layer.refresh()
        return self.forward_weight(layer, latent)

    @torch.no_grad()
    def prune(self, sp: Any, ratio: float) -> torch.Tensor:
        """Prune every layer to ``ratio`` (> 0, or 0: dense); returns the value kept as ``sp.global_threshold``.

        Default: one global threshold on the scores ``|w| * score_scale`` (exact quantile), through the
        fused whole-model update when the sparsifier has one, else layer by layer (:meth:`effective`).
        """
        layers = list(sp.layers.values())
        if ratio <= 0:
            # ratio 0 is the dense model (the reference skips pruning), not "threshold = min |w|"
            for layer in layers:
                layer.set_threshold(None)
            return torch.zeros(())
        if sp._fused is not None:
            return sp._fused.prune(ratio)
        latents = [local_tensor(layer.latent_weight).detach() for layer in layers]
        scales = torch.tensor(list(sp.score_scales.values()), dtype=torch.float32, device=latents[0].device)
        scores = [w.abs().reshape(-1) for w in latents]
        if sp.config.criterion == "l1std":
            scores = [s * scale.to(s.device, s.dtype) for s, scale in zip(scores, scales)]
        flat = torch.cat([s.float().to(scales.device) for s in scores])
        # FSDP2: every rank holds some rows, the sharded quantile is exact without gathering
        global_t = (sharded_quantile(flat, ratio, sp.shard_group) if sp.shard_group is not None
                    else exact_quantile(flat, ratio, nonnegative=True))
        for layer, threshold in zip(layers, torch.div(global_t, scales)):
            layer.set_threshold(threshold)
        return global_t

    def freeze(self, sp: Any) -> None:
        """Called once before the layers freeze (``w <- q``, masks fixed)."""

    def state_dict(self, sp: Any) -> Dict[str, Any]:
        """Extra entries of the sparsifier's state (plain types and tensors)."""
        return {}

    def load_state_dict(self, sp: Any, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries (before the layers recompute their effective weights)."""

    def parameters(self, sp: Any) -> List[nn.Parameter]:
        """Trainable tensors of the method besides the model's (for an optimizer group of their own)."""
        return []


METHODS: Dict[str, Type[SparsityMethod]] = {}


def register(name: str) -> Callable[[Any], Any]:
    """Class decorator: ``SparsityConfig(method=name)`` runs this class."""

    def add(cls: Any) -> Any:
        if name in METHODS:
            raise ValueError(f"sparsity method {name!r} is already registered ({METHODS[name].__qualname__})")
        cls.name, METHODS[name] = name, cls
        return cls

    return add
