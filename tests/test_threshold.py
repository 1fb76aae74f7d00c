"""Global threshold of ST-3 / ST-3σ checked against a sort-based quantile (method page, "One global threshold").

The expected values are computed here from scratch (``torch.sort`` + linear
interpolation, as the reference does), never with the library's helpers.
"""
from __future__ import annotations

import math
from typing import Dict

import pytest
import timm
import torch
import torch.nn as nn

from st3_hf import SparsityConfig, exact_quantile, sparsify

QUANTILES = [0.0, 1e-3, 0.1, 0.3, 0.5, 0.77, 0.9, 0.98, 0.999, 1.0]


def sort_quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile from a full sort (the reference's way), in float64."""
    s = torch.sort(values.reshape(-1).double()).values
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    frac = pos - lo
    return float(s[lo] + frac * (s[hi] - s[lo]))


def assert_close_rel(actual: float, expected: float, rtol: float = 1e-6) -> None:
    assert abs(actual - expected) <= rtol * abs(expected) + 1e-12, (actual, expected)


# ----------------------------------------------------------------- exact_quantile on plain tensors
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_quantile_matches_sort(n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=dtype).abs()
    for q in QUANTILES:
        assert_close_rel(float(exact_quantile(x, q)), sort_quantile(x, q))


@pytest.mark.parametrize("n", [2, 7, 1000, 100_003])
def test_exact_quantile_matches_torch_quantile(n: int) -> None:
    g = torch.Generator().manual_seed(1234 + n)
    x = torch.rand(n, generator=g) * 3
    for q in QUANTILES:
        expected = torch.quantile(x, q, interpolation="linear")
        torch.testing.assert_close(exact_quantile(x, q), expected, rtol=1e-6, atol=0.0)


def test_exact_quantile_multidimensional_input_is_flattened() -> None:
    x = torch.randn(4, 5, 6).abs()
    for q in QUANTILES:
        assert_close_rel(float(exact_quantile(x, q)), sort_quantile(x, q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_quantile_with_ties(dtype: torch.dtype) -> None:
    # few distinct values: lo/hi order statistics often fall on equal values; float16 takes the topk path
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 5, (5001,), generator=g).to(dtype)) * 0.25
    for q in QUANTILES + [0.2, 0.2001, 0.4, 0.6, 0.8]:
        got = float(exact_quantile(x, q))
        want = sort_quantile(x, q)
        tol = 1e-6 if dtype == torch.float32 else 1e-3  # float16 lerp rounds
        assert abs(got - want) <= tol * max(abs(want), 1.0), (q, got, want)


def test_exact_quantile_all_equal_values() -> None:
    x = torch.full((333,), 0.125)
    for q in QUANTILES:
        assert float(exact_quantile(x, q)) == 0.125


def test_exact_quantile_small_known_values() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 4.0])
    # sorted 1,2,3,4; pos = q*3
    assert float(exact_quantile(x, 0.5)) == 2.5
    assert float(exact_quantile(x, 0.0)) == 1.0
    assert float(exact_quantile(x, 1.0)) == 4.0
    assert abs(float(exact_quantile(x, 0.1)) - 1.3) < 1e-6


def test_exact_quantile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        exact_quantile(torch.empty(0), 0.5)
    with pytest.raises(ValueError):
        exact_quantile(torch.ones(3), 1.5)


# ----------------------------------------------------------------- Sparsifier.apply on a timm model
def prunable_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.fixture(scope="module")
def resnet_weights() -> Dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return prunable_weights(timm.create_model("resnet10t", num_classes=10))


