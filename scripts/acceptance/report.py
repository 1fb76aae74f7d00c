"""Acceptance run records -> Markdown sections for BENCHMARKS.md and RESULTS.md (figures computed, not typed).

    PYTHONPATH=scripts python -m acceptance.report OUT/acceptance.jsonl [more.jsonl ...]   # prints Markdown

A part recorded in several files (the two GPU commands) is taken from the last file that has it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gpu_acceptance import read_records

Records = Dict[str, Dict[str, Any]]


def latest_by_part(paths: Sequence[Path | str]) -> Records:
    return {record["part"]: record for path in paths for record in read_records(path)}


def _f(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _ok(records: Records, names: Sequence[str]) -> List[Dict[str, Any]]:
    return [records[n]["result"] | {"part": n} for n in names if records.get(n, {}).get("status") == "ok"]


def render(records: Records) -> str:
    """Every section that has data, for pasting into BENCHMARKS.md (benchmark, loop, profile) and RESULTS.md (sweep)."""
    status = [[name, r["status"], f"{r['wall_s']:.0f}", f"{r['budget_s']:.0f}",
               (r.get("reason") or r.get("cut") or "").replace("|", "/")] for name, r in records.items()]
    bench = [["compile" if b["compile"] else "eager", b["device_name"], f"{b['model']}, {b['batch_size']}",
              _f(b["dense_step_ms"]), _f(b["st3_step_ms"]), _f(b["st3_over_dense"], 3),
              _f(b["st3_peak_mib"] / b["dense_peak_mib"] if b.get("dense_peak_mib") else None, 3),
              _f(b["update_ms"]), _f(b["naive_over_dense"], 3), _f(b["guarded_over_st3"], 3)]
             for b in _ok(records, ("benchmark_eager", "benchmark_compile"))]
    loops = [[r["part"], _f(r["loop"]["images_per_s"], 1),
              _f(r.get("where_time_goes", {}).get("loader_only_images_per_s"), 1),
              _f(r.get("where_time_goes", {}).get("model_only_images_per_s"), 1),
              r.get("where_time_goes", {}).get("bound_by", "—"), _f(r["final"]["eval_top1"], 4),
              _f(r["final"]["sparsity"], 4)] for r in _ok(records, ("train_loop", "deepspeed_zero2", "fsdp2"))]
    parts = ["## Acceptance parts\n", _table(["part", "status", "wall s", "budget s", "note"], status),
             "## Step time and memory\n",
             _table(["variant", "device", "model, batch", "dense ms", "ST-3 ms", "ST-3 / dense",
                     "peak mem ST-3 / dense", "update ms", "naive ST-3 / dense", "guard / ST-3"], bench),
             "## Whole training loop\n",
             _table(["run", "images/s whole loop", "images/s loader alone", "images/s model alone", "bound by", "top-1",
                     "sparsity"], loops)]
    for profile in _ok(records, ("train_profile",)):
        rows = [[label, f"{v['ms_per_step']:.1f}", f"{v['seconds']:.2f}"]
                for label, v in sorted(profile["functions"].items(), key=lambda kv: -kv[1]["seconds"])]
        parts += ["## Where the time goes\n", f"Host time per training step ({profile['train_steps']} steps, cProfile):"
                  f"\n\n{_table(['where', 'ms / step', 's in all'], rows)}"]
    sweep = records.get("sweep", {}).get("result", {})
    if "table" in sweep:
        parts += ["## Fashion-MNIST sweep\n", f"{sweep['table']}\nRuns: {sweep['completed_runs']} of "
                  f"{sweep['planned_runs']}; not run (budget): {', '.join(sweep['cut']) or 'nothing'}.\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: PYTHONPATH=scripts python -m acceptance.report ACCEPTANCE.jsonl [...]")
    sys.stdout.write(render(latest_by_part(sys.argv[1:])))
