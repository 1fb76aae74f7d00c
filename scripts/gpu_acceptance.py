#!/usr/bin/env python
"""GPU acceptance: every GPU claim measured in one prepared run (docs/gpu_acceptance.md). The parts run in order,
each inside its own budget, and one JSON line per part is appended to ``OUT/acceptance.jsonl`` the moment it ends
(a run cut off by the machine's limit keeps the earlier ones). What the parts run: ``scripts/acceptance/``.

    python scripts/gpu_acceptance.py --device cpu --out /tmp/acc          # the tiny CPU dry run
    python scripts/gpu_acceptance.py --report run1.jsonl run2.jsonl       # Markdown for BENCHMARKS.md / RESULTS.md

A part recorded in several files (the two GPU commands) is reported from the last file that has it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from st3_hf.train.metrics_log import JsonlLogger
from acceptance.parts import PARTS, Context, Part, PartTimeout, Skip
from acceptance.plan import (CPU, CPU_BUDGETS_S, GPU, GPU_BUDGETS_S, MIN_START_S, PART_ORDER, parse_part_budgets,
                             parse_parts)

RECORDS_FILE = "acceptance.jsonl"
LOG_FILE = "acceptance.log"
REPO = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "timeout", "skipped")


def write_record(path: Path, record: Dict[str, Any]) -> None:
    """Append one part's record (non-finite floats become null: strict JSON parsers reject them)."""
    if record.get("status") not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
    JsonlLogger(path).log(record)


def read_records(path: Path | str) -> List[Dict[str, Any]]:
    """Every record of an acceptance file, in order (a torn last line, from a kill mid-write, is dropped)."""
    return JsonlLogger(path).read()


def _log_tail(path: Path, chars: int) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def run_acceptance(device: str, out_dir: Path | str, parts: Optional[Sequence[str]] = None, budget_s: float = 500,
                   part_budgets: Optional[Dict[str, float]] = None, work_dir: Optional[Path | str] = None,
                   fmnist_root: Optional[Path | str] = None, repo: Path = REPO) -> List[Dict[str, Any]]:
    """Run ``parts`` (default: all) within ``budget_s``; each record appended to ``acceptance.jsonl`` as it ends."""
    deadline = time.monotonic() + budget_s
    out_dir, work = Path(out_dir), Path(work_dir or "/tmp/st3_acceptance")
    for folder in (out_dir, work):
        folder.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, GPU if device == "cuda" else CPU, out_dir, work, repo,
                  Path(fmnist_root) if fmnist_root else None)
    budgets = {**(GPU_BUDGETS_S if device == "cuda" else CPU_BUDGETS_S), **(part_budgets or {})}
    for name in parts or PART_ORDER:
        now = time.monotonic()
        remaining, budget = deadline - now, min(budgets[name], deadline - now)
        part = Part(ctx, name, now + budget)
        record: Dict[str, Any] = {"part": name, "device": device, "budget_s": budget,
                                  "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
                                  **({"cut": ctx.sizes.cuts[name]} if name in ctx.sizes.cuts else {})}
        if remaining < MIN_START_S:
            record.update(status="skipped",
                          reason=f"not started: {remaining:.0f} s left of the overall --budget-s {budget_s:g}")
        else:
            try:
                PARTS[name](part)
                record["status"] = "ok"
            except Skip as err:
                record.update(status="skipped", reason=str(err))
            except PartTimeout as err:
                record.update(status="timeout", reason=str(err))
            except Exception as err:  # a broken part must not stop the parts after it
                record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        record.update(wall_s=time.monotonic() - now, commands=part.commands, result=part.result)
        if record["status"] in ("failed", "timeout"):
            record["log_tail"] = _log_tail(part.log_path, 1500)
        write_record(out_dir / RECORDS_FILE, record)
        ctx.records[name] = record
        with (out_dir / LOG_FILE).open("a") as log:
            log.write(f"\n===== {name}: {record['status']} ({record['wall_s']:.1f} s) {record.get('reason', '')}\n")
            log.write(_log_tail(part.log_path, 6000))
        print(f"[acceptance] {name}: {record['status']} in {record['wall_s']:.1f} s {record.get('reason', '')}",
              flush=True)
    return list(ctx.records.values())


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


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], help="cpu: the tiny dry run")
    p.add_argument("--report", nargs="+", metavar="JSONL", help="print the Markdown tables of these records")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for acceptance.jsonl (default: $OUT)")
    p.add_argument("--parts", default="all", help=f"comma-separated, from: {', '.join(PART_ORDER)}")
    p.add_argument("--budget-s", type=float, default=500, help="overall seconds; parts not started past it")
    p.add_argument("--part-budget", action="append", default=[], metavar="NAME=SECONDS")
    p.add_argument("--work-dir", default=None, help="scratch folder (default /tmp/st3_acceptance)")
    p.add_argument("--fmnist-root", default=None, help="Fashion-MNIST IDX folder (default: found)")
    args = p.parse_args(argv)
    if args.report:
        sys.stdout.write(render(latest_by_part(args.report)))
        return 0
    if not args.device or not args.out:
        p.error("--device is required, and --out when $OUT is not set")
    try:
        parts, budgets = parse_parts(args.parts), parse_part_budgets(args.part_budget)
    except ValueError as err:
        p.error(str(err))
    records = run_acceptance(args.device, args.out, parts, args.budget_s, budgets, args.work_dir, args.fmnist_root)
    print("\n".join(f"{r['part']:18s} {r['status']:8s} {r['wall_s']:7.1f} s  {r.get('reason', '')[:90]}"
                    for r in records))
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
