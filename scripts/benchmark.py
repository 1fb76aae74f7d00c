#!/usr/bin/env python
"""Speed benchmark: dense vs ST-3 (this package) vs a naive reference-style ST-3 training step.

Everything runs in one process with interleaved rounds, so that the three
variants see the same machine state (clocks, caches, other load):

* ``dense``  – a plain timm model and SGD;
* ``st3``    – the same model after :func:`~st3_hf.sparsify`, SGD wrapped by the
  :class:`~st3_hf.Sparsifier` (threshold, masks and effective weights once per
  update, during the ramp so that every step recomputes the threshold);
* ``naive``  – :class:`NaiveST3`, written the way the reference code does it:
  a full ``torch.sort`` of all weights and a host-side threshold every step, a
  per-layer Python loop to set masks and scales, and the soft-thresholded,
  rescaled weight rebuilt in every forward (a parametrization), with a host
  check of the threshold in every forward;
* ``st3_guarded`` – ``st3`` plus what the trainer adds against NaN/inf updates
  (:class:`~st3_hf.train.nonfinite.NonFiniteGuard`): a gradient norm, one host
  sync to decide, and a copy of the BatchNorm statistics after each update.

Example::

    >>> from benchmark import BenchmarkConfig, run_benchmark
    >>> result = run_benchmark(BenchmarkConfig(model="resnet10t", batch_size=2, input_size=32, steps=1, rounds=1))
    >>> sorted(k for k in result if k.endswith("_step_ms"))
    ['dense_step_ms', 'naive_st3_step_ms', 'st3_step_ms']
"""
from __future__ import annotations

import argparse
import json
import sys
import contextlib
import copy
import dataclasses
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from st3_hf.sparse.config import SparsityConfig
from st3_hf.train.nonfinite import NonFiniteGuard
from st3_hf.sparse.sparsifier import Sparsifier, sparsify

VARIANTS = ("dense", "st3", "naive", "st3_guarded")
# the ramp is long and the benchmark starts half-way, so every step moves the threshold
RAMP_STEPS = 1_000_000


@dataclass
class BenchmarkConfig:
    """What :func:`run_benchmark` measures.

    ``steps`` timed training steps per variant and round; ``rounds`` interleaved
    rounds; ``warmup`` untimed steps per variant before the first round (they
    also absorb ``torch.compile`` time).
    """

    device: str = "cpu"
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
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.method not in ("st3", "st3_sigma"):
            raise ValueError(f"method must be 'st3' or 'st3_sigma', got {self.method!r}")
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
        scale_shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.register_buffer("th", torch.full((), -1.0, device=weight.device))
        self.register_buffer("mask", torch.ones_like(weight))
        self.register_buffer("scale", torch.ones(scale_shape, dtype=weight.dtype, device=weight.device))
        self.active = False  # mirrors th > 0 for torch.compile, which cannot branch on a tensor without a graph break

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # eager: a host check of the threshold in every forward, as in the reference
        active = self.active if torch.compiler.is_compiling() else bool(self.th > 0)
        if active:
            with torch.no_grad():
                q = self.scale * ((weight - torch.sign(weight) * self.th) * self.mask)
                delta = q - weight
            return weight + delta  # straight-through: d(weight + delta)/d(weight) = 1
        return weight


