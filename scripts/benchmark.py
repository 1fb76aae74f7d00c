#!/usr/bin/env python
"""Time dense vs ST-3 vs naive reference-style ST-3 training steps; prints one JSON object.

    python scripts/benchmark.py --device cpu --model resnet10t --batch-size 8 --input-size 64 --steps 3
    python scripts/benchmark.py --device cuda --model resnet50 --batch-size 64 --steps 20 --amp bf16 --channels-last
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from st3_hf.benchmark import BenchmarkConfig, run_benchmark


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
