"""The table of shipped recipes in docs/recipes.md, generated from the recipe files themselves."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from st3_hf.train.recipe import load_recipe


def _fmt(value: Optional[float], digits: int = 2) -> str:
    text = "—" if value is None else f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def recipe_table(recipes_dir: Path | str, prefix: str = "r50_") -> str:
    """Markdown table: recipe file, method, target sparsity and the paper's expected top-1 / MFLOPs."""
    rows = ["| recipe | method | target sparsity | paper top-1 % | paper MFLOPs |", "|---|---|---|---|---|"]
    for path in sorted(Path(recipes_dir).glob(f"{prefix}*.yaml")):
        if not path.stem.endswith("_from_pretrained"):  # not the paper's runs from scratch: README "Start from a ..."
            r = load_recipe(path)
            rows.append(f"| `recipes/{path.name}` | {r.sparsity.method} | {100 * r.sparsity.target:g}% | "
                        f"{_fmt(r.expected.top1)} | {_fmt(r.expected.mflops, 0)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(recipe_table(sys.argv[1] if len(sys.argv) > 1 else "recipes"))