def fresh_sparse_resnet(method: str, weights: Dict[str, torch.Tensor]):
    model = timm.create_model("resnet10t", num_classes=10)
    with torch.no_grad():
        for n, m in model.named_modules():
            if n in weights:
                m.weight.copy_(weights[n])
    sp = sparsify(model, SparsityConfig(method=method, target=0.95, start_step=0, end_step=100))
    return model, sp


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 0.9, 0.98])
def test_l1_threshold_is_global_quantile_of_abs_weights(resnet_weights, ratio: float) -> None:
    model, sp = fresh_sparse_resnet("st3", resnet_weights)
    assert set(sp.layers) == set(resnet_weights)  # first conv and classifier are prunable too
    sp.apply(ratio)
    all_abs = torch.cat([w.abs().reshape(-1) for w in resnet_weights.values()])
    expected_t = sort_quantile(all_abs, ratio)
    total = all_abs.numel()
    pruned = 0
    for name, layer in sp.layers.items():
        t = float(layer.threshold)
        assert_close_rel(t, expected_t)  # every layer gets the same t
        w = resnet_weights[name]
        assert torch.equal(layer.mask, w.abs() > layer.threshold)
        pruned += int((~layer.mask).sum())
    # |w| <= t for about ratio * N weights (within the interpolation step, no ties in random init)
    assert abs(pruned - ratio * total) <= 2
    assert abs(sp.sparsity() - ratio) <= 2 / total


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.98])
def test_l1std_threshold_is_quantile_of_sigma_normalised_weights(resnet_weights, ratio: float) -> None:
    model, sp = fresh_sparse_resnet("st3_sigma", resnet_weights)
    sp.apply(ratio)
    sigma = {n: 1.0 / math.sqrt(sum(w.shape)) for n, w in resnet_weights.items()}
    normalised = torch.cat([(w.double().abs() / sigma[n]).reshape(-1) for n, w in resnet_weights.items()])
    big_t = sort_quantile(normalised, ratio)
    pruned = 0
    for name, layer in sp.layers.items():
        assert_close_rel(float(layer.threshold), big_t * sigma[name], rtol=2e-6)
        assert torch.equal(layer.mask, resnet_weights[name].abs() > layer.threshold)
        pruned += int((~layer.mask).sum())
    assert abs(pruned - ratio * normalised.numel()) <= 2 + len(sigma)  # float rounding at the cut per layer
    # sigma normalisation spreads sparsity: thresholds differ across layers of different shapes
    thresholds = {float(layer.threshold) for layer in sp.layers.values()}
    assert len(thresholds) > 1


@pytest.mark.slow
def test_l1_and_l1std_prune_different_layers(resnet_weights) -> None:
    _, sp_l1 = fresh_sparse_resnet("st3", resnet_weights)
    _, sp_std = fresh_sparse_resnet("st3_sigma", resnet_weights)
    sp_l1.apply(0.9)
    sp_std.apply(0.9)
    assert abs(sp_l1.sparsity() - sp_std.sparsity()) < 1e-3  # same global budget
    assert sp_l1.layer_sparsity() != sp_std.layer_sparsity()  # distributed differently


def test_threshold_with_tied_weights() -> None:
    # weights drawn from 5 values: the threshold falls on a tie; every tied weight at t is pruned (|w| > t keeps)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    levels = torch.tensor([-0.2, -0.1, 0.05, 0.1, 0.2])
    with torch.no_grad():
        for m in (model[0], model[2]):
            idx = torch.randint(0, 5, m.weight.shape)
            m.weight.copy_(levels[idx])
    weights = {n: m.weight.detach().clone() for n, m in [("0", model[0]), ("2", model[2])]}
    sp = sparsify(model, SparsityConfig(method="gmp", target=0.9, start_step=0, end_step=10))
    for ratio in [0.1, 0.25, 0.5, 0.6, 0.9]:
        sp.apply(ratio)
        all_abs = torch.cat([w.abs().reshape(-1) for w in weights.values()])
        expected_t = sort_quantile(all_abs, ratio)
        for name, layer in sp.layers.items():
            assert_close_rel(float(layer.threshold), expected_t)
            assert torch.equal(layer.mask, weights[name].abs() > layer.threshold)
            # hard thresholding (gmp): kept weights are the latent ones, pruned are exactly zero
            assert torch.equal(layer.effective, weights[name] * layer.mask)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.9, 0.98, 0.999, 1.0])
def test_large_nonnegative_cpu_selection_matches_sort_with_ties(q: float) -> None:
    # > 65536 non-negative float32 values take the histogram (radix) selection path on CPU
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200_003, generator=gen).abs()
    x[::5] = 0.0  # many exact zeros
    x[1::13] = x[3]  # a heavily repeated value
    s = torch.sort(x).values
    pos = q * (x.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, x.numel() - 1)
    expected = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    torch.testing.assert_close(exact_quantile(x, q), expected, rtol=1e-6, atol=0)
