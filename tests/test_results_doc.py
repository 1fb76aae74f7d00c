"""RESULTS.md shows numbers computed from the committed run records, not typed in."""
from __future__ import annotations

import json
from pathlib import Path

from sweep import markdown_table, summarize

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "results" / "fmnist_cpu" / "runs.jsonl"


def test_results_table_is_generated_from_the_run_records():
    rows = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    assert len({r["recipe"] for r in rows}) >= 4 and all(r["seed"] in (0, 1, 2) for r in rows)
    text = (REPO / "RESULTS.md").read_text()
    assert markdown_table(summarize(rows)) in text
    assert (REPO / "results" / "fmnist_cpu" / "top1_vs_sparsity.png").stat().st_size > 1000


FROM_PRETRAINED = REPO / "results" / "fmnist_from_pretrained"


def test_pruning_from_pretrained_table_is_generated_from_the_run_records():
    from tables import run_table
    from st3_hf.train.metrics_log import JsonlLogger

    runs = {"dense start (quickstart, dense, 1 epoch)": FROM_PRETRAINED / "dense_start.metrics.jsonl",
            "ST-3 90 % from the dense start (recipes/quickstart_from_pretrained.yaml)": FROM_PRETRAINED / "prune.metrics.jsonl"}
    assert run_table(runs) in (REPO / "RESULTS.md").read_text()
    prune = JsonlLogger(runs["ST-3 90 % from the dense start (recipes/quickstart_from_pretrained.yaml)"]).read()
    dense = JsonlLogger(runs["dense start (quickstart, dense, 1 epoch)"]).read()
    dense_final = [r for r in dense if r["kind"] == "final"][-1]
    # the recorded prune did start from the recorded dense model: its step-0 evaluation is the dense run's final one
    assert prune[0]["kind"] == "start" and prune[0]["eval_loss"] == dense_final["eval_loss"]
    assert prune[-1]["kind"] == "final" and abs(prune[-1]["sparsity"] - 0.9) < 2e-3
