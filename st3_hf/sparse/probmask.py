"""ProbMask as the ST-3 reference implements it (a baseline of the ST-3 paper).  Torch only.

Every prunable weight has a keep-probability ``p`` (a parameter, init 1.0, trained by its own
optimizer group).  In training the forward pass samples a relaxed Bernoulli mask::

    u0, u1 ~ U(0, 1),  noise = -log(log(u0 + e) / log(u1 + e) + e),  e = 1e-20
    mask = sigmoid((log(p + e) - log(1 - p + e) + noise) * tau)

and uses ``w * mask`` (hard) or ``sign(w) * max(|w| * mask - t, 0)`` (soft), optionally rescaled per
output channel with the ST-3 rescale computed from ``mask``; gradients reach ``w`` and ``p`` through
this expression (no straight-through estimator).  After each optimizer step one offset ``v`` found by
bisection sets the global budget ``sum(clamp(p - v, 0, 1)) = N * (1 - ratio)``; ``p <- clamp(p - v, 0, 1)``
and the soft variant's ``t`` is the layer's smallest ``|w|`` with ``p > 0``.  Evaluation uses the last
sampled mask; freezing draws ``mask ~ Bernoulli(p)`` and sets ``w <- q``.

    >>> p = [torch.tensor([1.0, 0.9, 0.5, 0.1])]
    >>> v = budget_offset(p, keep=2.0)
    >>> round(float(sum(torch.clamp(t - v, 0, 1).sum() for t in p)), 6)
    2.0
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

EPS = 1e-20
TEMPERATURE_FLOOR = 0.03
BISECTION_INTERVAL = (-1.0, 1.0)
BISECTION_MAX_ITERATIONS = 41  # the reference stops when its counter passes 40
BISECTION_TOLERANCE = 1e-7
RESCALE_EPS = 1e-6


def temperature(epoch: int, epochs: int) -> float:
    """``tau = 1 / ((1 - 0.03) (1 - epoch / epochs) + 0.03)``: 1 at epoch 0, ~33 at the last epoch.

    >>> temperature(0, 100), round(temperature(100, 100), 2)
    (1.0, 33.33)
    """
    return 1.0 / ((1.0 - TEMPERATURE_FLOOR) * (1.0 - epoch / epochs) + TEMPERATURE_FLOOR)


def gumbel_noise(u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """The reference's logistic noise from two uniform samples."""
    return -torch.log(torch.log(u0 + EPS) / torch.log(u1 + EPS) + EPS)


def relaxed_mask(probas: torch.Tensor, noise: torch.Tensor, tau: float) -> torch.Tensor:
    """Gumbel-sigmoid sample of the keep mask (differentiable in ``probas``)."""
    return torch.sigmoid((torch.log(probas + EPS) - torch.log(1.0 - probas + EPS) + noise) * tau)


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor, soft: bool, rescale: bool) -> torch.Tensor:
    """The forward weight for a (relaxed or hard) mask; differentiable in ``weight`` and ``mask``."""
    if soft:
        q = torch.sign(weight) * torch.clamp(weight.abs() * mask - threshold, min=0.0)
    else:
        q = weight * mask
    if rescale:
        with torch.no_grad():  # the reference computes the scale without gradient
            dims = tuple(range(1, weight.dim()))
            magnitude = weight.abs()
            kept = (magnitude * mask).mean(dim=dims, keepdim=True) if dims else magnitude * mask
            total = magnitude.mean(dim=dims, keepdim=True) if dims else magnitude
            ratio = (kept + RESCALE_EPS) / (total + RESCALE_EPS)
            scale = 1.01 / (ratio + 0.01)
        q = q * scale
    return q


@torch.no_grad()
def budget_offset(probas: Sequence[torch.Tensor], keep: float) -> float:
    """Offset ``v >= 0`` with ``sum(clamp(p - v, 0, 1)) = keep`` over all ``probas``, by bisection on [-1, 1].

    As the reference: midpoints until the error is below 1e-7 or 41 midpoints were tried; the sums
    are taken in float64 so the budget is met to the bisection's resolution.
    """
    flat = torch.cat([p.detach().reshape(-1) for p in probas]).double()
    low, high = BISECTION_INTERVAL
    v = 0.0
    for _ in range(BISECTION_MAX_ITERATIONS):
        v = (low + high) / 2
        error = float(torch.clamp(flat - v, 0.0, 1.0).sum()) - keep
        if abs(error) < BISECTION_TOLERANCE:
            break
        if error < 0:
            high = v
        else:
            low = v
    return max(v, 0.0)


