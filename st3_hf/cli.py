"""Command-line entry points (``scripts/*.py`` are thin wrappers around these)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .recipe_schema import Recipe


def report_error(err: BaseException) -> int:
    """Print a user-fixable error as one ``error: ...`` line on stderr; return the exit code to use."""
    message = " ".join(str(err).split("\n"))
    print(f"error: {message}", file=sys.stderr)
    return int(getattr(err, "exit_code", 2))


def _load_recipe_or_report(path: str, overrides: List[str]) -> Optional["Recipe"]:
    """The resolved recipe, or None after printing why it cannot be used (exit code 2 follows)."""
    from .recipe import RecipeError, load_recipe

    try:
        return load_recipe(path, overrides)
    except (RecipeError, FileNotFoundError) as err:
        report_error(err)
        return None


def train_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/train.py RECIPE [key=value ...] [--print-config]``."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train (or fine-tune) a sparse timm model from a recipe. "
        "Launch with `accelerate launch scripts/train.py RECIPE` for multi-GPU / multi-node / DeepSpeed.",
    )
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/r50_st3_98.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=20")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    args = parser.parse_args(argv)

    recipe = _load_recipe_or_report(args.recipe, args.overrides)
    if recipe is None:
        return 2
    if args.print_config:
        from .recipe import recipe_to_yaml

        sys.stdout.write(recipe_to_yaml(recipe))
        return 0
    from .trainer import Trainer

    from .errors import St3Error

    try:
        Trainer(recipe, recipe_path=args.recipe).train()
    except St3Error as err:  # bad model name, data, output folder, checkpoint, token; a diverged run
        return report_error(err)
    return 0


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/evaluate_model.py MODEL [--recipe R] [key=value ...]``: top-1/top-5/loss, sparsity, MFLOPs as JSON."""
    parser = argparse.ArgumentParser(
        prog="evaluate_model.py",
        description="Evaluate a sparse model (exported folder, Hub repo id or training checkpoint) on a recipe's "
        "evaluation data; prints one JSON object.",
    )
    parser.add_argument("model", help="exported folder, Hub repo id (ORG/NAME) or training checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe, e.g. data.root=/data/imagenet")
    parser.add_argument("--recipe", help="recipe whose data section is used (default: the model folder's recipe.yaml)")
    args = parser.parse_args(argv)

    import json
    from pathlib import Path

    recipe_path = args.recipe or str(Path(args.model) / "recipe.yaml")
    if not Path(recipe_path).is_file():
        print(f"error: no recipe: pass --recipe (looked for {recipe_path})", file=sys.stderr)
        return 2
    recipe = _load_recipe_or_report(recipe_path, args.overrides)
    if recipe is None:
        return 2
    from .errors import St3Error
    from .evaluation import evaluate_sparse_model

    try:
        scores = evaluate_sparse_model(args.model, recipe)
    except St3Error as err:  # missing/corrupt model, not an st3_hf or timm model, bad data
        return report_error(err)
    print(json.dumps(scores, indent=1, sort_keys=True))
    return 0
