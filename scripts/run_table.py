"""A markdown table of the start and final evaluations of recorded runs (their ``metrics.jsonl``).

RESULTS.md's "Pruning a pretrained model" table is this function's output on the committed records,
so its numbers are computed, not typed in.

    >>> print(run_table({"prune": "results/fmnist_from_pretrained/prune.metrics.jsonl"}))  # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

PathLike = Union[str, Path]
KINDS = ("start", "final")  # the evaluation of a pretrained start at step 0, and the run's final one


def read_records(path: PathLike) -> List[Dict[str, Any]]:
    """The JSON records of a metrics file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_table(runs: Mapping[str, PathLike]) -> str:
    """One row per start / final evaluation of each run, in the order given: top-1, sparsity, MFLOPs, step, time."""
    rows = [
        "| run | evaluation | step | top-1 % | top-5 % | sparsity % | MFLOPs (sparse / dense) | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, path in runs.items():
        for record in read_records(path):
            if record.get("kind") not in KINDS:
                continue
            minutes, seconds = divmod(int(round(record["elapsed_s"])), 60)
            rows.append(
                f"| {label} | {record['kind']} | {record['step']} | {100 * record['eval_top1']:.2f} | "
                f"{100 * record['eval_top5']:.2f} | {100 * record['sparsity']:.2f} | "
                f"{record['sparse_mflops']:.1f} / {record['dense_mflops']:.1f} | {minutes} min {seconds:02d} s |"
            )
    return "\n".join(rows) + "\n"
