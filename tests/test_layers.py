"""Pruned layers against an independent implementation of the method page (steps 1-4).

Each sparsified layer's forward output and its gradients (w.r.t. the latent
weight and the input) are compared with ``F.conv2d`` / ``F.linear`` applied to a
weight built here from the formulas:

* st3 / st3_sigma: ``q = scale * (w - sign(w) t) * m``, ``m = |w| > t``,
  ``r = (mean(|w| m) + 1e-6) / (mean(|w|) + 1e-6)`` per output channel,
  ``scale = 1.01 / (r + 0.01)``; gradient straight through (``dL/dw = dL/dq``);
* gmp: ``q = w * m``, gradient masked;
* ste_hard: ``q = w * m``, gradient straight through.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparseLayerMixin, SparsityConfig, sparsify

METHODS = ["st3", "st3_sigma", "gmp", "ste_hard"]
SOFT = {"st3": True, "st3_sigma": True, "gmp": False, "ste_hard": False}
RESCALE = {"st3": True, "st3_sigma": True, "gmp": False, "ste_hard": False}
STRAIGHT = {"st3": True, "st3_sigma": True, "gmp": False, "ste_hard": True}


def sort_quantile(values: torch.Tensor, q: float) -> float:
    s = torch.sort(values.reshape(-1).double()).values
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    return float(s[lo] + (pos - lo) * (s[hi] - s[lo]))


def reference_thresholds(weights: Dict[str, torch.Tensor], ratio: float, method: str) -> Dict[str, float]:
    """Per-layer thresholds from the method page (l1: one global t; l1std: t_l = T * sigma_l)."""
    if method == "st3_sigma":
        sigma = {n: 1.0 / math.sqrt(sum(w.shape)) for n, w in weights.items()}
        big_t = sort_quantile(torch.cat([(w.abs().double() / sigma[n]).reshape(-1) for n, w in weights.items()]), ratio)
        return {n: big_t * sigma[n] for n in weights}
    t = sort_quantile(torch.cat([w.abs().reshape(-1) for w in weights.values()]), ratio)
    return {n: t for n in weights}


def reference_weight(w: torch.Tensor, t: float, method: str) -> torch.Tensor:
    """The forward weight, with the method's gradient path to ``w`` (``w`` requires grad)."""
    m = (w.detach().abs() > t).to(w.dtype)
    wd = w.detach()
    if SOFT[method]:
        q = (wd - torch.sign(wd) * t) * m
    else:
        q = wd * m
    if RESCALE[method]:
        reduce_dims = list(range(1, w.dim()))
        r = ((wd.abs() * m).mean(dim=reduce_dims) + 1e-6) / (wd.abs().mean(dim=reduce_dims) + 1e-6)
        scale = 1.01 / (r + 0.01)
        q = q * scale.reshape(-1, *([1] * (w.dim() - 1)))
    if STRAIGHT[method]:
        return w + (q - wd)  # value q, d q / d w = identity
    return w * m  # gmp: value w*m, gradient masked


def reference_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


