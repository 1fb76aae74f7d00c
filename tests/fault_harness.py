"""Run a script in this process with a real fault injected from outside the library.

Nothing of st3_hf is patched: the faults are the operating system's and PyTorch's own.

    python tests/fault_harness.py [--kill-when GLOB] [--nan-input-at N,M] [--fsize-limit BYTES]
                                  [--fsize-limit-after GLOB:BYTES] -- SCRIPT [ARGS...]

--kill-when GLOB        SIGKILL this process as soon as a path matching GLOB exists (e.g. a file
                        inside a checkpoint that is being written)
--nan-input-at N,M      the N-th, M-th ... training-mode forward pass of the root model gets an
                        all-NaN input batch (a global forward pre-hook, public PyTorch API)
--fsize-limit BYTES     RLIMIT_FSIZE from the start: writing a file past BYTES fails with EFBIG,
                        as a full disk or an exhausted quota makes writes fail
--fsize-limit-after GLOB:BYTES
                        the same limit, set once a path matching GLOB exists
"""
from __future__ import annotations

import argparse
import glob
import os
import resource
import runpy
import signal
import sys
import threading
import time

import torch


def _when_exists(pattern: str, action) -> None:
    def watch() -> None:
        while not glob.glob(pattern):
            time.sleep(0.001)
        action()

    threading.Thread(target=watch, daemon=True).start()


def _limit_file_size(limit: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))


def _nan_inputs_at(calls: set) -> None:
    """Count root forward calls in training mode (depth 0) and replace the input of the chosen ones by NaN."""
    depth = [0]
    training_calls = [0]

    def pre_hook(module, args):
        depth[0] += 1
        if depth[0] != 1 or not module.training or not args or not torch.is_tensor(args[0]):
            return None
        if args[0].dim() != 4 or next(module.parameters(), None) is None:
            return None  # a transform (torchvision's are modules too), not the network
        training_calls[0] += 1
        if training_calls[0] in calls:
            return (torch.full_like(args[0], float("nan")),) + tuple(args[1:])
        return None

    def post_hook(module, args, output):
        depth[0] -= 1
        return None

    torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    torch.nn.modules.module.register_module_forward_hook(post_hook, always_call=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-when")
    parser.add_argument("--nan-input-at")
    parser.add_argument("--fsize-limit", type=int)
    parser.add_argument("--fsize-limit-after")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    if opts.kill_when:
        _when_exists(opts.kill_when, lambda: os.kill(os.getpid(), signal.SIGKILL))
    if opts.nan_input_at:
        _nan_inputs_at({int(n) for n in opts.nan_input_at.split(",")})
    if opts.fsize_limit:
        _limit_file_size(opts.fsize_limit)
    if opts.fsize_limit_after:
        pattern, limit = opts.fsize_limit_after.rsplit(":", 1)
        _when_exists(pattern, lambda: _limit_file_size(int(limit)))
    sys.argv = [opts.script] + [a for a in opts.args if a != "--"]
    runpy.run_path(opts.script, run_name="__main__")


if __name__ == "__main__":
    main()
