"""MAC counting as the paper counts FLOPs: conv/linear multiply-accumulates, pruned layers times density."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn

from st3_hf import SparsityConfig, count_macs, sparsify


def conv_out(size: int, k: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 32 -> 16
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False),  # grouped, 16 -> 16
        nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16),  # depthwise, 16 -> 8
        nn.Conv2d(16, 12, 3, padding=2, dilation=2),  # dilated, 8 -> 8
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )


def expected_small_net_macs(h: int) -> dict:
    h1 = conv_out(h, 3, 2, 1)
    h2 = conv_out(h1, 3, 1, 1)
    h3 = conv_out(h2, 5, 2, 2)
    h4 = conv_out(h3, 3, 1, 2, dilation=2)
    return {
        "0": h1 * h1 * 8 * 3 * 3 * 3,
        "2": h2 * h2 * 16 * (8 // 2) * 3 * 3,
        "3": h3 * h3 * 16 * (16 // 16) * 5 * 5,
        "4": h4 * h4 * 12 * 16 * 3 * 3,
        "7": 12 * 10,
    }


def test_dense_macs_of_small_net_by_formula() -> None:
    model = small_net()
    report = count_macs(model, (3, 32, 32))
    expected = expected_small_net_macs(32)
    assert {l.name: l.dense_macs for l in report.layers} == expected
    assert report.dense_macs == sum(expected.values())
    assert all(l.density == 1.0 for l in report.layers)
    assert math.isclose(report.sparse_macs, report.dense_macs)


@pytest.mark.slow
def test_resnet50_dense_mflops_match_paper() -> None:
    report = count_macs(timm.create_model("resnet50"), (3, 224, 224))
    assert abs(report.dense_mflops - 4089) < 1.0  # the paper's dense ResNet-50 column
    assert len(report.layers) == 54  # 53 convs (incl. 4 downsample) + fc


def test_sparse_macs_after_apply_are_dense_times_density() -> None:
    torch.manual_seed(0)
    model = small_net()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sp = sparsify(model, SparsityConfig(method="st3", target=0.95, start_step=0, end_step=10))
    sp.apply(0.9)
    report = count_macs(model, (3, 32, 32))
    # density from the method page's mask with a sort-based global threshold (ties impossible in random init)
    all_abs = torch.sort(torch.cat([w.abs().reshape(-1) for w in weights.values()])).values
    pos = 0.9 * (all_abs.numel() - 1)
    lo = math.floor(pos)
    t = all_abs[lo] + (pos - lo) * (all_abs[lo + 1] - all_abs[lo])
    dense = expected_small_net_macs(32)
    expected_sparse = 0.0
    for layer in report.layers:
        kept = weights[layer.name].abs() > t
        density = int(kept.sum()) / kept.numel()
        assert math.isclose(layer.density, density, rel_tol=1e-9), layer.name
        expected_sparse += dense[layer.name] * density
    assert math.isclose(report.sparse_macs, expected_sparse, rel_tol=1e-9)
    assert report.sparse_macs < 0.5 * report.dense_macs


@pytest.mark.slow
def test_resnet50_sparse_mflops_after_apply() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    dense = {l.name: l.dense_macs for l in count_macs(model, (3, 224, 224)).layers}
    sp = sparsify(model, SparsityConfig(method="st3", target=0.95, start_step=0, end_step=10))
    sp.apply(0.9)
    report = count_macs(model, (3, 224, 224))
    assert {l.name: l.dense_macs for l in report.layers} == dense  # pruning does not change dense counts
    expected = sum(dense[n] * int(l.mask.sum()) / l.mask.numel() for n, l in sp.layers.items())
    assert math.isclose(report.sparse_macs, expected, rel_tol=1e-9)
    assert 0 < report.sparse_mflops < report.dense_mflops
    assert abs(sp.sparsity() - 0.9) < 1e-6
    d = report.as_dict()
    assert math.isclose(d["sparse_mflops"], report.sparse_mflops) and math.isclose(d["dense_mflops"], report.dense_mflops)


def test_frozen_and_excluded_layers_are_counted() -> None:
    torch.manual_seed(0)
    model = small_net()
    sp = sparsify(model, SparsityConfig(method="gmp", target=0.95, start_step=0, end_step=10, exclude=("7",)))
    sp.apply(0.5)
    sp.freeze()
    report = count_macs(model, (3, 32, 32))
    by_name = {l.name: l for l in report.layers}
    assert by_name["7"].density == 1.0  # excluded classifier counted dense
    for n, layer in sp.layers.items():
        assert math.isclose(by_name[n].density, int(layer.mask.sum()) / layer.mask.numel(), rel_tol=1e-9)
    assert model.training  # count_macs restores the mode


def per_layer(report) -> dict:
    return {l.name: (l.dense_macs, l.density) for l in report.layers}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_macs_do_not_depend_on_autocast(dtype) -> None:
    """Under autocast each layer reads a low-precision copy of its weight: the count traced it to no layer (0),
    or, a freed copy's address reused, to another one (the stem's figure given to layer1.0.conv1).  accelerate's
    mixed precision (the trainer, evaluate_model.py) is checked by tests/test_card_numbers.py."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.5, end_step=1, exclude=("fc",)))
    sparsifier.apply(0.5)
    fp32 = count_macs(model, (3, 64, 64))
    assert len(fp32.layers) == 21 and len(set(per_layer(fp32).values())) == 21  # every layer told apart
    with torch.autocast("cpu", dtype=dtype):
        assert per_layer(count_macs(model, (3, 64, 64))) == per_layer(fp32)
        model(torch.zeros(2, 3, 64, 64))  # weights now cast and cached in this autocast region
        assert per_layer(count_macs(model, (3, 64, 64))) == per_layer(fp32)