class NaiveST3:
    """Reference-style ST-3 on a model: parametrized layers, full sort per step (for benchmarking).

    Call :meth:`step` after every optimizer step.
    """

    def __init__(self, model: nn.Module, target: float, start_step: int, end_step: int,
                 power: float = 3.0, criterion: str = "l1") -> None:
        self.model = model
        self.target, self.start_step, self.end_step, self.power = target, start_step, end_step, power
        self.criterion = criterion
        self.step_count = 0
        self.layers: List[nn.Module] = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer in self.layers:
            parametrize.register_parametrization(layer, "weight", _NaiveST3Weight(layer.weight))

    @staticmethod
    def latent(layer: nn.Module) -> torch.Tensor:
        return layer.parametrizations.weight.original

    def ratio(self) -> float:
        s = self.step_count
        if s < self.start_step:
            return 0.0
        if s >= self.end_step:
            return self.target
        return self.target * (1 - (1 - (s - self.start_step) / (self.end_step - self.start_step)) ** self.power)

    def step(self) -> None:
        self.step_count += 1
        self.set_ratio(self.ratio())

    @torch.no_grad()
    def set_ratio(self, ratio: float) -> None:
        if ratio == 0:
            for layer in self.layers:
                layer.parametrizations.weight[0].th.fill_(-1.0)
                layer.parametrizations.weight[0].active = False
            return
        sigmas = []
        flat = []
        for layer in self.layers:
            w = self.latent(layer)
            sigma = 1.0 / math.sqrt(sum(w.shape)) if self.criterion == "l1std" else 1.0
            sigmas.append(sigma)
            flat.append(w.flatten() / sigma)
        sorted_abs = torch.sort(torch.cat(flat).abs()).values
        idx = (sorted_abs.numel() - 1) * ratio
        lo, hi = int(math.floor(idx)), int(math.ceil(idx))
        th = (sorted_abs[lo] + (sorted_abs[hi] - sorted_abs[lo]) * (idx - lo)).item()  # host sync
        for layer, sigma in zip(self.layers, sigmas):
            p = layer.parametrizations.weight[0]
            w = self.latent(layer)
            t = th * sigma
            p.th.fill_(t)
            p.active = t > 0
            p.mask.copy_((w.abs() > t).to(p.mask.dtype))
            dims = tuple(range(1, w.dim()))
            kept = (w.abs() * p.mask).mean(dim=dims, keepdim=True)
            r = (kept + 1e-6) / (w.abs().mean(dim=dims, keepdim=True) + 1e-6)
            p.scale.copy_(1.01 / (r + 0.01))

    @torch.no_grad()
    def sparsity(self) -> float:
        zeros = sum(int((layer.weight == 0).sum()) for layer in self.layers)
        return zeros / sum(layer.weight.numel() for layer in self.layers)


