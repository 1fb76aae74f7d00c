#!/usr/bin/env python
"""Speed benchmark of one training step, in one process with interleaved rounds so that the variants see the
same machine state: ``dense`` (timm model + SGD); ``st3`` (after :func:`~st3_hf.sparsify`, SGD wrapped, mid-ramp
so every step recomputes the threshold); ``naive_st3`` (:class:`NaiveST3`, as the reference code does it: a full
sort and a host-side threshold per step, a per-layer loop, the weight rebuilt in every forward); ``st3_guarded``
(``st3`` plus the trainer's :class:`~st3_hf.train.nonfinite.NonFiniteGuard`: a gradient norm and one host sync).

Every :class:`BenchmarkConfig` field is a flag (``batch_size`` -> ``--batch-size``); prints one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.utils.benchmark import Timer

from st3_hf import SparsityConfig, cubic_sparsity, sparsify
from st3_hf.train.nonfinite import NonFiniteGuard

# the ramp is long and the benchmark starts half-way, so every step moves the threshold
RAMP_STEPS = 1_000_000
CHOICES = {"device": ("cpu", "cuda"), "amp": ("none", "bf16"), "method": ("st3", "st3_sigma")}


@dataclasses.dataclass
class BenchmarkConfig:
    """``steps`` timed steps per variant and round, after ``warmup`` untimed ones (they absorb compile time)."""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    model: str = "resnet50"
    batch_size: int = 32
    steps: int = 10
    rounds: int = 3
    warmup: int = 2
    target: float = 0.98
    method: str = "st3"
    input_size: int = 224
    num_classes: int = 1000
    channels_last: bool = False
    amp: str = "none"
    compile: bool = False
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if min(self.batch_size, self.steps, self.rounds, self.input_size) < 1 or self.warmup < 0:
            raise ValueError("batch_size, steps, rounds, input_size must be >= 1 and warmup >= 0")
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be in (0, 1), got {self.target}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but CUDA is not available")


# ---------------------------------------------------------------------- naive reference-style ST-3
class _NaiveST3Weight(nn.Module):
    """Parametrization: rebuilds ``w + no_grad(scale * (w - sign(w) t) * mask - w)`` in every forward."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("th", torch.full((), -1.0, device=weight.device))
        self.register_buffer("mask", torch.ones_like(weight))
        self.register_buffer("scale", torch.ones((weight.shape[0],) + (1,) * (weight.dim() - 1), dtype=weight.dtype,
                                                 device=weight.device))
        self.active = False  # mirrors th > 0 for torch.compile, which cannot branch on a tensor without a graph break

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # eager: a host check of the threshold in every forward, as in the reference
        if not (self.active if torch.compiler.is_compiling() else bool(self.th > 0)):
            return weight
        with torch.no_grad():
            delta = self.scale * ((weight - torch.sign(weight) * self.th) * self.mask) - weight
        return weight + delta  # straight-through: d(weight + delta)/d(weight) = 1


class NaiveST3:
    """Reference-style ST-3: parametrized layers, a full sort per step; :meth:`step` after each optimizer step."""

    def __init__(self, model: nn.Module, target: float, start_step: int, end_step: int, criterion: str = "l1") -> None:
        self.target, self.start_step, self.end_step, self.criterion = target, start_step, end_step, criterion
        self.step_count = 0
        self.layers: List[nn.Module] = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer in self.layers:
            parametrize.register_parametrization(layer, "weight", _NaiveST3Weight(layer.weight))

    @staticmethod
    def latent(layer: nn.Module) -> torch.Tensor:
        return layer.parametrizations.weight.original

    def step(self) -> None:
        self.step_count += 1
        self.set_ratio(cubic_sparsity(self.step_count, self.target, self.start_step, self.end_step))

    @torch.no_grad()
    def set_ratio(self, ratio: float) -> None:
        sigmas = [1.0 / math.sqrt(sum(self.latent(layer).shape)) if self.criterion == "l1std" else 1.0
                  for layer in self.layers]
        scores = torch.cat([self.latent(layer).flatten() / sigma for layer, sigma in zip(self.layers, sigmas)])
        sorted_abs = torch.sort(scores.abs()).values
        idx = (sorted_abs.numel() - 1) * ratio
        lo, hi = int(math.floor(idx)), int(math.ceil(idx))
        th = (sorted_abs[lo] + (sorted_abs[hi] - sorted_abs[lo]) * (idx - lo)).item() if ratio else -1.0  # host sync
        for layer, sigma in zip(self.layers, sigmas):
            p, w, t = layer.parametrizations.weight[0], self.latent(layer), th * sigma
            p.th.fill_(t)
            p.active = t > 0
            p.mask.copy_((w.abs() > t).to(p.mask.dtype))
            dims = tuple(range(1, w.dim()))
            r = ((w.abs() * p.mask).mean(dim=dims, keepdim=True) + 1e-6) / (w.abs().mean(dim=dims, keepdim=True) + 1e-6)
            p.scale.copy_(1.01 / (r + 0.01))

    @torch.no_grad()
    def sparsity(self) -> float:
        return sum(int((l.weight == 0).sum()) for l in self.layers) / sum(l.weight.numel() for l in self.layers)


