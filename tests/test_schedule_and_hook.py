"""Cubic ramp through a wrapped optimizer; only real updates advance it; effective weights never stale.

Method page: ``ratio = target * (1 - (1 - s/S) ** 3)`` with ``s`` the optimizer
steps since the start, recomputed after every optimizer step.
"""
from __future__ import annotations

import copy
import math
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparsityConfig, sparsify
from reference_formulas import soft_threshold_rescaled


def expected_ratio(steps_done: int, target: float, start: int, end: int) -> float:
    if steps_done < start:
        return 0.0
    if steps_done >= end:
        return target
    return target * (1 - (1 - (steps_done - start) / (end - start)) ** 3)


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )


def batches(n: int, seed: int = 0) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]



def test_cubic_ramp_through_wrapped_optimizer() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    target, start, end = 0.8, 5, 25
    sp = sparsify(model, SparsityConfig(method="st3", target=target, start_step=start, end_step=end))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    n_weights = sum(l.weight.numel() for l in sp.layers.values())
    seen = []
    for k, (x, y) in enumerate(batches(35), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        want = expected_ratio(k, target, start, end)
        assert sp.step_count == k
        assert math.isclose(sp.ratio, want, rel_tol=1e-12, abs_tol=1e-12), (k, sp.ratio, want)
        # zeros of the effective weights: floor(ratio * (N - 1)) + 1 weights are <= the interpolated quantile
        assert abs(sp.sparsity() - want) <= 2 / n_weights, (k, sp.sparsity(), want)
        seen.append(sp.sparsity())
    assert seen[start - 1] == 0.0 and seen[start] > 0.0
    assert all(b >= a - 2 / n_weights for a, b in zip(seen, seen[1:]))  # monotone ramp
    assert abs(seen[-1] - target) <= 2 / n_weights


def test_wrap_returns_same_optimizer_and_rejects_double_wrap() -> None:
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.5, start_step=0, end_step=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sp.wrap(opt) is opt
    with pytest.raises(ValueError):
        sp.wrap(opt)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_gradient_accumulation_with_accelerate_advances_only_on_real_updates(fresh_accelerate_state) -> None:
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = tiny_net()
    target, start, end = 0.6, 1, 6
    sp = sparsify(model, SparsityConfig(method="st3", target=target, start_step=start, end_step=end))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    model, opt = accelerator.prepare(model, opt)
    first = sp.layers["0"]
    counts = []
    for i, (x, y) in enumerate(batches(16), start=1):
        before = first.latent_weight.detach().clone()
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        counts.append(sp.step_count)
        real_update = i % 4 == 0
        assert accelerator.sync_gradients == real_update
        assert (not torch.equal(before, first.latent_weight.detach())) == real_update, i
    assert counts == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert math.isclose(sp.ratio, expected_ratio(4, target, start, end), rel_tol=1e-12)
    # the forward after the last real update uses the weights of that update
    w = first.latent_weight.detach()
    torch.testing.assert_close(first.effective, soft_threshold_rescaled(w, float(first.threshold)), rtol=1e-6, atol=1e-7)


def test_grad_scaler_skipped_step_does_not_advance_schedule() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=10))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = batches(3)

    def scaled_step(x, y, inject_inf: bool) -> None:
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if inject_inf:
            sp.layers["6"].latent_weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    scaled_step(*data[0], inject_inf=False)
    assert sp.step_count == 1
    ratio_1, threshold_1 = sp.ratio, float(sp.layers["0"].threshold)
    weights_1 = {n: l.latent_weight.detach().clone() for n, l in sp.layers.items()}
    scale_before = scaler.get_scale()

    scaled_step(*data[1], inject_inf=True)
    assert scaler.get_scale() < scale_before  # the scaler did skip this step
    assert sp.step_count == 1 and sp.ratio == ratio_1
    assert float(sp.layers["0"].threshold) == threshold_1
    for n, l in sp.layers.items():
        assert torch.equal(l.latent_weight.detach(), weights_1[n])

    scaled_step(*data[2], inject_inf=False)
    assert sp.step_count == 2
    assert math.isclose(sp.ratio, expected_ratio(2, 0.9, 0, 10), rel_tol=1e-12)


def test_no_stale_effective_weight_after_load_state_dict() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=10))
    sp.apply(0.7)
    thresholds = {n: float(l.threshold) for n, l in sp.layers.items()}
    torch.manual_seed(1)
    other = tiny_net()
    model.load_state_dict(other.state_dict())
    x = torch.randn(2, 3, 8, 8)
    # expected: the other net with ST-3 weights at the (unchanged) thresholds
    expected_net = copy.deepcopy(other)
    with torch.no_grad():
        for n, t in thresholds.items():
            w = expected_net.get_submodule(n).weight
            w.copy_(soft_threshold_rescaled(w.clone(), t))
    torch.testing.assert_close(model(x), expected_net(x), rtol=1e-5, atol=1e-6)


def _pruned_linear():
    """A tiny net pruned to 60%, its Linear layer and that layer's threshold."""
    torch.manual_seed(0)
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=10))
    sp.apply(0.6)
    layer = sp.layers["6"]
    t = float(layer.threshold)
    return sp, layer, t


def test_no_stale_effective_weight_after_in_place_edit() -> None:
    sp, layer, t = _pruned_linear()
    with torch.no_grad():
        layer.latent_weight.mul_(-1.5)
        layer.latent_weight[0].zero_()
    feats = torch.randn(3, 32)
    expected = F.linear(feats, soft_threshold_rescaled(layer.latent_weight.detach().clone(), t), layer.bias)
    torch.testing.assert_close(layer(feats), expected, rtol=1e-5, atol=1e-6)
    # and the sparsity report sees the edited weights too
    w = layer.latent_weight.detach()
    assert sp.layer_sparsity()["6"] == float((w.abs() <= t).sum()) / w.numel()


def test_data_edit_needs_refresh_as_documented() -> None:
    sp, layer, t = _pruned_linear()
    layer.latent_weight.data.mul_(-1.5)
    sp.refresh()  # documented: `.data` edits bypass the version counter
    feats = torch.randn(3, 32)
    expected = F.linear(feats, soft_threshold_rescaled(layer.latent_weight.detach().clone(), t), layer.bias)
    torch.testing.assert_close(layer(feats), expected, rtol=1e-5, atol=1e-6)
