"""ProbMask as the ST-3 reference implements it (a baseline of the ST-3 paper; docs/method.md, "ProbMask").

Every prunable weight has a trained keep-probability ``p``; the training forward samples a relaxed
Bernoulli mask from it (no straight-through estimator), and after each optimizer step one offset ``v``
found by bisection meets the global budget ``sum(clamp(p - v, 0, 1)) = N * (1 - ratio)``.

    >>> p = [torch.tensor([1.0, 0.9, 0.5, 0.1])]
    >>> v = budget_offset(p, keep=2.0)
    >>> round(float(sum(torch.clamp(t - v, 0, 1).sum() for t in p)), 6)
    2.0
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from st3_hf.sparse.methods.base import SparsityMethod, refuse, register
from st3_hf.sparse.methods.st3 import rescale_factor

EPS = 1e-20
TEMPERATURE_FLOOR = 0.03


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor, soft: bool, rescale: bool) -> torch.Tensor:
    """The forward weight for a (relaxed or hard) mask; differentiable in ``weight`` and ``mask``."""
    q = torch.sign(weight) * torch.clamp(weight.abs() * mask - threshold, min=0.0) if soft else weight * mask
    if rescale:
        with torch.no_grad():  # the reference computes the scale without gradient
            dims, magnitude = tuple(range(1, weight.dim())), weight.abs()
            kept = (magnitude * mask).mean(dim=dims, keepdim=True) if dims else magnitude * mask
            scale = rescale_factor(kept, magnitude.mean(dim=dims, keepdim=True) if dims else magnitude)
        q = q * scale
    return q


@torch.no_grad()
def budget_offset(probas: Sequence[torch.Tensor], keep: float) -> float:
    """Offset ``v >= 0`` with ``sum(clamp(p - v, 0, 1)) = keep`` over all ``probas``, by bisection on [-1, 1].

    As the reference: midpoints until the error is below 1e-7 or 41 midpoints were tried (its counter stops
    past 40); the sums are taken in float64 so the budget is met to the bisection's resolution.
    """
    flat = torch.cat([p.detach().reshape(-1) for p in probas]).double()
    low, high, v = -1.0, 1.0, 0.0
    for _ in range(41):
        v = (low + high) / 2
        error = float(torch.clamp(flat - v, 0.0, 1.0).sum()) - keep
        if abs(error) < 1e-7:
            break
        low, high = (low, v) if error < 0 else (v, high)
    return max(v, 0.0)


def _drop_probas(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + "probas", None)


def _probas_not_missing(module: nn.Module, incompatible_keys: Any) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.endswith("probas")]


@register("probmask")
class ProbMask(SparsityMethod):
    """Keep-probabilities ``layer.probas`` with a global budget; ``soft_threshold`` / ``rescale`` give the
    reference's other variants. The temperature follows the epoch (``steps_per_epoch``) of a run of
    ``temperature_epochs`` epochs; ``mask_seed`` seeds the Bernoulli draw of the final masks.

    >>> from st3_hf import SparsityConfig, sparsify
    >>> sp = sparsify(nn.Sequential(nn.Linear(4, 2)), SparsityConfig(method="probmask", steps_per_epoch=1, temperature_epochs=1))
    >>> layer = sp.layers["0"]; tuple(layer.probas.shape), float(layer.probas.min()), sp.method.temperature
    ((2, 4), 1.0, 1.0)
    """

    straight_through = False
    config_keys = ("steps_per_epoch", "temperature_epochs", "mask_seed")
    layer_buffers = ("sampled_mask",)
    prune_every_step = True  # the probabilities stay in [0, 1] from the first update
    frozen_leaves_parameters_unused = True  # frozen layers use weight * mask: the probabilities get no gradient

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.soft, self.rescale = bool(config.soft_threshold), bool(config.rescale)
        self.steps_per_epoch, self.epochs, self.seed = int(config.steps_per_epoch), int(config.temperature_epochs), int(config.mask_seed)
        self.temperature = 1.0  # the reference's initial value, before the first update sets it

    @classmethod
    def check(cls, config: Any) -> None:
        if config.straight_through:
            refuse("straight_through", "must stay off: probmask trains through the sampled mask, not a "
                                       "straight-through estimator")
        if config.criterion != "l1":
            refuse("criterion", "must stay 'l1': probmask ranks keep-probabilities, not weights")
        for key in ("steps_per_epoch", "temperature_epochs"):
            value = getattr(config, key)
            if value is None or value < 1:
                refuse(key, f"must be >= 1 for probmask (its temperature follows the epoch), got {value}",
                       f"probmask needs {key} >= 1 (its temperature follows the epoch), got {value}")
        if config.mask_seed is None:
            config.mask_seed = 0

    def attach(self, layer: Any) -> None:
        weight = layer.latent_weight
        layer.probas = nn.Parameter(torch.ones_like(weight, dtype=torch.float32))
        # the last sampled mask (evaluation uses it); saved by the Sparsifier, not in model.state_dict()
        layer.register_buffer("sampled_mask", torch.ones_like(weight), persistent=False)
        # model.state_dict() stays timm's (exports load in plain timm): the Sparsifier saves probas
        layer.register_state_dict_post_hook(_drop_probas)
        layer.register_load_state_dict_post_hook(_probas_not_missing)

    def dense_weight(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        # before pruning starts the layer is dense; the zero term keeps probas in the graph so DDP,
        # which needs every parameter to get a gradient, works from the first step
        return latent + 0.0 * layer.probas.to(latent.dtype)

    def effective(self, layer: Any, latent: torch.Tensor, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, kept)`` with the last sampled mask (evaluation, freezing)."""
        with torch.no_grad():
            q = masked_weight(latent, layer.sampled_mask, threshold, self.soft, self.rescale)
            q = torch.where(q == 0, torch.zeros((), dtype=q.dtype, device=q.device), q)  # -0.0 -> +0.0
        return q, q != 0

    def forward_weight(self, layer: Any, latent: torch.Tensor) -> torch.Tensor:
        if not layer.training:
            return layer.effective.detach()
        probas = layer.probas
        u0, u1 = torch.rand_like(probas), torch.rand_like(probas)
        noise = -torch.log(torch.log(u0 + EPS) / torch.log(u1 + EPS) + EPS)  # the reference's logistic noise
        # Gumbel-sigmoid sample of the keep mask (differentiable in probas)
        logits = torch.log(probas + EPS) - torch.log(1.0 - probas + EPS) + noise
        mask = torch.sigmoid(logits * self.temperature).to(latent.dtype)
        q = masked_weight(latent, mask, layer.threshold.to(latent.dtype), self.soft, self.rescale)
        with torch.no_grad():
            layer.sampled_mask.copy_(mask)
            layer.effective.copy_(q)
            layer.mask.copy_(q != 0)
        return q

    def temperature_after(self, step_count: int) -> float:
        """The temperature the reference sets after update ``step_count``: that of the update's epoch,
        ``1 / ((1 - 0.03) (1 - epoch / epochs) + 0.03)`` (1 at epoch 0, ~33 at the last epoch)."""
        if step_count <= 0:
            return 1.0
        epoch = (step_count - 1) // self.steps_per_epoch
        return 1.0 / ((1.0 - TEMPERATURE_FLOOR) * (1.0 - epoch / self.epochs) + TEMPERATURE_FLOOR)

    @torch.no_grad()
    def prune(self, sp: Any, ratio: float) -> torch.Tensor:
        """Budget, thresholds and temperature after an update; returns the offset ``v``."""
        self.temperature = self.temperature_after(sp.step_count)
        layers = list(sp.layers.values())
        probas = [layer.probas for layer in layers]
        if ratio <= 0:
            for layer in layers:
                layer.probas.clamp_(0.0, 1.0)
                layer.set_threshold(None)
            return torch.tensor(0.0)
        total = sum(p.numel() for p in probas)
        v = budget_offset(probas, total * (1.0 - ratio))
        for layer in layers:
            p = layer.probas
            p.sub_(v).clamp_(0.0, 1.0)
            alive = layer.latent_weight.detach().abs()[p > 0]
            # the smallest |w| still alive; a layer with nothing alive prunes everything
            t = alive.min() if alive.numel() else torch.tensor(float("inf"), device=p.device)
            layer.set_threshold(t.float() if self.soft else torch.zeros((), device=p.device))
        return torch.tensor(v)

    @torch.no_grad()
    def freeze(self, sp: Any) -> None:
        """``mask ~ Bernoulli(p)``, from a generator seeded by run seed and step (the same on every rank)."""
        for index, layer in enumerate(sp.layers.values()):
            if layer.sparse_mode != "pruned":
                continue
            p = layer.probas.detach()
            generator = torch.Generator(device=p.device).manual_seed(self.seed * 1_000_003 + sp.step_count * 1009 + index)
            uniform = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            layer.sampled_mask.copy_((uniform < p).to(layer.sampled_mask.dtype))

    def state_dict(self, sp: Any) -> Dict[str, Any]:
        return {"probas": {n: layer.probas.detach().cpu() for n, layer in sp.layers.items()},
                "sampled_masks": {n: layer.sampled_mask.detach().cpu() for n, layer in sp.layers.items()}}

    @torch.no_grad()
    def load_state_dict(self, sp: Any, state: Dict[str, Any]) -> None:
        if "probas" not in state:
            raise ValueError("the sparsifier state has no ProbMask probabilities (saved by another method)")
        for name, layer in sp.layers.items():
            layer.probas.copy_(state["probas"][name])
            layer.sampled_mask.copy_(state["sampled_masks"][name])
        self.temperature = self.temperature_after(sp.step_count)

    def parameters(self, sp: Any) -> List[nn.Parameter]:
        return [layer.probas for layer in sp.layers.values()]
