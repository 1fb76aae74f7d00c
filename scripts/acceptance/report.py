"""Acceptance run records -> Markdown sections for BENCHMARKS.md and RESULTS.md (figures computed, not typed).

    PYTHONPATH=scripts python -m acceptance.report OUT/acceptance.jsonl [more.jsonl ...]   # prints Markdown

A part recorded in several files (the two device calls) is taken from the last file that has it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from acceptance.records import read_records
def latest_by_part(paths: Sequence[Path | str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        for record in read_records(path):
            out[record["part"]] = record
    return out


def _f(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def status_table(records: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| part | status | wall s | budget s | note |", "|---|---|---|---|---|"]
    for name, r in records.items():
        note = (r.get("reason") or r.get("cut") or "").replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {r['wall_s']:.0f} | {r['budget_s']:.0f} | {note} |")
    return "\n".join(lines) + "\n"


def benchmark_table(records: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| variant | device | model, batch | dense ms | ST-3 ms | ST-3 / dense | peak mem ST-3 / dense | "
             "update ms | naive ST-3 / dense | guard / ST-3 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("benchmark_eager", "benchmark_compile"):
        r = records.get(name)
        if not r or r["status"] != "ok":
            continue
        b = r["result"]
        mem = (b["st3_peak_mib"] / b["dense_peak_mib"]) if b.get("dense_peak_mib") else None
        lines.append(f"| {'compile' if b['compile'] else 'eager'} | {b['device_name']} | {b['model']}, {b['batch_size']} | "
                     f"{_f(b['dense_step_ms'])} | {_f(b['st3_step_ms'])} | {_f(b['st3_over_dense'], 3)} | {_f(mem, 3)} | "
                     f"{_f(b['update_ms'])} | {_f(b['naive_over_dense'], 3)} | {_f(b['guarded_over_st3'], 3)} |")
    return "\n".join(lines) + "\n"


def loop_table(records: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| run | images/s whole loop | images/s loader alone | images/s model alone | bound by | top-1 | sparsity |",
             "|---|---|---|---|---|---|---|"]
    for name in ("train_loop", "deepspeed_zero2", "fsdp2"):
        r = records.get(name)
        if not r or r["status"] != "ok":
            continue
        res = r["result"]
        where = res.get("where_time_goes", {})
        lines.append(f"| {name} | {_f(res['loop']['images_per_s'], 1)} | {_f(where.get('loader_only_images_per_s'), 1)} | "
                     f"{_f(where.get('model_only_images_per_s'), 1)} | {where.get('bound_by', '—')} | "
                     f"{_f(res['final']['eval_top1'], 4)} | {_f(res['final']['sparsity'], 4)} |")
    return "\n".join(lines) + "\n"


def profile_table(records: Dict[str, Dict[str, Any]]) -> str:
    r = records.get("train_profile")
    if not r or r["status"] != "ok":
        return ""
    lines = [f"Host time per training step ({r['result']['train_steps']} steps, cProfile):", "",
             "| where | ms / step | s in all |", "|---|---|---|"]
    for label, v in sorted(r["result"]["functions"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"| {label} | {v['ms_per_step']:.1f} | {v['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def sweep_section(records: Dict[str, Dict[str, Any]]) -> str:
    r = records.get("sweep")
    if not r or "table" not in r.get("result", {}):
        return ""
    res = r["result"]
    cut = ", ".join(res["cut"]) or "nothing"
    return f"{res['table']}\nRuns: {res['completed_runs']} of {res['planned_runs']}; not run (budget): {cut}.\n"


def render(records: Dict[str, Dict[str, Any]]) -> str:
    """Every section that has data, for pasting into BENCHMARKS.md (benchmark, loop, profile) and RESULTS.md (sweep)."""
    parts = ["## Acceptance parts\n", status_table(records), "## Step time and memory\n", benchmark_table(records),
             "## Whole training loop\n", loop_table(records)]
    profile = profile_table(records)
    if profile:
        parts += ["## Where the time goes\n", profile]
    sweep = sweep_section(records)
    if sweep:
        parts += ["## Fashion-MNIST sweep\n", sweep]
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print("usage: PYTHONPATH=scripts python -m acceptance.report ACCEPTANCE.jsonl [...]", file=sys.stderr)
        return 2
    sys.stdout.write(render(latest_by_part(paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