class ProbMaskRule:
    """How a ProbMask layer builds its forward weight; one instance is shared by all layers of a model.

    >>> rule = ProbMaskRule(soft=True, rescale=False)
    >>> layer = nn.Linear(4, 2)
    >>> rule.attach(layer); tuple(layer.probas.shape), float(layer.probas.min())
    ((2, 4), 1.0)
    """

    def __init__(self, soft: bool, rescale: bool):
        self.soft = bool(soft)
        self.rescale = bool(rescale)
        self.temperature = 1.0  # the reference's initial value, before the first update sets it

    def attach(self, layer: nn.Module) -> None:
        weight = layer.latent_weight  # type: ignore[attr-defined]
        layer.probas = nn.Parameter(torch.ones_like(weight, dtype=torch.float32))
        # the last sampled mask (evaluation uses it); saved by the Sparsifier, not in model.state_dict()
        layer.register_buffer("sampled_mask", torch.ones_like(weight), persistent=False)
        # model.state_dict() stays timm's (exports load in plain timm): the Sparsifier saves probas
        layer.register_state_dict_post_hook(_drop_probas)
        layer.register_load_state_dict_post_hook(_probas_not_missing)

    def dense_weight(self, layer: nn.Module) -> torch.Tensor:
        # before pruning starts the layer is dense; the zero term keeps probas in the graph so DDP,
        # which needs every parameter to get a gradient, works from the first step
        return layer.latent_weight + 0.0 * layer.probas.to(layer.latent_weight.dtype)  # type: ignore[attr-defined]

    def effective(self, layer: nn.Module, threshold: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q, kept)`` with the last sampled mask (evaluation, freezing)."""
        with torch.no_grad():
            q = masked_weight(layer.latent_weight, layer.sampled_mask, threshold, self.soft, self.rescale)  # type: ignore[attr-defined]
            q = torch.where(q == 0, torch.zeros((), dtype=q.dtype, device=q.device), q)  # -0.0 -> +0.0
        return q, q != 0

    def forward_weight(self, layer: nn.Module) -> torch.Tensor:
        if not layer.training:
            return layer.effective.detach()  # type: ignore[attr-defined]
        probas = layer.probas  # type: ignore[attr-defined]
        u0, u1 = torch.rand_like(probas), torch.rand_like(probas)
        mask = relaxed_mask(probas, gumbel_noise(u0, u1), self.temperature).to(layer.latent_weight.dtype)  # type: ignore[attr-defined]
        threshold = layer.threshold.to(layer.latent_weight.dtype)  # type: ignore[attr-defined]
        q = masked_weight(layer.latent_weight, mask, threshold, self.soft, self.rescale)  # type: ignore[attr-defined]
        with torch.no_grad():
            layer.sampled_mask.copy_(mask)  # type: ignore[attr-defined]
            layer.effective.copy_(q)  # type: ignore[attr-defined]
            layer.mask.copy_(q != 0)  # type: ignore[attr-defined]
        return q


def _drop_probas(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + "probas", None)


def _probas_not_missing(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.endswith("probas")]:
        missing.remove(key)


class ProbMaskSchedule:
    """The global budget after each update, the per-epoch temperature and the Bernoulli freeze.

    ``steps_per_epoch`` and ``epochs`` (of the pruning run) give the temperature's epoch.
    """

    def __init__(self, rule: ProbMaskRule, steps_per_epoch: int, epochs: int, seed: int = 0):
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"probmask needs steps_per_epoch >= 1 and epochs >= 1, got {steps_per_epoch}, {epochs}")
        self.rule = rule
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.seed = int(seed)

    def temperature_after(self, step_count: int) -> float:
        """The temperature the reference sets after update ``step_count``: that of the update's epoch."""
        if step_count <= 0:
            return 1.0
        return temperature((step_count - 1) // self.steps_per_epoch, self.epochs)

    @torch.no_grad()
    def update(self, layers: Mapping[str, nn.Module], ratio: float, step_count: int) -> float:
        """Budget, thresholds and temperature after an update; returns the offset ``v``."""
        self.rule.temperature = self.temperature_after(step_count)
        probas = [layer.probas for layer in layers.values()]  # type: ignore[attr-defined]
        if ratio <= 0:
            for p in probas:
                p.clamp_(0.0, 1.0)
            for layer in layers.values():
                layer.make_dense()  # type: ignore[attr-defined]
            return 0.0
        total = sum(p.numel() for p in probas)
        v = budget_offset(probas, total * (1.0 - ratio))
        for layer in layers.values():
            p = layer.probas  # type: ignore[attr-defined]
            p.sub_(v).clamp_(0.0, 1.0)
            alive = layer.latent_weight.detach().abs()[p > 0]  # type: ignore[attr-defined]
            # the smallest |w| still alive; a layer with nothing alive prunes everything
            t = alive.min() if alive.numel() else torch.tensor(float("inf"), device=p.device)
            layer.set_threshold(t.float() if self.rule.soft else torch.zeros((), device=p.device))  # type: ignore[attr-defined]
        return v

    @torch.no_grad()
    def draw_final_masks(self, layers: Mapping[str, nn.Module], step_count: int) -> None:
        """``mask ~ Bernoulli(p)`` for freezing, from a generator seeded by run seed and step (same on every rank)."""
        for index, layer in enumerate(layers.values()):
            if layer.sparse_mode != "pruned":  # type: ignore[attr-defined]
                continue
            p = layer.probas.detach()  # type: ignore[attr-defined]
            generator = torch.Generator(device=p.device).manual_seed(self.seed * 1_000_003 + step_count * 1009 + index)
            uniform = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            layer.sampled_mask.copy_((uniform < p).to(layer.sampled_mask.dtype))  # type: ignore[attr-defined]

