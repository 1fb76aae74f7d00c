"""Run scripts/train.py in real subprocesses (plain python or `accelerate launch`) for the training tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = str(REPO / "scripts" / "train.py")

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
