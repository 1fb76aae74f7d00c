"""Markdown tables generated from the project's own files, each kept in sync by a test:

    python scripts/tables.py recipes      # docs/recipes.md: the shipped recipes and the paper's figures
    python scripts/tables.py runs LABEL=results/fmnist_from_pretrained/prune.metrics.jsonl ...   # RESULTS.md
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping, Optional, Union

from st3_hf.train.metrics_log import JsonlLogger
from st3_hf.train.recipe import load_recipe


def _fmt(value: Optional[float], digits: int = 2) -> str:
    text = "—" if value is None else f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def recipe_table(recipes_dir: Path | str, prefix: str = "r50_") -> str:
    """Recipe file, method, target sparsity and the paper's expected top-1 / MFLOPs, from the recipe files."""
    rows = ["| recipe | method | target sparsity | paper top-1 % | paper MFLOPs |", "|---|---|---|---|---|"]
    for path in sorted(Path(recipes_dir).glob(f"{prefix}*.yaml")):
        if not path.stem.endswith("_from_pretrained"):  # not the paper's runs from scratch: README "Start from a ..."
            r = load_recipe(path)
            rows.append(f"| `recipes/{path.name}` | {r.sparsity.method} | {100 * r.sparsity.target:g}% | "
                        f"{_fmt(r.expected.top1)} | {_fmt(r.expected.mflops, 0)} |")
    return "\n".join(rows) + "\n"


def run_table(runs: Mapping[str, Union[str, Path]]) -> str:
    """One row per start / final evaluation of each run's ``metrics.jsonl``, in the order given."""
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


if __name__ == "__main__":
    what, args = (sys.argv[1:2] or ["recipes"])[0], sys.argv[2:]
    sys.stdout.write(recipe_table(args[0] if args else "recipes") if what == "recipes"
                     else run_table(dict(a.split("=", 1) for a in args)))
