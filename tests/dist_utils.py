"""Run a function in N real processes joined by a gloo process group (CPU), for the distributed tests."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_processes(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; raises if any of them fails.

    ``fn`` must be importable (a module-level function); results travel through files the caller names in ``args``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "init"), fn, args), nprocs=world_size, join=True)
