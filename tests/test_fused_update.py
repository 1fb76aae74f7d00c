"""The fused whole-model update (st3_hf/sparse/fused_update.py) against the per-layer rule and torch's own quantile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from st3_hf import sparsify


def _model() -> nn.Module:
    # > 65,536 weights, so the CPU radix selection runs; a depthwise conv and a Linear among them
    return nn.Sequential(
        nn.Conv2d(16, 64, 3), nn.Conv2d(64, 64, 3, groups=64), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(256, 128)
    )


@pytest.mark.parametrize("method", ["st3", "st3_sigma", "gmp", "ste_hard"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_update_equals_the_per_layer_rule_bit_for_bit(method: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = _model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sp = sparsify(model, method=method, target=0.9, start_step=0, end_step=10)
    assert sp._fused is not None, "the built-in rules must take the fused path"
    sp.apply(0.7)
    layers = list(sp.layers.values())
    # the threshold: torch.quantile over every layer's |w| / sigma_l (sigma_l = 1 for l1)
    sigma = [l.sigma if method == "st3_sigma" else 1.0 for l in layers]
    scores = torch.cat([l.latent_weight.detach().abs().reshape(-1) / s for l, s in zip(layers, sigma)])
    assert float(sp.global_threshold) == pytest.approx(float(torch.quantile(scores.double(), 0.7)), rel=1e-6)
    for layer, s in zip(layers, sigma):
        assert float(layer.threshold) == pytest.approx(float(sp.global_threshold) * s, rel=1e-6)
        q, mask = layer.compute_effective(layer.latent_weight.detach(), layer.threshold)  # per-layer rule
        assert torch.equal(layer.mask, mask)
        assert torch.equal(layer.effective.view(torch.int32), q.view(torch.int32)), "not bit-identical"
