"""The :class:`Sparsifier`: schedule, global thresholds and masks of a sparsified model."""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from st3_hf.sparse.config import SparsityConfig
from st3_hf.errors import ConfigError
from st3_hf.sparse.fused_update import FusedUpdate
from st3_hf.sparse.layers import SparseLayerMixin, is_prunable, local_tensor, sparse_class_for
from st3_hf.sparse.methods import METHODS, SparsityMethod
from st3_hf.sparse.schedule import cubic_sparsity
from st3_hf.sparse.threshold import exact_quantile

STATE_VERSION = 1
logger = logging.getLogger(__name__)


class Sparsifier:
    """Owns the sparsity schedule, the global threshold and the masks of a model.

    Created by :func:`sparsify`.  Call :meth:`step` once per real optimizer
    update, or let :meth:`wrap` do it::

        >>> import torch, timm
        >>> from st3_hf import SparsityConfig, sparsify
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=100))
        >>> opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> sp.apply(0.5); round(sp.sparsity(), 2)
        0.5
    """

    def __init__(self, model: nn.Module, config: SparsityConfig, layers: Mapping[str, SparseLayerMixin]):
        self.model, self.config, self.layers = model, config, dict(layers)
        if not self.layers:
            raise ValueError("the model has no prunable Conv2d/Linear layer left after `exclude`")
        #: the method (st3_hf/sparse/methods/) every layer delegates to: its prune step, freeze and state
        self.method: SparsityMethod = next(iter(self.layers.values())).sparsity_method
        self.step_count, self.ratio, self.frozen, self.global_threshold = 0, 0.0, False, torch.zeros(())
        self._wrapped: List[Any] = []
        # l1: |w| ranked as is; l1std: |w| / sigma_l (the reference's normalisation)
        self.score_scales = {name: 1.0 if config.criterion == "l1" else 1.0 / layer.sigma for name, layer in self.layers.items()}
        # DDP would broadcast these buffers every forward; they are equal on every rank by construction
        model._ddp_params_and_buffers_to_ignore = list(getattr(model, "_ddp_params_and_buffers_to_ignore", [])) + [
            f"{name}.{buffer}" if name else buffer for name in self.layers
            for buffer in ("effective", "mask", "threshold", *self.method.layer_buffers)]
        # one fused pass over all layers where the rule and the tensors allow it (st3_hf/sparse/fused_update.py)
        layer_list = list(self.layers.values())
        self._fused: Optional[FusedUpdate] = (FusedUpdate(layer_list, list(self.score_scales.values()))
                                              if FusedUpdate.supports(layer_list) else None)
        #: prunable layers whose weight no training forward read (name -> share of the prunable weights);
        #: filled at the first update that has gradients, ``None`` until then
        self.unread_layers: Optional[Dict[str, float]] = None
        #: set by st3_hf.sparse.fsdp.fully_shard_sparse: weights are dim-0 shards over this group
        self.shard_group: Optional[dist.ProcessGroup] = None

    def scheduled_ratio(self, step: Optional[int] = None) -> float:
        """Target ratio of the cubic ramp after ``step`` updates (default: the current count)."""
        c = self.config
        return cubic_sparsity(self.step_count if step is None else step, c.target, c.start_step, c.end_step, c.power)

    def step(self) -> None:
        """Advance one real optimizer update: schedule, global threshold, masks, effective weights. Under DeepSpeed
        (the update happens inside the engine) call it, instead of :meth:`wrap`, after ``accelerator.backward(loss)``
        whenever ``accelerator.sync_gradients`` and the engine applied the step."""
        self.step_count += 1
        if self.unread_layers is None:
            self._find_unread_layers()
        if self.frozen:
            return self.refresh()  # re-zero what momentum / weight decay moved
        ratio = self.scheduled_ratio()
        if ratio > 0 or self.method.prune_every_step:
            return self._prune(ratio)
        self.ratio = 0.0
        self.refresh()

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make every real update of ``optimizer`` advance the sparsifier by one :meth:`step`: returns the same
        optimizer (what LR schedulers and ``accelerator.prepare`` expect) with a step post-hook, which runs only
        when the inner ``step`` runs (skipped grad-scaler steps and accumulation micro-steps do not count)."""
        if any(opt is optimizer for opt in self._wrapped):
            raise ValueError("this optimizer is already wrapped by this sparsifier")
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        self._wrapped.append(optimizer)
        return optimizer

    @torch.no_grad()
    def apply(self, sparsity: float) -> None:
        """Prune to global ``sparsity`` now (exact quantile), whatever the schedule says."""
        if self.frozen:
            raise RuntimeError("the sparsifier is frozen; masks no longer move")
        self._prune(_fraction(sparsity))

    @torch.no_grad()
    def _prune(self, ratio: float) -> None:
        # the method's step: by default one global magnitude threshold (methods/base.py)
        self.global_threshold = self.method.prune(self, ratio)
        self.ratio = float(ratio) if ratio > 0 else 0.0

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute effective weights from the latent ones (thresholds unchanged)."""
        for layer in self.layers.values():
            layer.refresh()

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace latent weights by effective ones and fix the masks for good: the forward uses ``weight * mask``
        and every wrapped step re-zeros what momentum or weight decay moved. The method acts first (ProbMask draws
        its final masks)."""
        if not self.frozen:
            self.method.freeze(self)
        for layer in self.layers.values():
            layer.freeze()
        self.frozen = True

    @torch.no_grad()
    def prune_frozen(self, sparsity: float) -> None:
        """Iterative pruning of frozen masks: one hard global ``l1`` threshold over the current weights
        (pruned ones are zero) to ``sparsity``; the new zeros join the fixed masks."""
        if not self.frozen:
            raise RuntimeError("prune_frozen needs frozen masks: call freeze() first")
        sparsity = _fraction(sparsity)
        flat = torch.cat([layer.latent_weight.detach().abs().reshape(-1).float() for layer in self.layers.values()])
        threshold = exact_quantile(flat, sparsity)
        for layer in self.layers.values():
            layer.mask &= layer.latent_weight.detach().abs() > threshold.to(layer.latent_weight.dtype)
            layer.refresh()  # frozen: zeroes the weights outside the mask
        self.global_threshold, self.ratio = threshold, sparsity

    @torch.no_grad()
    def freeze_from_zeros(self) -> None:
        """Freeze with the masks given by the current non-zeros of the weights (loaded sparse models)."""
        for layer in self.layers.values():
            layer.sparse_mode = "dense"
            layer.freeze()
        self.frozen = True
        self.ratio = self.sparsity()

    def named_layers(self) -> Iterator[Tuple[str, SparseLayerMixin]]:
        return iter(self.layers.items())

    def effective_weights(self) -> Dict[str, torch.Tensor]:
        """The weight each layer's forward uses now (detached)."""
        return {name: layer.used_weight() for name, layer in self.layers.items()}

    @torch.no_grad()
    def _zero_counts(self) -> torch.Tensor:
        counts = torch.stack([(w == 0).sum() for w in self.effective_weights().values()])
        if self.shard_group is not None:  # FSDP2: each rank counted its own rows
            dist.all_reduce(counts, group=self.shard_group)
        return counts

    def layer_sparsity(self) -> Dict[str, float]:
        """Fraction of zeros of each layer's effective weight."""
        return {n: float(c) / layer.latent_weight.numel() for (n, layer), c in zip(self.layers.items(), self._zero_counts())}

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of zeros among all prunable (effective) weights: the method's figure. Under FSDP2 the counts are
        summed over the ranks: call it on every rank."""
        return int(self._zero_counts().sum()) / self.num_prunable()

    @torch.no_grad()
    def sparsity_of_all_parameters(self) -> float:
        """Zeros of the pruned layers over *all* model parameters (biases, norms, embeddings, excluded layers).

        >>> import timm
        >>> sp = sparsify(timm.create_model("resnet10t", num_classes=3), method="st3", target=0.9, end_step=10)
        >>> sp.apply(0.5); sp.sparsity_of_all_parameters() < sp.sparsity()
        True
        """
        return int(self._zero_counts().sum()) / self.num_parameters()

    def num_prunable(self) -> int:
        """The denominator of :meth:`sparsity`."""
        return sum(layer.latent_weight.numel() for layer in self.layers.values())

    def num_parameters(self) -> int:
        """The denominator of :meth:`sparsity_of_all_parameters`."""
        return sum(p.numel() for p in self.model.parameters())

    def _find_unread_layers(self) -> None:
        """Name, once, every prunable layer whose weight got no gradient (never read in training)."""
        grads = [layer.latent_weight.grad for layer in self.layers.values()]
        if all(g is None for g in grads):
            return  # no gradients here at all (DeepSpeed keeps them in its engine): nothing to tell
        total = self.num_prunable()
        self.unread_layers = {
            name: layer.latent_weight.numel() / total
            for (name, layer), grad in zip(self.layers.items(), grads)
            if grad is None and layer.latent_weight.requires_grad
        }
        if self.unread_layers:
            logger.warning("%d prunable layer(s) holding %.2f%% of the prunable weights were never read in the "
                           "training forward pass (no gradient): %s; their zeros save nothing, and they count in the "
                           "sparsity figures", len(self.unread_layers), 100 * sum(self.unread_layers.values()),
                           ", ".join(f"{n} ({100 * s:.2f}%)" for n, s in self.unread_layers.items()))

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bit-exactly (plain types and tensors: ``weights_only``-loadable)."""
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "step_count": self.step_count,
                "ratio": self.ratio, "frozen": self.frozen, "global_threshold": self.global_threshold.detach().cpu(),
                "modes": {n: layer.sparse_mode for n, layer in self.layers.items()},
                "thresholds": {n: layer.threshold.detach().cpu() for n, layer in self.layers.items()},
                "masks": {n: layer.mask.detach().cpu() for n, layer in self.layers.items()},
                **self.method.state_dict(self)}

    def method_parameters(self) -> List[nn.Parameter]:
        """The method's own trainable tensors (ProbMask's keep-probabilities), for their own optimizer group."""
        return self.method.parameters(self)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; effective weights are recomputed from the current latent weights."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported sparsifier state version {state.get('version')!r}")
        if set(self.layers) != set(state["masks"]):
            missing, extra = sorted(set(self.layers) - set(state["masks"])), sorted(set(state["masks"]) - set(self.layers))
            raise ValueError(f"sparsifier state does not match the model: missing layers {missing}, unexpected {extra}")
        self.config = SparsityConfig.from_dict(dict(state["config"]))
        self.step_count, self.ratio = int(state["step_count"]), float(state["ratio"])
        self.frozen = bool(state["frozen"])
        self.global_threshold = state["global_threshold"].clone()
        for name, layer in self.layers.items():
            local = local_tensor(layer.latent_weight)  # under FSDP2 masks are this rank's rows
            if tuple(state["masks"][name].shape) != tuple(local.shape):
                raise ValueError(f"mask shape of {name} {tuple(state['masks'][name].shape)} != weight {tuple(local.shape)}")
            layer.threshold.copy_(state["thresholds"][name])
            layer.mask.copy_(state["masks"][name])
            layer.sparse_mode = state["modes"][name]
        self.method.load_state_dict(self, dict(state))
        self.refresh()