# ---------------------------------------------------------------------- the benchmark
@dataclass
class _Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Optional[Callable[[], None]] = None
    update: Optional[Callable[[], None]] = None
    step_ms: List[float] = dataclasses.field(default_factory=list)
    update_ms: List[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0
    run: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    guard: Optional[NonFiniteGuard] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers and optimizer state (what lives between steps)."""
    seen = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _copy_bandwidth(numel: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second of a plain copy of ``numel`` fp32 values between two allocated buffers (read + write)."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch outside the timing
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * numel * 4 * repeats / (time.perf_counter() - start)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def run_benchmark(cfg: BenchmarkConfig) -> Dict[str, Any]:
    """Time dense, ST-3 and naive ST-3 training steps; returns a JSON-ready dict (milliseconds, MiB)."""
    import timm

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    base = timm.create_model(cfg.model, pretrained=False, num_classes=cfg.num_classes)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    base = base.to(device=device, memory_format=memory_format).train()
    x = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    half_way = RAMP_STEPS // 2

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-5)

    dense_model = copy.deepcopy(base)
    variants = [_Variant("dense", dense_model, sgd(dense_model))]

    st3_model = copy.deepcopy(base)
    sp: Sparsifier = sparsify(st3_model, SparsityConfig(method=cfg.method, target=cfg.target,
                                                        start_step=0, end_step=RAMP_STEPS))
    sp.step_count = half_way  # in the middle of the ramp: ratio ~ 0.875 target, moving every step
    sp.step()
    variants.append(_Variant("st3", st3_model, sp.wrap(sgd(st3_model)), update=sp.step))

    naive_model = copy.deepcopy(base)
    naive = NaiveST3(naive_model, cfg.target, 0, RAMP_STEPS,
                     criterion="l1std" if cfg.method == "st3_sigma" else "l1")
    naive.step_count = half_way
    naive.step()
    variants.append(_Variant("naive", naive_model, sgd(naive_model), after_step=naive.step, update=naive.step))

    guarded_model = copy.deepcopy(base)
    guarded_sp = sparsify(guarded_model, SparsityConfig(method=cfg.method, target=cfg.target,
                                                          start_step=0, end_step=RAMP_STEPS))
    guarded_sp.step_count = half_way
    guarded_sp.step()
    variants.append(_Variant("st3_guarded", guarded_model, guarded_sp.wrap(sgd(guarded_model)), update=guarded_sp.step,
                             guard=NonFiniteGuard(guarded_model, max_consecutive=10)))

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.amp == "bf16" \
        else contextlib.nullcontext
    for v in variants:
        v.run = torch.compile(v.model) if cfg.compile else v.model

    def train_step(v: _Variant) -> None:
        v.optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(v.run(x), y)
        loss.backward()
        if v.guard is not None:
            grads = [p.grad for p in v.model.parameters() if p.grad is not None]
            if not v.guard.update_is_finite(loss.detach(), torch.nn.utils.get_total_norm(grads)):
                return
            v.optimizer.step()
            v.guard.commit()
            return
        v.optimizer.step()
        if v.after_step is not None:
            v.after_step()

    def timed(fn: Callable[[], None]) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    for v in variants:
        for _ in range(cfg.warmup):
            train_step(v)
        if v.update is not None:
            v.update()
    for r in range(cfg.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate: no fixed position bias
        for v in order:
            if device.type == "cuda":
                v.optimizer.zero_grad(set_to_none=True)  # gradients count in the step's peak, not the base
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base_bytes = torch.cuda.memory_allocated(device)
            for _ in range(cfg.steps):
                v.step_ms.append(timed(lambda: train_step(v)))
            if device.type == "cuda":
                step_peak = torch.cuda.max_memory_allocated(device) - base_bytes
                v.peak_bytes = max(v.peak_bytes, _state_bytes(v.model, v.optimizer) + step_peak)
            if v.update is not None:
                for _ in range(cfg.steps):
                    v.update_ms.append(timed(v.update))

    bandwidth = _copy_bandwidth(sp.num_prunable(), device)
    # the least any exact update must move: read each latent weight (4 B) for the scores, read it
    # again and write the effective weight (4 + 4 B) and the mask (1 B) -- 13 B per fp32 weight
    min_bytes = sp.num_prunable() * (4 + 4 + 4 + 1)

    by_name = {v.name: v for v in variants}
    med = {name: statistics.median(v.step_ms) for name, v in by_name.items()}
    mib = (lambda name: by_name[name].peak_bytes / 2**20) if device.type == "cuda" else (lambda name: None)
    return {
        "device": cfg.device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "input_size": cfg.input_size,
        "steps": cfg.steps,
        "rounds": cfg.rounds,
        "amp": cfg.amp,
        "compile": cfg.compile,
        "channels_last": cfg.channels_last,
        "method": cfg.method,
        "target": cfg.target,
        "dense_step_ms": med["dense"],
        "st3_step_ms": med["st3"],
        "naive_st3_step_ms": med["naive"],
        "st3_over_dense": med["st3"] / med["dense"],
        "naive_over_dense": med["naive"] / med["dense"],
        "st3_guarded_step_ms": med["st3_guarded"],
        # what the trainer's non-finite check costs on top of ST-3 (a run with grad_clip computes the norm anyway)
        "guarded_over_st3": med["st3_guarded"] / med["st3"],
        "update_ms": statistics.median(by_name["st3"].update_ms),
        "naive_update_ms": statistics.median(by_name["naive"].update_ms),
        "update_min_bytes": min_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "update_floor_ms": min_bytes / bandwidth * 1e3,
        "update_over_floor": statistics.median(by_name["st3"].update_ms) / (min_bytes / bandwidth * 1e3),
        "dense_peak_mib": mib("dense"),
        "st3_peak_mib": mib("st3"),
        "naive_st3_peak_mib": mib("naive"),
        "peak_memory_source": (
            "torch.cuda.max_memory_allocated during the variant's steps above the allocation before them, "
            "plus the variant's own parameters, buffers and optimizer state"
            if device.type == "cuda" else "not measured on cpu (null): RSS cannot separate variants in one process"
        ),
        "st3_sparsity": sp.sparsity(),
        "naive_st3_sparsity": naive.sparsity(),
        "num_prunable_weights": sp.num_prunable(),
    }


# ------------------------------------------------------------------ command line
def parse_args(argv: Optional[List[str]] = None) -> BenchmarkConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--model", default="resnet50", help="timm model name (randomly initialised)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (dense, st3, naive)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--target", type=float, default=0.98, help="target sparsity of the ramp")
    p.add_argument("--method", choices=["st3", "st3_sigma"], default="st3")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", choices=["bf16", "none"], default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile each variant's model")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return BenchmarkConfig(
        device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"), model=a.model, batch_size=a.batch_size, steps=a.steps, rounds=a.rounds,
        warmup=a.warmup, target=a.target, method=a.method, input_size=a.input_size,
        num_classes=a.num_classes, channels_last=a.channels_last, amp=a.amp, compile=a.compile, seed=a.seed,
    )


def main(argv: Optional[List[str]] = None) -> int:
    result = run_benchmark(parse_args(argv))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
