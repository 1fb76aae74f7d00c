#!/usr/bin/env python
"""Run a list of recipes x seeds, collect their final metrics into one table and plot.

Each run is a separate process (``scripts/train.py``): runs cannot leak state into each other, a crash loses
one run only, and a sweep started again skips the runs it already finished (``runs.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

from st3_hf.train.metrics_log import JsonlLogger

RUNS_FILE = "runs.jsonl"


def final_record(output_dir: Path) -> Dict[str, Any]:
    """The ``final`` evaluation record a training run wrote to its metrics.jsonl."""
    finals = [r for r in JsonlLogger(output_dir / "metrics.jsonl").read() if r.get("kind") == "final"]
    if not finals:
        raise RuntimeError(f"{output_dir} has no final evaluation record (did the run finish?)")
    return finals[-1]


def run_sweep(recipes: Sequence[str], seeds: Sequence[int], output: Path | str, overrides: Sequence[str] = (),
              launcher: Sequence[str] = (sys.executable,), train_script: str = "scripts/train.py",
              progress: bool = True) -> List[Dict[str, Any]]:
    """Train every recipe with every seed (skipping finished runs); return one row per run."""
    from tqdm.auto import tqdm

    output = Path(output)
    runs_log = JsonlLogger(output / RUNS_FILE)
    done = {r["run"]: r for r in runs_log.read()}
    rows: List[Dict[str, Any]] = []
    for recipe, seed in tqdm([(r, s) for r in recipes for s in seeds], desc="sweep", disable=not progress):
        name = f"{Path(recipe).stem}_seed{seed}"
        if name not in done:
            run_dir, log_path = output / "runs" / name, output / "logs" / f"{name}.log"
            cmd = [*launcher, train_script, recipe, f"output_dir={run_dir}", f"training.seed={seed}",
                   "logging.progress_bar=false", *overrides]
            start = time.time()
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("w") as log:
                returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            if returncode != 0:
                raise RuntimeError(f"run {name} failed (exit {returncode}); see {log_path}\ncommand: {shlex.join(cmd)}")
            final = final_record(run_dir)
            done[name] = {"run": name, "recipe": Path(recipe).stem, "seed": seed, "top1": final["eval_top1"],
                          "top5": final["eval_top5"], "sparsity": final["sparsity"],
                          "sparse_mflops": final["sparse_mflops"], "dense_mflops": final["dense_mflops"],
                          "wall_s": time.time() - start, "command": shlex.join(cmd)}
            runs_log.log(done[name])
        rows.append(done[name])
    return rows


def summarize(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and sample standard deviation over seeds, one row per recipe (input order kept)."""
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["recipe"]].append(r)
    return [{"recipe": recipe, "seeds": len(rs), "top1_mean": statistics.fmean(r["top1"] for r in rs),
             "top1_std": statistics.stdev(r["top1"] for r in rs) if len(rs) > 1 else 0.0,
             **{f"{k}_mean": statistics.fmean(r[k] for r in rs) for k in ("sparsity", "sparse_mflops", "wall_s")}}
            for recipe, rs in groups.items()]


def markdown_table(summary: Sequence[Dict[str, Any]]) -> str:
    lines = ["| recipe | seeds | top-1 % (mean ± sd) | sparsity % | sparse MFLOPs | wall s / run |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['seeds']} | {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} | "
              f"{100 * r['sparsity_mean']:.2f} | {r['sparse_mflops_mean']:.2f} | {r['wall_s_mean']:.0f} |"
              for r in summary]
    return "\n".join(lines) + "\n"


def method_of(recipe_name: str) -> str:
    """``fmnist_st3sigma_98`` -> ``st3sigma``; ``fmnist_dense`` -> ``dense``."""
    parts = recipe_name.split("_")
    return parts[1] if len(parts) > 1 else recipe_name


def plot_accuracy_vs_sparsity(summary: Sequence[Dict[str, Any]], path: Path | str, title: str = "") -> None:
    """Top-1 against sparsity, one line per method, error bars = sd over seeds; dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in sorted(summary, key=lambda r: r["sparsity_mean"]):
        by_method[method_of(r["recipe"])].append(r)
    for method, rs in sorted(by_method.items()):
        if method == "dense":
            for r in rs:
                ax.axhline(100 * r["top1_mean"], color="gray", linestyle="--", label="dense")
        else:
            ax.errorbar([100 * r["sparsity_mean"] for r in rs], [100 * r["top1_mean"] for r in rs],
                        yerr=[100 * r["top1_std"] for r in rs], marker="o", capsize=3, label=method)
    ax.set(xlabel="sparsity (%)", ylabel="top-1 (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[Dict[str, Any]], output: Path | str, title: str = "") -> Dict[str, Path]:
    """``summary.json``, ``table.md`` and ``top1_vs_sparsity.png`` in ``output``."""
    output = Path(output)
    summary = summarize(rows)
    paths = {"summary": output / "summary.json", "table": output / "table.md", "plot": output / "top1_vs_sparsity.png"}
    paths["summary"].write_text(json.dumps(summary, indent=1))
    paths["table"].write_text(markdown_table(summary))
    plot_accuracy_vs_sparsity(summary, paths["plot"], title)
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output", required=True)
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--launcher", default=sys.executable, help='e.g. "accelerate launch --num_processes 1"')
    p.add_argument("--title", default="")
    args = p.parse_args()
    rows = run_sweep(args.recipes, args.seeds, args.output, args.override, shlex.split(args.launcher))
    print(write_report(rows, args.output, args.title)["table"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
