"""ProbMask against the method page (docs/method.md, "ProbMask"), with the formulas written here independently of st3_hf:

* ``noise = -log(log(u0 + e) / log(u1 + e) + e)``, ``e = 1e-20``, ``u0, u1 ~ U(0, 1)``;
  ``mask = sigmoid((log(p + e) - log(1 - p + e) + noise) * tau)``;
* forward ``w * mask`` (hard) or ``sign(w) max(|w| mask - t, 0)`` (soft), optionally times the ST-3
  rescale computed from ``mask``; gradients to ``w`` and ``p`` through this expression;
* ``tau = 1 / ((1 - 0.03)(1 - e/E) + 0.03)`` per epoch;
* budget: ``sum(clamp(p - v, 0, 1)) = N (1 - ratio)``, ``v >= 0``, ``p <- clamp(p - v, 0, 1)``,
  ``t`` = the layer's smallest ``|w|`` with ``p > 0``;
* freezing: ``mask ~ Bernoulli(p)``, ``w <- q``.
"""
from __future__ import annotations

import copy
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparsityConfig, sparsify

E = 1e-20


def page_temperature(epoch: int, epochs: int) -> float:
    return 1.0 / ((1 - 0.03) * (1 - epoch / epochs) + 0.03)


def page_mask(p: torch.Tensor, u0: torch.Tensor, u1: torch.Tensor, tau: float) -> torch.Tensor:
    noise = -torch.log(torch.log(u0 + E) / torch.log(u1 + E) + E)
    return torch.sigmoid((torch.log(p + E) - torch.log(1 - p + E) + noise) * tau)


def page_weight(w: torch.Tensor, mask: torch.Tensor, t: float, soft: bool, rescale: bool) -> torch.Tensor:
    q = torch.sign(w) * torch.relu(w.abs() * mask - t) if soft else w * mask
    if rescale:  # the ST-3 rescale from the mask; the reference computes the scale without gradient
        dims = list(range(1, w.dim()))
        m, a = mask.detach(), w.detach().abs()
        r = ((a * m).mean(dim=dims, keepdim=True) + 1e-6) / (a.mean(dim=dims, keepdim=True) + 1e-6)
        q = q * (1.01 / (r + 0.01))
    return q


def exact_offset(p: torch.Tensor, keep: float) -> float:
    """Solve ``sum(clamp(p - v, 0, 1)) = keep`` exactly (the left side is piecewise linear in v)."""
    p = p.double().reshape(-1)
    breaks = torch.unique(torch.cat([p, p - 1, torch.tensor([-1.0, 1.0], dtype=torch.float64)])).sort().values
    values = torch.stack([torch.clamp(p - b, 0, 1).sum() for b in breaks])  # decreasing in v
    i = int((values >= keep).nonzero().max())
    if i == len(breaks) - 1:
        return float(breaks[-1])
    lo, hi = breaks[i], breaks[i + 1]
    f_lo, f_hi = values[i], values[i + 1]
    return float(lo + (f_lo - keep) * (hi - lo) / (f_lo - f_hi))


def probmask_model(soft: bool, rescale: bool, **cfg) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4))
    plain = copy.deepcopy(model)
    config = dict(method="probmask", target=0.6, start_step=0, end_step=2, steps_per_epoch=1, temperature_epochs=4,
                  soft_threshold=soft, rescale=rescale)
    config.update(cfg)
    sp = sparsify(model, SparsityConfig(**config))
    return model, plain, sp


