"""Freezing (method page step 5) and bit-exact resume from saved state."""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf import SparsityConfig, sparsify
from reference_formulas import soft_threshold_rescaled


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )


def batches(n: int, seed: int = 0, size: int = 8) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()



def pruned_then_frozen(wrapped: bool):
    """Train 8 pruned steps (momentum builds up on pruned weights: dense STE gradients), then freeze."""
    torch.manual_seed(0)
    model = tiny_net()
    sp = sparsify(model, SparsityConfig(method="st3", target=0.8, start_step=0, end_step=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if wrapped:
        sp.wrap(opt)
        train(model, opt, batches(8))
    else:
        for x, y in batches(8):  # unwrapped optimizer: sp.step() by hand while pruning
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sp.step()
    latent = {n: l.latent_weight.detach().clone() for n, l in sp.layers.items()}
    thresholds = {n: float(l.threshold) for n, l in sp.layers.items()}
    sp.freeze()
    return model, sp, opt, latent, thresholds


def test_freeze_replaces_weight_by_effective_and_fixes_mask() -> None:
    model, sp, opt, latent, thresholds = pruned_then_frozen(wrapped=True)
    for n, layer in sp.layers.items():
        expected_q = soft_threshold_rescaled(latent[n], thresholds[n])
        torch.testing.assert_close(layer.latent_weight.detach(), expected_q, rtol=1e-6, atol=1e-7)
        assert torch.equal(layer.mask, latent[n].abs() > thresholds[n])
    with pytest.raises(RuntimeError):
        sp.apply(0.5)


def test_frozen_zeros_stay_zero_with_wrapped_momentum_sgd() -> None:
    model, sp, opt, _, _ = pruned_then_frozen(wrapped=True)
    masks = {n: l.mask.clone() for n, l in sp.layers.items()}
    frozen = {n: l.latent_weight.detach().clone() for n, l in sp.layers.items()}
    sparsity = sp.sparsity()
    assert sparsity > 0.7
    for x, y in batches(20, seed=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, layer in sp.layers.items():
            assert torch.equal(layer.mask, masks[n])
            assert torch.all(layer.latent_weight.detach()[~masks[n]] == 0), n  # latent zeros exactly zero
    for n, layer in sp.layers.items():
        assert not torch.equal(layer.latent_weight.detach()[masks[n]], frozen[n][masks[n]])  # kept weights do train
    assert sp.sparsity() == sparsity
    # the exported weights (model.state_dict) are exactly as sparse
    sd = model.state_dict()
    for n in sp.layers:
        assert torch.all(sd[f"{n}.weight"][~masks[n]] == 0)


@pytest.mark.slow
def test_frozen_with_unwrapped_optimizer_effective_zeros_stay_zero_latent_may_drift() -> None:
    """Without the wrapper nothing re-zeros the latent weights after a step.

    Momentum accumulated before the freeze (ST-3 gives pruned weights dense
    gradients) keeps moving the pruned latent weights, and weight decay then
    acts on them.  The forward still uses ``weight * mask``, so the effective
    weights and outputs keep exact zeros; ``sp.refresh()`` (or any ``sp.step()``)
    re-zeros the latent weights, which matters before exporting ``model.state_dict()``.
    """
    model, sp, opt, _, _ = pruned_then_frozen(wrapped=False)
    masks = {n: l.mask.clone() for n, l in sp.layers.items()}
    for x, y in batches(20, seed=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, w in sp.effective_weights().items():
            assert torch.all(w[~masks[n]] == 0), n
            assert torch.all(sp.layers[n].latent_weight.grad[~masks[n]] == 0), n  # forward w*m: masked gradient
    drifted = sum(int((l.latent_weight.detach()[~masks[n]] != 0).sum()) for n, l in sp.layers.items())
    assert drifted > 0  # documents the drift of the latent weights under an unwrapped momentum optimizer
    sp.refresh()
    for n, l in sp.layers.items():
        assert torch.all(l.latent_weight.detach()[~masks[n]] == 0)
        assert torch.equal(l.mask, masks[n])


def test_frozen_with_fresh_unwrapped_optimizer_keeps_latent_zeros() -> None:
    # no momentum carried over: gradient, momentum and weight decay of pruned weights are all zero
    model, sp, _, _, _ = pruned_then_frozen(wrapped=True)
    masks = {n: l.mask.clone() for n, l in sp.layers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train(model, opt, batches(20, seed=2))
    for n, l in sp.layers.items():
        assert torch.all(l.latent_weight.detach()[~masks[n]] == 0)


# ----------------------------------------------------------------- resume bit-exactly
def make_run(seed: int, method: str):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=5)
    sp = sparsify(model, SparsityConfig(method=method, target=0.9, start_step=1, end_step=12))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4))
    return model, sp, opt


def snapshot(model: nn.Module, sp) -> Dict[str, object]:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "masks": {n: l.mask.clone() for n, l in sp.layers.items()},
        "thresholds": {n: l.threshold.clone() for n, l in sp.layers.items()},
        "effective": {n: w.clone() for n, w in sp.effective_weights().items()},
        "modes": {n: l.sparse_mode for n, l in sp.layers.items()},
        "step_count": sp.step_count,
        "ratio": sp.ratio,
        "global_threshold": sp.global_threshold.clone(),
    }


def assert_identical(a: Dict[str, object], b: Dict[str, object]) -> None:
    for key in ("params", "masks", "thresholds", "effective"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
    assert a["modes"] == b["modes"]
    assert a["step_count"] == b["step_count"] and a["ratio"] == b["ratio"]
    assert torch.equal(a["global_threshold"], b["global_threshold"])


@pytest.mark.slow
@pytest.mark.parametrize("method,sparsifier_first", [("st3", False), ("st3_sigma", True), ("gmp", False)])
def test_state_dict_round_trip_resumes_bit_exactly(tmp_path, method: str, sparsifier_first: bool) -> None:
    data = batches(10, seed=3, size=32)
    n_before, n_after = 5, 5
    model, sp, opt = make_run(0, method)
    train(model, opt, data[:n_before])
    assert 0 < sp.ratio < 0.9  # saved in the middle of the ramp
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(sp.state_dict(), tmp_path / "sparsifier.pt")
    train(model, opt, data[n_before:])
    continued = snapshot(model, sp)

    model2, sp2, opt2 = make_run(123, method)  # other init: everything must come from the files
    model_state = torch.load(tmp_path / "model.pt", weights_only=True)
    sp_state = torch.load(tmp_path / "sparsifier.pt", weights_only=True)
    if sparsifier_first:
        sp2.load_state_dict(sp_state)
        model2.load_state_dict(model_state)
    else:
        model2.load_state_dict(model_state)
        sp2.load_state_dict(sp_state)
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert sp2.step_count == n_before
    train(model2, opt2, data[n_before:])
    resumed = snapshot(model2, sp2)
    assert_identical(continued, resumed)
    assert resumed["step_count"] == n_before + n_after
    # the comparison is not trivial: the masks moved during the continued steps
    saved_masks = sp_state["masks"]
    assert any(not torch.equal(saved_masks[n], continued["masks"][n]) for n in saved_masks)


def test_frozen_state_round_trip(tmp_path) -> None:
    model, sp, opt, _, _ = pruned_then_frozen(wrapped=True)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(sp.state_dict(), tmp_path / "sparsifier.pt")
    torch.manual_seed(5)
    model2 = tiny_net()
    sp2 = sparsify(model2, SparsityConfig(method="st3", target=0.8, start_step=0, end_step=5))
    model2.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    sp2.load_state_dict(torch.load(tmp_path / "sparsifier.pt", weights_only=True))
    assert sp2.frozen and all(l.sparse_mode == "frozen" for l in sp2.layers.values())
    model.eval()
    model2.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), model2(x))
    with pytest.raises(RuntimeError):
        sp2.apply(0.5)


def test_load_state_dict_rejects_other_model(tmp_path) -> None:
    model, sp, _, _, _ = pruned_then_frozen(wrapped=True)
    other = nn.Sequential(nn.Linear(4, 4))
    sp_other = sparsify(other, SparsityConfig(method="st3", target=0.5))
    with pytest.raises(ValueError):
        sp_other.load_state_dict(sp.state_dict())
