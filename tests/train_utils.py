"""Run scripts/train.py in real subprocesses (plain python or `accelerate launch`) for the training tests."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = str(REPO / "scripts" / "train.py")
TORCH_EXTENSIONS_DIR = os.path.join(os.path.expanduser("~"), ".cache", "st3_hf", "torch_extensions")

# a few-step quickstart: 256 training images in batches of 32 -> 8 steps per epoch
SMALL = [
    "data.train_subset=256",
    "data.eval_subset=128",
    "data.batch_size=32",
    "data.num_workers=0",
    "training.epochs=2",
    "training.log_every_steps=2",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    # DeepSpeed's CPU accelerator JIT-builds a small shared-memory op (~50 s of g++): one cache for every test and run
    e.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(*launch_args: str) -> List[str]:
    return [str(BIN / "accelerate"), "launch", *launch_args]


def run(cmd: Sequence[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def records(output_dir: Path) -> List[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparable(recs: List[dict]) -> List[dict]:
    """Metrics records without wall-clock times: equal for runs that computed the same things."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in recs]


def assert_same_weights(a: Path, b: Path) -> None:
    """The exported ``model.safetensors`` of two runs are bit-identical."""
    from safetensors.torch import load_file
    import torch

    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _as_a_fresh_process(cwd: Path):
    """What a new interpreter would give a run: ``cwd`` as working folder, one torch thread (the
    subprocesses' OMP_NUM_THREADS=1, so in-process and subprocess runs compute bit-identical numbers),
    offline hubs, warnings shown on stderr (pytest would record them instead), and accelerate's
    process-wide state reset before and after (it refuses a second Accelerator with other settings)."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.showwarning = _show_on_stderr
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        os.environ.update({k: v for k, v in env().items() if k != "PYTHONPATH"})
        os.chdir(cwd)
        torch.set_num_threads(1)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            yield
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            torch.set_num_threads(saved_threads)
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)


def train_in_process(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``scripts/train.py ARGS`` through its entry point (``st3_hf.train.cli.train_main``: the same argument
    parsing, error reporting and exit code) in this process, output captured. Training runs, exports and
    errors alike: a new interpreter per run costs seconds of imports on a 2-core machine. What needs a process
    of its own (``accelerate launch``, several ranks, a signal or a kill from outside) uses :func:`run`;
    tests/test_robustness_doc.py runs the real script for the README's example."""
    from st3_hf.train.cli import train_main

    return in_process(train_main, TRAIN, args, check=check)


def evaluate_in_process(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``scripts/evaluate_model.py ARGS`` through its entry point in this process, output captured."""
    from st3_hf.train.cli import evaluate_main

    return in_process(evaluate_main, str(REPO / "scripts" / "evaluate_model.py"), args, check=check)


def in_process(main, script: str, args: Sequence[str], check: bool = False, cwd: Optional[Path] = None
               ) -> subprocess.CompletedProcess:
    """``script ARGS`` through its entry point ``main`` in this process (in ``cwd``, default the repository)."""
    out, err = io.StringIO(), io.StringIO()
    with _as_a_fresh_process(cwd or REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's usage errors exit like the script would
            code = stop.code if isinstance(stop.code, int) else 1
    proc = subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({code})\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def error_line(proc: subprocess.CompletedProcess, exit_code: Optional[int] = None) -> str:
    """The one ``error: ...`` line a script prints last for bad input; a traceback means it was not handled."""
    details = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    if exit_code is not None:
        assert proc.returncode == exit_code, details
    assert "Traceback" not in proc.stderr, details
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), details
    return lines[-1]


def export_zeros(out: Path) -> tuple:
    """(zeros, total) of the prunable weights of the export, loaded with plain timm; they must be fp32."""
    import timm
    import torch
    import torch.nn as nn

    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(w.dtype == torch.float32 for w in weights)
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def assert_exact_export_sparsity(out: Path, target: float = 0.9) -> None:
    """Exactly the quantile's count of zeros (fp32 weights drawn at random have no ties); 0.9: quickstart's target."""
    import math

    zeros, total = export_zeros(out)
    # mask = |w| > t with t interpolated between order statistics floor(q (n-1)) and the next one
    assert zeros == math.floor(target * (total - 1)) + 1, (zeros, total)