@pytest.mark.parametrize("soft,rescale", [(False, False), (True, False), (True, True)])
def test_layer_forward_and_gradients_to_weights_and_probabilities(soft: bool, rescale: bool) -> None:
    model, plain, sp = probmask_model(soft, rescale)
    x = torch.randn(5, 3, 5, 5)
    with torch.no_grad():  # spread the probabilities so the budget and the mask are non-trivial
        for layer in sp.layers.values():
            layer.probas.copy_(torch.rand_like(layer.probas))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: weights fixed, schedule advances
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert sp.ratio == pytest.approx(0.6)
    tau = page_temperature(2, 4)  # set after update 3, which ran in epoch 2 of 4

    layer, ref = model[0], plain[0]
    probas = layer.probas.detach().clone()
    assert 0 < int((probas == 0).sum()) < probas.numel()
    t = float(ref.weight.detach().abs()[probas > 0].min()) if soft else 0.0

    opt.zero_grad()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)  # the same two uniform draws, in the same order
    u0, u1 = torch.rand_like(probas), torch.rand_like(probas)
    w_ref = ref.weight.detach().clone().requires_grad_(True)
    p_ref = probas.clone().requires_grad_(True)
    ref_out = F.conv2d(x, page_weight(w_ref, page_mask(p_ref, u0, u1, tau), t, soft, rescale), ref.bias, padding=1)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out.backward(grad_out)
    torch.testing.assert_close(layer.latent_weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.probas.grad, p_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.probas.grad.abs().sum() > 0 and layer.latent_weight.grad.abs().sum() > 0

    # evaluation uses the last sampled mask
    layer.eval()
    torch.testing.assert_close(layer(x), ref_out.detach(), rtol=1e-5, atol=1e-6)


def test_budget_offset_gives_the_requested_expected_density() -> None:
    model, _, sp = probmask_model(False, False)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in sp.layers.values():
            layer.probas.copy_(torch.rand_like(layer.probas) * 1.3 - 0.1)  # some outside [0, 1], as after a step
    before = torch.cat([layer.probas.detach().reshape(-1) for layer in sp.layers.values()]).clone()
    n = before.numel()
    for ratio in (0.6, 0.85):
        with torch.no_grad():
            start = 0
            for layer in sp.layers.values():
                k = layer.probas.numel()
                layer.probas.copy_(before[start:start + k].view_as(layer.probas))
                start += k
        sp.apply(ratio)
        after = torch.cat([layer.probas.detach().reshape(-1) for layer in sp.layers.values()])
        keep = n * (1 - ratio)
        v = exact_offset(before, keep)
        assert v > 0
        assert float(sp.global_threshold) == pytest.approx(v, abs=1e-7)  # the offset, kept in float32
        torch.testing.assert_close(after.double(), torch.clamp(before.double() - v, 0, 1), rtol=0, atol=1e-6)
        # the expected density is the requested one (to float32 storage of the probabilities)
        assert abs(float(after.double().sum()) - keep) <= n * 1e-7
        for layer in sp.layers.values():  # every layer keeps some weights and loses some
            alive = layer.probas.detach() > 0
            assert 0 < int(alive.sum()) < alive.numel()


def test_budget_offset_is_clamped_at_zero() -> None:
    _, _, sp = probmask_model(False, False)
    with torch.no_grad():
        for layer in sp.layers.values():
            layer.probas.fill_(0.2)  # expected density 0.2 already below the 1 - 0.6 budget
    sp.apply(0.6)
    assert float(sp.global_threshold) == 0.0
    assert all(torch.all(layer.probas == 0.2) for layer in sp.layers.values())


def test_temperature_follows_the_epoch_of_each_update() -> None:
    model, _, sp = probmask_model(False, False, steps_per_epoch=3, temperature_epochs=5, end_step=6)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    x = torch.randn(2, 3, 5, 5)
    seen: List[float] = [sp.method.temperature]
    for _ in range(15):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        seen.append(sp.method.temperature)
    expected = [1.0] + [page_temperature((s - 1) // 3, 5) for s in range(1, 16)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert expected[-1] > 4 and page_temperature(5, 5) == pytest.approx(1 / 0.03)


def _train_three_steps_and_freeze(seed: int):
    model, plain, sp = probmask_model(False, False, start_step=2, end_step=3, mask_seed=seed)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # ratio 0: q = w
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert sp.ratio == pytest.approx(0.6)
    model(x)  # one sampled mask
    probas = {n: layer.probas.detach().clone() for n, layer in sp.layers.items()}
    sp.freeze()
    return plain, sp, probas


def test_dense_before_pruning_then_bernoulli_freeze() -> None:
    plain, sp, probas = _train_three_steps_and_freeze(seed=0)
    kept = total = 0
    for name, layer in sp.layers.items():
        p, mask = probas[name], layer.mask
        assert torch.all(~mask[p == 0]) and torch.all(mask[p == 1])  # Bernoulli(0) = 0, Bernoulli(1) = 1
        torch.testing.assert_close(layer.latent_weight.detach(), plain[int(name)].weight.detach() * mask, rtol=0, atol=0)
        kept += int(mask.sum())
        total += mask.numel()
    assert abs(kept / total - 0.4) < 0.05  # E[kept] = sum(p) = 0.4 N
    # the draw is seeded by run seed and step, not the global RNG: every rank draws the same masks
    torch.manual_seed(999)
    _, again, _ = _train_three_steps_and_freeze(seed=0)
    _, other, _ = _train_three_steps_and_freeze(seed=1)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(sp.layers.values(), again.layers.values()))
    assert not all(torch.equal(a.mask, b.mask) for a, b in zip(sp.layers.values(), other.layers.values()))


def test_model_state_dict_stays_timm_and_probabilities_are_in_the_sparsifier_state() -> None:
    model, plain, sp = probmask_model(False, False)
    assert set(model.state_dict()) == set(plain.state_dict())
    state = sp.state_dict()
    assert set(state["probas"]) == set(sp.layers) and set(state["sampled_masks"]) == set(sp.layers)
    model.load_state_dict(plain.state_dict(), strict=True)  # probabilities are not "missing"


@pytest.mark.parametrize("kwargs,needle", [
    ({"straight_through": True}, "not a straight-through estimator"),
    ({"steps_per_epoch": None}, "steps_per_epoch >= 1"),
    ({"criterion": "l1std"}, "criterion must stay 'l1'"),
])
def test_bad_probmask_settings_are_errors(kwargs, needle) -> None:
    config = dict(method="probmask", target=0.9, steps_per_epoch=2, temperature_epochs=3)
    config.update(kwargs)
    with pytest.raises(ValueError) as info:
        SparsityConfig(**config)
    assert needle in str(info.value)