# ---------------------------------------------------------------------- the benchmark
@dataclasses.dataclass
class _Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: Any = None  # its step() is the per-update work, timed on its own
    guard: Optional[NonFiniteGuard] = None
    step_ms: List[float] = dataclasses.field(default_factory=list)
    update_ms: List[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers and optimizer state (what lives between steps)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum({(t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size() for t in tensors}.values())


def _copy_bandwidth(numel: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second of a plain copy of ``numel`` fp32 values between two allocated buffers (read + write)."""
    src = torch.rand(numel, device=device)
    timer = Timer("dst.copy_(src)", globals={"src": src, "dst": src.clone()}, num_threads=torch.get_num_threads())
    return 2 * numel * 4 / timer.timeit(repeats).mean


def run_benchmark(cfg: BenchmarkConfig) -> Dict[str, Any]:
    """Time dense, ST-3 and naive ST-3 training steps; returns a JSON-ready dict (milliseconds, MiB)."""
    import timm

    device, cuda = torch.device(cfg.device), cfg.device == "cuda"
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    base = timm.create_model(cfg.model, pretrained=False, num_classes=cfg.num_classes)
    base = base.to(device=device, memory_format=memory_format).train()
    x = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)

    def variant(name: str) -> _Variant:
        model, sp = copy.deepcopy(base), None
        if name == "naive_st3":
            sp = NaiveST3(model, cfg.target, 0, RAMP_STEPS, criterion="l1std" if cfg.method == "st3_sigma" else "l1")
        elif name != "dense":
            sp = sparsify(model, SparsityConfig(cfg.method, cfg.target, start_step=0, end_step=RAMP_STEPS))
        sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-5)
        if sp is None:
            return _Variant(name, model, sgd)
        sp.step_count = RAMP_STEPS // 2  # in the middle of the ramp: ratio ~ 0.875 target, moving every step
        sp.step()
        return _Variant(name, model, sgd if name == "naive_st3" else sp.wrap(sgd), sp,
                        NonFiniteGuard(model, max_consecutive=10) if name == "st3_guarded" else None)

    variants = {name: variant(name) for name in ("dense", "st3", "naive_st3", "st3_guarded")}
    runs = {v.name: torch.compile(v.model) if cfg.compile else v.model for v in variants.values()}

    def train_step(v: _Variant) -> None:
        v.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss = F.cross_entropy(runs[v.name](x), y)
        loss.backward()
        if v.guard is not None:
            grads = [p.grad for p in v.model.parameters() if p.grad is not None]
            if not v.guard.update_is_finite(loss.detach(), torch.nn.utils.get_total_norm(grads)):
                return
        v.optimizer.step()
        if v.guard is not None:
            v.guard.commit()
        if v.name == "naive_st3":  # its update is not an optimizer hook: called by the loop
            v.sparsifier.step()

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def timed(fn: Callable[[], None]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3

    order = list(variants.values())
    for v in order:
        for _ in range(cfg.warmup):
            train_step(v)
        if v.sparsifier is not None:
            v.sparsifier.step()
    for r in range(cfg.rounds):
        for v in order[r % len(order):] + order[: r % len(order)]:  # rotate: no fixed position bias
            if cuda:
                v.optimizer.zero_grad(set_to_none=True)  # gradients count in the step's peak, not the base
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                base_bytes = torch.cuda.memory_allocated(device)
            v.step_ms += [timed(lambda: train_step(v)) for _ in range(cfg.steps)]
            if cuda:
                step_peak = torch.cuda.max_memory_allocated(device) - base_bytes
                v.peak_bytes = max(v.peak_bytes, _state_bytes(v.model, v.optimizer) + step_peak)
            if v.sparsifier is not None:
                v.update_ms += [timed(v.sparsifier.step) for _ in range(cfg.steps)]

    sp, naive = variants["st3"].sparsifier, variants["naive_st3"].sparsifier
    n = sp.num_prunable()
    bandwidth = _copy_bandwidth(n, device)
    # the least any exact update must move: read each latent weight (4 B) for the scores, read it
    # again and write the effective weight (4 + 4 B) and the mask (1 B) -- 13 B per fp32 weight
    min_bytes = n * (4 + 4 + 4 + 1)
    ms = {name: statistics.median(v.step_ms) for name, v in variants.items()}
    update_ms, floor_ms = statistics.median(variants["st3"].update_ms), min_bytes / bandwidth * 1e3
    return {
        **{k: getattr(cfg, k) for k in ("device", "model", "batch_size", "input_size", "steps", "rounds", "amp",
                                        "compile", "channels_last", "method", "target")},
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, **{f"{name}_step_ms": value for name, value in ms.items()},
        "st3_over_dense": ms["st3"] / ms["dense"], "naive_over_dense": ms["naive_st3"] / ms["dense"],
        # what the trainer's non-finite check costs on top of ST-3 (a run with grad_clip computes the norm anyway)
        "guarded_over_st3": ms["st3_guarded"] / ms["st3"],
        "update_ms": update_ms, "naive_update_ms": statistics.median(variants["naive_st3"].update_ms),
        "update_min_bytes": min_bytes, "copy_bandwidth_gb_s": bandwidth / 1e9, "update_floor_ms": floor_ms,
        "update_over_floor": update_ms / floor_ms,
        **{f"{name}_peak_mib": variants[name].peak_bytes / 2**20 if cuda else None
           for name in ("dense", "st3", "naive_st3")},
        "peak_memory_source": "torch.cuda.max_memory_allocated during the variant's steps above the allocation "
        "before them, plus the variant's own parameters, buffers and optimizer state" if cuda
        else "not measured on cpu (null): RSS cannot separate variants in one process",
        "st3_sparsity": sp.sparsity(), "naive_st3_sparsity": naive.sparsity(), "num_prunable_weights": n,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(BenchmarkConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, choices=CHOICES.get(f.name))
    try:
        cfg = BenchmarkConfig(**vars(p.parse_args(argv)))
    except (ValueError, RuntimeError) as err:
        p.error(str(err))
    print(json.dumps(run_benchmark(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
