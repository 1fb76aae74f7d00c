"""RESULTS.md shows numbers computed from the committed run records, not typed in."""
from __future__ import annotations

import json
from pathlib import Path

from st3_hf.sweep import markdown_table, summarize

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "results" / "fmnist_cpu" / "runs.jsonl"


def test_results_table_is_generated_from_the_run_records():
    rows = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    assert len({r["recipe"] for r in rows}) >= 4 and all(r["seed"] in (0, 1, 2) for r in rows)
    text = (REPO / "RESULTS.md").read_text()
    assert markdown_table(summarize(rows)) in text
    assert (REPO / "results" / "fmnist_cpu" / "top1_vs_sparsity.png").stat().st_size > 1000
