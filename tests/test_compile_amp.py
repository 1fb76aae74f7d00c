"""Sparsified models under bf16 autocast and torch.compile (CPU), including refreshed weights after a step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparsityConfig, sparsify
from reference_formulas import soft_threshold_rescaled


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )



def reference_model(model: nn.Module, sp) -> nn.Module:
    """A plain copy whose weights are the ST-3 weights of the formula (forward-only reference)."""
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, layer in sp.layers.items():
            ref.get_submodule(n).weight.copy_(soft_threshold_rescaled(layer.latent_weight.detach(), float(layer.threshold)))
    return ref


def test_bf16_autocast_forward_backward_reaches_latent_weights() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.9, start_step=0, end_step=10))
    sp.apply(0.7)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16
    loss.backward()
    fp32_grads = {}
    for n, layer in sp.layers.items():
        g = layer.latent_weight.grad
        assert g is not None and g.dtype == torch.float32, n
        assert g.abs().sum() > 0, n
        assert g[~layer.mask].abs().sum() > 0, n  # straight through: pruned weights get gradient too
        fp32_grads[n] = g.clone()
    # same gradients as in float32, up to bf16 precision
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, layer in sp.layers.items():
        rel = (layer.latent_weight.grad - fp32_grads[n]).norm() / layer.latent_weight.grad.norm()
        assert rel < 5e-2, (n, float(rel))


@pytest.mark.slow
def test_compile_matches_eager_and_sees_refreshed_weights() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.8, start_step=0, end_step=4))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.5))
    compiled = torch.compile(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    plain = tiny_net()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-5)  # dense phase

    sp.apply(0.5)  # dense -> pruned: the compiled model must follow (guard on the layer mode)
    eager = copy.deepcopy(model)  # identical state, runs eagerly (deepcopy keeps layer state)

    out_c = compiled(x)
    out_e = eager(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_c, reference_model(model, sp)(x), rtol=1e-4, atol=1e-5)
    F.cross_entropy(out_c, y).backward()
    F.cross_entropy(out_e, y).backward()
    eager_layers = {n: m for n, m in eager.named_modules() if n in sp.layers}
    for n, layer in sp.layers.items():
        torch.testing.assert_close(layer.latent_weight.grad, eager_layers[n].latent_weight.grad, rtol=1e-4, atol=1e-5)

    # one wrapped optimizer step: the hook recomputes threshold and effective weights in place
    before = compiled(x).detach()
    opt.step()
    assert sp.step_count == 1
    after = compiled(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference_model(model, sp)(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, model(x), rtol=1e-4, atol=1e-5)  # same module, eager

    # and an explicit sp.step() (as under DeepSpeed) after an unhooked weight update
    with torch.no_grad():
        for layer in sp.layers.values():
            layer.latent_weight.mul_(0.9)
    sp.step()
    torch.testing.assert_close(compiled(x), reference_model(model, sp)(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
