"""Feather against the method page (docs/method.md, "Feather"), written here independently of st3_hf:

* one global ``l1`` threshold ``t``: the ``ratio``-quantile of ``|w|`` over every prunable weight;
* forward ``q = sign(w) (|w|^p - t^p)^(1/p)`` where ``|w| > t``, 0 elsewhere (no rescale);
* backward ``dL/dw = dL/dq`` where ``|w| > t``, ``theta dL/dq`` elsewhere;
* ``p = 3``; ``theta = 0.5`` above 95% target sparsity, else 1.0; freezing sets ``w <- q``.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparsityConfig, sparsify
from st3_hf.errors import ConfigError
from st3_hf.train.recipe import recipe_from_dict


def sort_quantile(values: torch.Tensor, q: float) -> float:
    """The page's quantile (sort, linear interpolation), rounded to the weights' float32.

    The rounding matters: ``(|w|^p - t^p)^(1/p)`` is infinitely steep at ``|w| = t``.
    """
    s = torch.sort(values.reshape(-1).double()).values
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    return float(torch.tensor(float(s[lo] + (pos - lo) * (s[hi] - s[lo])), dtype=torch.float32))


def page_feather_weight(w: torch.Tensor, t: float, p: float, theta: float) -> torch.Tensor:
    """Value ``q`` of the page's formula; gradient to ``w``: 1 on kept, ``theta`` on pruned entries."""
    wd = w.detach().double()
    kept = wd.abs() > t
    q = torch.zeros_like(wd)
    q[kept] = torch.sign(wd[kept]) * (wd[kept].abs() ** p - t ** p) ** (1.0 / p)
    grad_scale = torch.where(kept, torch.ones_like(wd), torch.full_like(wd, theta))
    q = q.to(w.dtype)
    grad_scale = grad_scale.to(w.dtype)
    # value q; d(value)/dw = grad_scale (elementwise)
    return (w * grad_scale) + (q - (w * grad_scale).detach())


def apply_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


LAYERS = {
    "conv": (lambda: nn.Conv2d(6, 12, 3, padding=1, bias=True), (2, 6, 9, 9)),
    "conv_grouped_strided": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=False), (2, 8, 9, 9)),
    "linear": (lambda: nn.Linear(20, 9, bias=True), (4, 20)),
}


@pytest.mark.parametrize("layer_kind", sorted(LAYERS))
@pytest.mark.parametrize("target,theta", [(0.9, 1.0), (0.98, 0.5)])
def test_layer_forward_and_scaled_straight_through_gradient(layer_kind: str, target: float, theta: float) -> None:
    factory, x_shape = LAYERS[layer_kind]
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": factory(), "b": nn.Linear(16, 4)})  # two layers: the threshold is global
    with torch.no_grad():
        model["b"].weight.copy_(torch.randn(4, 16) * model["a"].weight.std())
    plain = copy.deepcopy(model)
    sp = sparsify(model, SparsityConfig(method="feather", target=target, start_step=0, end_step=10))
    assert (sp.config.p, sp.config.theta) == (3.0, theta)  # the page's defaults for this target
    ratio = 0.7
    sp.apply(ratio)
    t = sort_quantile(torch.cat([m.weight.detach().abs().reshape(-1) for m in plain.values()]), ratio)

    layer, ref_layer = model["a"], plain["a"]
    x = torch.randn(*x_shape)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = layer(x1)
    ref_out = apply_layer(ref_layer, x2, page_feather_weight(ref_layer.weight, t, 3.0, theta))
    # float32 |w|^3 - t^3 just above t loses digits that the float64 formula keeps
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out.backward(grad_out)
    torch.testing.assert_close(layer.latent_weight.grad, ref_layer.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, ref_layer.bias.grad, rtol=1e-5, atol=1e-6)
    pruned = ~layer.mask
    assert 0 < int(pruned.sum()) < layer.weight.numel()
    assert torch.all(layer.effective[pruned] == 0)
    assert layer.latent_weight.grad[pruned].abs().sum() > 0  # straight through: pruned weights still learn