LAYER_FACTORIES: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "conv_bias": (lambda: nn.Conv2d(6, 12, 3, padding=1, bias=True), (2, 6, 9, 9)),
    "conv_nobias_stride": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False), (2, 6, 9, 9)),
    "conv_grouped": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True), (2, 8, 7, 7)),
    "conv_depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (2, 8, 7, 7)),
    "conv_1x1_dilated": (lambda: nn.Conv2d(5, 7, 3, padding=2, dilation=2, bias=True), (2, 5, 8, 8)),
    "linear_bias": (lambda: nn.Linear(20, 9, bias=True), (4, 20)),
    "linear_nobias": (lambda: nn.Linear(20, 9, bias=False), (3, 5, 20)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer_kind", sorted(LAYER_FACTORIES))
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_single_layer_forward_and_gradients(method: str, layer_kind: str, ratio: float) -> None:
    factory, x_shape = LAYER_FACTORIES[layer_kind]
    torch.manual_seed(0)
    # a second layer makes the l1std global ranking non-trivial (two different sigmas)
    model = nn.ModuleDict({"a": factory(), "b": nn.Linear(16, 4)})
    with torch.no_grad():  # b's magnitudes overlap a's, so both layers keep some weights at 90%
        model["b"].weight.copy_(torch.randn(4, 16) * model["a"].weight.std() * 1.2)
    plain = copy.deepcopy(model)
    weights = {n: m.weight.detach().clone() for n, m in plain.items()}
    sp = sparsify(model, SparsityConfig(method=method, target=0.95, start_step=0, end_step=10))
    sp.apply(ratio)
    thresholds = reference_thresholds(weights, ratio, method)

    layer, ref_layer = model["a"], plain["a"]
    x = torch.randn(*x_shape)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    grad_out = None

    out = layer(x1)
    ref_w = reference_weight(ref_layer.weight, thresholds["a"], method)
    ref_out = reference_forward(ref_layer, x2, ref_w)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out.backward(grad_out)
    torch.testing.assert_close(layer.latent_weight.grad, ref_layer.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, ref_layer.bias.grad, rtol=1e-5, atol=1e-6)
    # the pruned weights really are pruned (a non-trivial comparison)
    assert 0 < int((layer.effective == 0).sum()) < layer.weight.numel()
    if STRAIGHT[method]:
        # straight through: pruned latent weights still get gradient
        assert layer.latent_weight.grad[~layer.mask].abs().sum() > 0
    else:
        assert torch.all(layer.latent_weight.grad[~layer.mask] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_timm_model_layer_by_layer(method: str) -> None:
    """Every sparsified layer of a timm model: captured input -> output and gradients vs the formulas."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    model.eval()  # BN in eval: the captured inputs are reproducible
    plain = copy.deepcopy(model)
    plain_layers = {n: m for n, m in plain.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    weights = {n: m.weight.detach().clone() for n, m in plain_layers.items()}
    sp = sparsify(model, SparsityConfig(method=method, target=0.95, start_step=0, end_step=10))
    ratio = 0.8
    sp.apply(ratio)
    thresholds = reference_thresholds(weights, ratio, method)

    captured: Dict[str, List[torch.Tensor]] = {}

    def capture(name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            output.retain_grad()
            captured[name] = [inputs[0].detach(), output]

        return hook

    handles = [layer.register_forward_hook(capture(n)) for n, layer in sp.layers.items()]
    out = model(torch.randn(2, 3, 32, 32))
    out.square().sum().backward()
    for h in handles:
        h.remove()

    assert set(captured) == set(plain_layers)
    for name, layer in sp.layers.items():
        x, y = captured[name]
        ref_layer = plain_layers[name]
        ref_w = reference_weight(ref_layer.weight, thresholds[name], method)
        ref_y = reference_forward(ref_layer, x, ref_w)
        torch.testing.assert_close(y.detach(), ref_y.detach(), rtol=1e-4, atol=1e-5, msg=f"forward of {name}")
        # the gradient of the latent weight, given the layer's output gradient
        (ref_grad_w,) = torch.autograd.grad(ref_y, ref_layer.weight, y.grad)
        torch.testing.assert_close(layer.latent_weight.grad, ref_grad_w, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("method", METHODS)
def test_dense_before_pruning_starts(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    plain = copy.deepcopy(model)
    sp = sparsify(model, SparsityConfig(method=method, target=0.9, start_step=5, end_step=20))
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: weights unchanged, schedule advances
    for _ in range(5):  # after 5 updates: s = start_step, ratio 0 -> still dense
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        assert sp.ratio == 0.0
        assert torch.equal(model(x), plain(x))
    model(x).sum().backward()
    opt.step()  # the 6th update starts pruning
    assert sp.ratio > 0
    assert not torch.equal(model(x), plain(x))


def test_apply_zero_ratio_is_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    plain = copy.deepcopy(model)
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=20))
    sp.apply(0.0)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-7)


def test_replaced_layers_keep_types_biases_and_state_dict() -> None:
    torch.manual_seed(0)
    original = timm.create_model("resnet10t", num_classes=10)
    model = copy.deepcopy(original)
    biases_before = {n: (m.bias, m.bias.detach().clone()) for n, m in model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None}
    assert biases_before  # the classifier has a bias
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=10))
    sp.apply(0.9)
    for name, module in original.named_modules():
        new = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            assert isinstance(new, nn.Conv2d) and isinstance(new, SparseLayerMixin), name
        elif isinstance(module, nn.Linear):
            assert isinstance(new, nn.Linear) and isinstance(new, SparseLayerMixin), name
    for name, (param, value) in biases_before.items():
        bias = model.get_submodule(name).bias
        assert bias is param  # same Parameter object (optimizers built earlier keep working)
        assert torch.equal(bias, value)
    sd_model, sd_original = model.state_dict(), original.state_dict()
    assert list(sd_model) == list(sd_original)
    for k in sd_original:
        # latent weights are stored, not the effective ones
        assert torch.equal(sd_model[k], sd_original[k]), k
    # the parameters are the same set (no extra parameter for masks etc.)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]


def test_exclude_patterns_keep_layers_dense() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    plain = copy.deepcopy(model)
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=10,
                                        exclude=("fc", "conv1.*", "layer4.*")))
    excluded = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and (n == "fc" or n.startswith(("conv1.", "layer4.")))]
    assert excluded and "fc" in excluded
    for n in excluded:
        assert not isinstance(model.get_submodule(n), SparseLayerMixin), n
        assert n not in sp.layers
    assert "layer1.0.conv1" in sp.layers
    sp.apply(0.9)
    for n in excluded:
        assert torch.equal(model.get_submodule(n).weight, plain.get_submodule(n).weight)
        assert not torch.any(model.get_submodule(n).weight == 0)
    # the excluded classifier behaves exactly like the plain one
    feats = torch.randn(3, model.fc.in_features)
    assert torch.equal(model.fc(feats), plain.fc(feats))
    # global sparsity is over the prunable (non-excluded) weights only
    n_prunable = sum(l.weight.numel() for l in sp.layers.values())
    n_zero = sum(int((~l.mask).sum()) for l in sp.layers.values())
    assert abs(n_zero / n_prunable - 0.9) < 1e-4
