"""Command-line entry points (``scripts/*.py`` are thin wrappers around these)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .recipe_schema import Recipe


def report_error(err: BaseException) -> int:
    """Print a user-fixable error as one ``error: ...`` line on stderr; return the exit code to use."""
    from .errors import one_line

    print(f"error: {one_line(str(err))}", file=sys.stderr)
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


def export_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/export.py CHECKPOINT --output-dir DIR``: a training checkpoint as a Hub folder."""
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export a training checkpoint as a Hugging Face Hub folder (timm format + compact sparse copy + "
        "card). Crash-safe: the output folder keeps its previous export until the new one is complete.",
    )
    parser.add_argument("checkpoint_dir", help="training checkpoint folder (model.safetensors, sparsifier.json/.safetensors, recipe.yaml)")
    parser.add_argument("--output-dir", required=True, help="folder to write the Hub export into")
    parser.add_argument("--metrics-file", default=None, help="metrics.jsonl of the run (top-1/top-5 as fractions); copied and used in the card")
    parser.add_argument("--metrics", default=None, help='measured metrics as JSON, e.g. \'{"top1": 0.761, "top5": 0.929}\' (fractions) (wins over --metrics-file)')
    parser.add_argument("--repo-id", default=None, help="ORG/NAME for the card's usage snippets (default: the recipe's hub.repo_id)")
    parser.add_argument("--base-model", default=None, help="Hub id of the model this one was fine-tuned from")
    parser.add_argument("--dataset-name", default=None, help="Hub dataset id for the card metadata")
    args = parser.parse_args(argv)

    from .errors import St3Error
    from .hub.export import export_checkpoint

    try:
        folder = export_checkpoint(
            args.checkpoint_dir,
            args.output_dir,
            metrics=_parse_metrics(args.metrics),
            metrics_file=args.metrics_file,
            repo_id=args.repo_id,
            base_model=args.base_model,
            dataset_name=args.dataset_name,
        )
    except St3Error as err:
        return report_error(err)
    print(f"exported to {folder}")
    return 0


def _parse_metrics(text: Optional[str]) -> Optional[dict]:
    """``--metrics`` as a dict, or an :class:`~st3_hf.hub.errors.ExportError` saying what is wrong with it."""
    import json

    from .hub.errors import ExportError

    if not text:
        return None
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"--metrics is not valid JSON ({e.msg} at character {e.pos}): pass e.g. '{{\"top1\": 0.761}}'") from e
    if not isinstance(metrics, dict):
        raise ExportError(f"--metrics must be a JSON object such as '{{\"top1\": 0.761}}', got {text!r}")
    return metrics


def push_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/push_to_hub.py FOLDER --repo-id ORG/NAME``: upload an export (token and repo id checked first)."""
    parser = argparse.ArgumentParser(
        prog="push_to_hub.py",
        description="Upload an exported folder to the Hugging Face Hub. Needs a token: HF_TOKEN, or `hf auth login` once.",
    )
    parser.add_argument("folder", help="exported folder (config.json, model.safetensors, README.md, ...)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit-message", default=None)
    args = parser.parse_args(argv)

    from .errors import St3Error
    from .hub.push import DEFAULT_COMMIT_MESSAGE, push_folder

    try:
        url = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except St3Error as err:
        return report_error(err)
    print(f"pushed to {url}")
    return 0