@pytest.mark.slow
def test_timm_model_layer_by_layer_with_custom_p_and_theta() -> None:
    """Every layer of a timm model: captured input -> output and weight gradient vs the page (p, theta set)."""
    torch.manual_seed(0)
    p, theta = 2.0, 0.25
    model = timm.create_model("resnet10t", num_classes=10).eval()
    plain = copy.deepcopy(model)
    plain_layers = {n: m for n, m in plain.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sp = sparsify(model, SparsityConfig(method="feather", target=0.9, end_step=10, p=p, theta=theta))
    ratio = 0.8
    sp.apply(ratio)
    t = sort_quantile(torch.cat([m.weight.detach().abs().reshape(-1) for m in plain_layers.values()]), ratio)

    captured: Dict[str, List[torch.Tensor]] = {}

    def capture(name: str):
        def hook(module, inputs, output):
            output.retain_grad()
            captured[name] = [inputs[0].detach(), output]
        return hook

    handles = [layer.register_forward_hook(capture(n)) for n, layer in sp.layers.items()]
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for h in handles:
        h.remove()
    assert set(captured) == set(plain_layers)  # nothing excluded: first conv and classifier are pruned
    for name, layer in sp.layers.items():
        x, y = captured[name]
        ref_layer = plain_layers[name]
        ref_y = apply_layer(ref_layer, x, page_feather_weight(ref_layer.weight, t, p, theta))
        torch.testing.assert_close(y.detach(), ref_y.detach(), rtol=1e-4, atol=1e-5, msg=f"forward of {name}")
        (ref_grad,) = torch.autograd.grad(ref_y, ref_layer.weight, y.grad)
        torch.testing.assert_close(layer.latent_weight.grad, ref_grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")
    assert sp.sparsity() == pytest.approx(ratio, abs=1e-3)


def test_p_one_is_plain_soft_thresholding() -> None:
    """The page: ``p = 1`` is soft thresholding, i.e. ST-3 without its rescale step."""
    torch.manual_seed(0)
    a = nn.Conv2d(4, 6, 3)
    b = copy.deepcopy(a)
    sp_feather = sparsify(nn.Sequential(a), SparsityConfig(method="feather", target=0.9, p=1.0))
    sp_soft = sparsify(nn.Sequential(b), SparsityConfig(method="st3", target=0.9, rescale=False))
    sp_feather.apply(0.6)
    sp_soft.apply(0.6)
    torch.testing.assert_close(a.effective, b.effective, rtol=1e-6, atol=1e-7)


def test_freeze_replaces_weights_by_q_and_training_keeps_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    plain = copy.deepcopy(model)
    sp = sparsify(model, SparsityConfig(method="feather", target=0.8, start_step=0, end_step=1))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    x = torch.randn(4, 3, 6, 6)
    model(x).sum().backward()
    opt.step()  # ratio 0.8 reached
    weights = [plain[0].weight, plain[3].weight]
    t = sort_quantile(torch.cat([w.detach().abs().reshape(-1) for w in weights]), 0.8)
    sp.freeze()
    for layer, w in zip((model[0], model[3]), weights):
        torch.testing.assert_close(layer.latent_weight.detach(), page_feather_weight(w, t, 3.0, 1.0).detach(),
                                   rtol=1e-5, atol=1e-7)
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    zeros = [layer.latent_weight.detach() == 0 for layer in (model[0], model[3])]
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for layer, z in zip((model[0], model[3]), zeros):
        assert torch.all(layer.latent_weight.detach()[z] == 0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "st3", "p": 3.0}, "'p' is a feather setting"),
    ({"method": "gmp", "theta": 0.5}, "'theta' is a feather setting"),
    ({"method": "feather", "theta": 1.5}, "theta must be in [0, 1]"),
    ({"method": "feather", "p": 0.0}, "p must be a finite number > 0"),
    ({"method": "feather", "rescale": True}, "no rescaling step"),
])
def test_bad_feather_settings_are_errors(kwargs, needle) -> None:
    with pytest.raises(ValueError) as info:
        SparsityConfig(**kwargs)
    assert needle in str(info.value)


def test_recipe_rejects_feather_keys_for_another_method() -> None:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"sparsity": {"method": "st3", "theta": 0.5}})
    assert "sparsity.theta" in str(info.value) and "feather" in str(info.value)
    recipe = recipe_from_dict({"sparsity": {"method": "feather", "target": 0.99, "p": 4}})
    assert (recipe.sparsity.p, recipe.sparsity.theta) == (4.0, None)
