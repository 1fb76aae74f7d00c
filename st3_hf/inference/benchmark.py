"""Tools of ``scripts/benchmark_inference.py``: a global magnitude pruning and side-by-side timing."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Mapping

import torch
import torch.nn as nn


@torch.no_grad()
def global_magnitude_prune(model: nn.Module, sparsity: float) -> float:
    """Zero the smallest-magnitude ``sparsity`` fraction of all Conv2d / Linear weights together (one global
    threshold, as ST-3's global threshold prunes: layers end up with different sparsities).  Returns the
    fraction of those weights that are zero afterwards."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    count = int(round(sparsity * magnitudes.numel()))
    if count == 0:
        return float((magnitudes == 0).sum()) / magnitudes.numel()
    threshold = magnitudes.kthvalue(count).values
    for w in weights:
        w.masked_fill_(w.abs() <= threshold, 0.0)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / magnitudes.numel()


def time_side_by_side(runners: Mapping[str, Callable[[], object]], rounds: int = 10,
                      warmup: int = 2) -> Dict[str, Dict[str, float]]:
    """``{runner: {"median_ms", "best_ms"}}`` per call, measured in interleaved rounds in this one process
    (a change in the machine's load hits every runner alike; the best round is the one least disturbed)."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    samples: Dict[str, list] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(values), "best_ms": min(values)} for name, values in samples.items()}


@torch.no_grad()
def randomize_norm_layers(model: nn.Module, seed: int = 0) -> None:
    """Random affine parameters and statistics for every norm layer.  Why: a fresh timm ResNet zero-initialises
    each block's last BatchNorm, so its residual branches add exact zeros and an output comparison could not
    see an error in their convs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
