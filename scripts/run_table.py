"""A markdown table of the start and final evaluations of recorded runs (their ``metrics.jsonl``): RESULTS.md's
"Pruning a pretrained model" table is this function's output on the committed records.

    >>> print(run_table({"prune": "results/fmnist_from_pretrained/prune.metrics.jsonl"}))  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

from st3_hf.train.metrics_log import JsonlLogger


def run_table(runs: Mapping[str, Union[str, Path]]) -> str:
    """One row per start / final evaluation of each run, in the order given: top-1, sparsity, MFLOPs, step, time."""
    rows = ["| run | evaluation | step | top-1 % | top-5 % | sparsity % | MFLOPs (sparse / dense) | wall time |",
            "|---|---|---|---|---|---|---|---|"]
    for label, path in runs.items():
        for r in JsonlLogger(path).read():
            if r.get("kind") in ("start", "final"):  # a pretrained start's evaluation at step 0, and the final one
                minutes, seconds = divmod(int(round(r["elapsed_s"])), 60)
                rows.append(f"| {label} | {r['kind']} | {r['step']} | {100 * r['eval_top1']:.2f} | "
                            f"{100 * r['eval_top5']:.2f} | {100 * r['sparsity']:.2f} | "
                            f"{r['sparse_mflops']:.1f} / {r['dense_mflops']:.1f} | {minutes} min {seconds:02d} s |")
    return "\n".join(rows) + "\n"
