"""Command-line entry points (``scripts/*.py`` are thin wrappers around these)."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, List, Optional


def report_error(err: BaseException) -> int:
    """Print a user-fixable error as one ``error: ...`` line on stderr; return the exit code to use."""
    from st3_hf.errors import one_line

    print(f"error: {one_line(str(err))}", file=sys.stderr)
    return int(getattr(err, "exit_code", 2))


def _reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """An entry point whose :class:`~st3_hf.errors.St3Error` (bad recipe, model, data, folder, token...) is
    printed as one line with its exit code instead of a traceback; any other exception is a bug and keeps it."""

    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        from st3_hf.errors import St3Error

        try:
            return main(argv)
        except St3Error as err:
            return report_error(err)

    return wrapper


@_reports_errors
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
    args = parser.parse_intermixed_args(argv)  # flags anywhere: RECIPE --print-config key=value

    from st3_hf.train.recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        from st3_hf.train.preflight import check_model_name
        from st3_hf.train.recipe import recipe_to_yaml
        if not recipe.model.init_from:  # the printed recipe must be one that can start
            check_model_name(recipe.model.name)

        sys.stdout.write(recipe_to_yaml(recipe))
        return 0
    from st3_hf.train.trainer import Trainer
    Trainer(recipe, recipe_path=args.recipe).train()
    return 0


@_reports_errors
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
    args = parser.parse_intermixed_args(argv)  # flags anywhere: MODEL --recipe R key=value

    import contextlib
    import json
    from pathlib import Path

    from st3_hf.errors import ConfigError
    from st3_hf.train.evaluation import evaluate_sparse_model
    from st3_hf.train.recipe import load_recipe
    _check_model_argument(args.model)
    recipe_path = args.recipe or str(Path(args.model) / "recipe.yaml")
    if not Path(recipe_path).is_file():
        raise ConfigError(f"no recipe: pass --recipe (looked for {recipe_path})")
    # stdout carries the JSON alone (users pipe it): libraries that log to stdout on import
    # (DeepSpeed's accelerator detection does) are sent to stderr while the model is evaluated
    with contextlib.redirect_stdout(sys.stderr):
        scores = evaluate_sparse_model(args.model, load_recipe(recipe_path, args.overrides))
    print(json.dumps(scores, indent=1, sort_keys=True))
    return 0


def _check_model_argument(model: str) -> None:
    """A missing path or a folder that holds no model is said as such (before any recipe is looked for)."""
    from pathlib import Path

    from st3_hf.errors import ConfigError
    from st3_hf.train.init_source import is_hub_id
    path = Path(model)
    if not path.exists():
        if is_hub_id(model):
            return  # ORG/NAME: from_pretrained asks the Hub (or its cache)
        raise ConfigError(f"model {model} not found: no such folder, nor a valid Hub repo id (ORG/NAME); "
                          f"pass an exported folder or a training checkpoint")
    weights = ("model.safetensors", "model.sparse.safetensors")
    if not path.is_dir() or not any((path / name).is_file() for name in weights):
        raise ConfigError(f"{model} is not a model folder (no model.safetensors or model.sparse.safetensors): "
                          f"pass an exported folder or a training checkpoint")


@_reports_errors
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

    from st3_hf.train.run_export import export_checkpoint
    folder = export_checkpoint(
        args.checkpoint_dir,
        args.output_dir,
        metrics=_parse_metrics(args.metrics),
        metrics_file=args.metrics_file,
        repo_id=args.repo_id,
        base_model=args.base_model,
        dataset_name=args.dataset_name,
    )
    print(f"exported to {folder}")
    return 0


def _parse_metrics(text: Optional[str]) -> Optional[dict]:
    """``--metrics`` as a dict, or an :class:`~st3_hf.hub.errors.ExportError` saying what is wrong with it."""
    import json

    from st3_hf.hub.errors import ExportError

    if not text:
        return None
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"--metrics is not valid JSON ({e.msg} at character {e.pos}): pass e.g. '{{\"top1\": 0.761}}'") from e
    if not isinstance(metrics, dict):
        raise ExportError(f"--metrics must be a JSON object such as '{{\"top1\": 0.761}}', got {text!r}")
    return metrics


@_reports_errors
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

    from st3_hf.hub.push import DEFAULT_COMMIT_MESSAGE, push_folder

    url = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
    )
    print(f"pushed to {url}")
    return 0
