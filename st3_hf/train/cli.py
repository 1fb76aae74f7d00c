"""Command-line entry points (``scripts/*.py`` are thin wrappers around these)."""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

from st3_hf.errors import ConfigError, ModelError, St3Error, one_line


def _reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """An entry point whose :class:`~st3_hf.errors.St3Error` (bad recipe, model, data, folder, token...) is one
    ``error: ...`` line on stderr and its exit code; any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        try:
            return main(argv)
        except St3Error as err:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            return int(err.exit_code)

    return wrapper


@_reports_errors
def train_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/train.py RECIPE [key=value ...] [--print-config]``."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train (or fine-tune) a sparse timm model from a "
                                     "recipe. Launch with `accelerate launch scripts/train.py RECIPE` for multi-GPU / "
                                     "multi-node / DeepSpeed.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/r50_st3_98.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=20")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    args = parser.parse_intermixed_args(argv)  # flags anywhere: RECIPE --print-config key=value

    from st3_hf.train.modeling import check_model_name
    from st3_hf.train.recipe import load_recipe, recipe_to_yaml
    from st3_hf.train.resume_guard import describe_overrides
    # the card, config.json and recipe.yaml must not call an overridden run by the file's name
    recipe = describe_overrides(load_recipe(args.recipe, args.overrides), load_recipe(args.recipe))
    if args.print_config:
        if not recipe.model.init_from:  # the printed recipe must be one that can start
            check_model_name(recipe.model.name)
        sys.stdout.write(recipe_to_yaml(recipe))
    else:
        from st3_hf.train.trainer import Trainer
        Trainer(recipe).train()
        # the run's objects hold reference cycles (hooks, sharded tensors and, through them, the process group): free
        # them while the interpreter is whole; a gloo group destroyed during interpreter shutdown can abort the process
        gc.collect()
    return 0


@_reports_errors
def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/evaluate_model.py MODEL [--recipe R] [key=value ...]``: top-1/top-5/loss, sparsity, MFLOPs as JSON."""
    parser = argparse.ArgumentParser(prog="evaluate_model.py", description="Evaluate a sparse model (exported folder,"
                                     " Hub repo id or training checkpoint) on a recipe's evaluation data; prints one "
                                     "JSON object.")
    parser.add_argument("model", help="exported folder, Hub repo id (ORG/NAME) or training checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe, e.g. data.root=/data")
    parser.add_argument("--recipe", help="recipe whose data section is used (default: the model folder's recipe.yaml)")
    parser.add_argument("--sparse-inference", action="store_true", help="evaluate on the CPU twice, dense and with "
                        "st3_hf.sparse_inference's sparse kernels: the same scores, and images/s of each")
    args = parser.parse_intermixed_args(argv)  # flags anywhere: MODEL --recipe R key=value

    from st3_hf.train.evaluation import evaluate_sparse_model, evaluate_with_sparse_inference
    from st3_hf.train.init_source import is_hub_id
    from st3_hf.train.recipe import load_recipe
    # a missing path or a folder that holds no model is said as such, before any recipe is looked for
    path = Path(args.model)
    if not path.exists() and not is_hub_id(args.model):  # ORG/NAME: from_pretrained asks the Hub (or its cache)
        raise ConfigError(f"model {args.model} not found: no such folder, nor a valid Hub repo id (ORG/NAME); "
                          f"pass an exported folder or a training checkpoint")
    if path.exists() and not any((path / name).is_file() for name in ("model.safetensors", "model.sparse.safetensors")):
        raise ConfigError(f"{args.model} is not a model folder (no model.safetensors or model.sparse.safetensors): "
                          f"pass an exported folder or a training checkpoint")
    recipe_path = args.recipe or str(path / "recipe.yaml")
    if not Path(recipe_path).is_file():
        raise ConfigError(f"no recipe: pass --recipe (looked for {recipe_path})")
    # stdout carries the JSON alone (users pipe it): libraries that log to stdout on import
    # (DeepSpeed's accelerator detection does) are sent to stderr while the model is evaluated
    with contextlib.redirect_stdout(sys.stderr):
        scores = (evaluate_with_sparse_inference if args.sparse_inference else evaluate_sparse_model)(
            args.model, load_recipe(recipe_path, args.overrides))
    print(json.dumps(scores, indent=1, sort_keys=True, allow_nan=False))
    if not scores["outputs_finite"]:
        raise ModelError(f"model {args.model} produces non-finite outputs (NaN/inf) for "
                         f"{scores['nonfinite_examples']} of {scores['num_examples']} evaluation images: its "
                         "weights or statistics hold NaN/inf (a diverged run?); top1, top5 and loss are null")
    return 0


@_reports_errors
def export_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/export.py CHECKPOINT --output-dir DIR``: a training checkpoint as a Hub folder."""
    parser = argparse.ArgumentParser(prog="export.py", description="Export a training checkpoint as a Hugging Face "
                                     "Hub folder (timm format + compact sparse copy + card). Crash-safe: the output "
                                     "folder keeps its previous export until the new one is complete.")
    parser.add_argument("checkpoint_dir", help="training checkpoint folder (weights, sparsifier state, recipe.yaml)")
    parser.add_argument("--output-dir", required=True, help="folder to write the Hub export into")
    parser.add_argument("--metrics-file", help="metrics.jsonl of the run (copied; top-1/5 in the card)")
    parser.add_argument("--metrics", help='measured metrics (fractions) as JSON, e.g. \'{"top1": 0.761}\' (wins over --metrics-file)')
    parser.add_argument("--repo-id", help="ORG/NAME in the card's snippets (default: hub.repo_id)")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from")
    parser.add_argument("--dataset-name", help="Hub dataset id for the card metadata")
    args = parser.parse_args(argv)

    from st3_hf.train.run_export import export_checkpoint
    try:
        metrics = json.loads(args.metrics) if args.metrics else None
    except json.JSONDecodeError as e:
        raise ModelError(f"--metrics is not valid JSON ({e.msg} at character {e.pos}): pass e.g. "
                         "'{\"top1\": 0.761}'") from e
    if metrics is not None and not isinstance(metrics, dict):
        raise ModelError(f"--metrics must be a JSON object such as '{{\"top1\": 0.761}}', got {args.metrics!r}")
    folder = export_checkpoint(args.checkpoint_dir, args.output_dir, metrics=metrics, metrics_file=args.metrics_file,
                               repo_id=args.repo_id, base_model=args.base_model, dataset_name=args.dataset_name)
    print(f"exported to {folder}")
    return 0


@_reports_errors
def push_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/push_to_hub.py FOLDER --repo-id ORG/NAME``: upload an export (token and repo id checked first)."""
    parser = argparse.ArgumentParser(prog="push_to_hub.py", description="Upload an exported folder to the Hugging "
                                     "Face Hub. Needs a token: HF_TOKEN, or `hf auth login` once.")
    parser.add_argument("folder", help="exported folder (config.json, model.safetensors, README.md, ...)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit-message")
    args = parser.parse_args(argv)

    from st3_hf.hub.push import DEFAULT_COMMIT_MESSAGE, push_folder
    url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE)
    print(f"pushed to {url}")
    return 0