def _fraction(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def sparsify(model: nn.Module, config: Optional[SparsityConfig] = None, **config_kwargs: Any) -> Sparsifier:
    """Replace, in place, every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` by its ST-3 version.

    Biases are untouched; layers whose qualified name matches a pattern of
    ``config.exclude`` (``fnmatch`` style, e.g. ``"fc"`` or ``"layer1.*"``) stay
    dense.  Returns the :class:`Sparsifier` that owns schedule, thresholds and masks.

        >>> import timm
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> sp = sparsify(model, SparsityConfig(method="st3_sigma", target=0.95, end_step=500))
        >>> type(model.conv1).__name__, isinstance(model.conv1, torch.nn.Conv2d)
        ('STConv2d', True)
    """
    if config is not None and config_kwargs:
        raise TypeError("pass either a SparsityConfig or keyword arguments, not both")
    config = config or SparsityConfig(**config_kwargs)
    if any(isinstance(m, SparseLayerMixin) for m in model.modules()):
        raise ValueError("the model is already sparsified")
    chosen = [(n, m) for n, m in model.named_modules() if is_prunable(m) and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
    classes = {}
    for name, module in chosen:  # all checks before any change: a refused layer leaves the model untouched
        try:
            classes[name] = sparse_class_for(module)
        except ConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}".replace("'<module name pattern>'", repr(name))) from None
    method = METHODS[config.method](config)  # one per model, shared by its layers
    for name, module in chosen:
        module.__class__ = classes[name]  # in place: parameters, hooks and references survive
        module._init_sparse_state(method)  # type: ignore[attr-defined]
    return Sparsifier(model, config, dict(chosen))
