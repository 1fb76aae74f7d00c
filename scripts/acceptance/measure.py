"""Figures the acceptance parts read off what a run leaves behind: whole-loop images/s from its
``metrics.jsonl``, loader-only images/s, the host profile of a run, and the zeros of an export.

``python -m acceptance.measure loader RECIPE [key=value ...] --batches 40`` prints one JSON
object: the images/s of the recipe's training DataLoader alone (no model), with its workers.
"""
from __future__ import annotations

import argparse
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


def loop_throughput(records: Sequence[Dict[str, Any]], global_batch: int, skip_steps: int) -> Dict[str, Any]:
    """Images/s of the whole training loop between the first ``train`` record at or after ``skip_steps``
    (warm-up: cuDNN autotuning, allocator growth, worker start) and the last one.

    The trainer stamps every ``train`` record with ``elapsed_s`` (wall time since the run began), so
    the figure includes data loading, the sparsifier update, the non-finite guard and logging.
    """
    train = [r for r in records if r.get("kind") == "train" and r.get("step", 0) >= skip_steps]
    if len(train) < 2:
        raise ValueError(f"need two 'train' records at or after step {skip_steps}, found {len(train)}: "
                         "lower skip_steps or training.log_every_steps")
    first, last = train[0], train[-1]
    steps = last["step"] - first["step"]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    if steps <= 0 or seconds <= 0:
        raise ValueError("train records do not advance in step and time")
    return {"images_per_s": steps * global_batch / seconds, "step_ms": 1e3 * seconds / steps,
            "from_step": first["step"], "to_step": last["step"], "seconds": seconds}


def loader_throughput(recipe_path: str, overrides: Sequence[str], batches: int, warmup: int = 3) -> Dict[str, Any]:
    """Images/s of the recipe's training DataLoader alone (decode + augmentation in its workers), after
    ``warmup`` batches that absorb worker start-up."""
    from st3_hf.train.data.loaders import build_dataloaders
    from st3_hf.train.recipe import load_recipe
    recipe = load_recipe(recipe_path, overrides)
    train_loader, _ = build_dataloaders(recipe.data, recipe.training.seed)
    if len(train_loader) < warmup + batches:
        raise ValueError(f"the loader gives {len(train_loader)} batches, fewer than warmup + batches = {warmup + batches}")
    it = iter(train_loader)
    for _ in range(warmup):
        next(it)
    began = time.perf_counter()
    images = 0
    for _ in range(batches):
        x, _ = next(it)
        images += x.shape[0]
    seconds = time.perf_counter() - began
    return {"images_per_s": images / seconds, "batches": batches, "batch_size": recipe.data.batch_size,
            "num_workers": recipe.data.num_workers, "seconds": seconds}


# (label, file suffix, function name): host-side functions whose cumulative time says where a step goes
PROFILE_FUNCTIONS: Tuple[Tuple[str, str, str], ...] = (
    ("data loader wait", "torch/utils/data/dataloader.py", "__next__"),
    ("module calls (forward; evaluation included)", "torch/nn/modules/module.py", "_call_impl"),
    ("backward", "accelerate/accelerator.py", "backward"),
    ("gradient clipping (norm)", "accelerate/accelerator.py", "clip_grad_norm_"),
    ("non-finite guard (host sync)", "st3_hf/train/nonfinite.py", "update_is_finite"),
    ("optimizer step (sparsifier hook included)", "accelerate/optimizer.py", "step"),
    ("sparsifier update", "st3_hf/sparse/sparsifier.py", "step"),
    ("evaluation", "st3_hf/train/evaluation.py", "evaluate_model"),
    ("checkpoint", "st3_hf/train/checkpointing.py", "save"),
    ("export", "st3_hf/train/trainer.py", "_export"),
)


def profile_summary(profile_path: Path | str, train_steps: int, top: int = 30) -> Tuple[Dict[str, Any], str]:
    """Cumulative host seconds (and ms per training step) of :data:`PROFILE_FUNCTIONS` in a cProfile dump,
    plus the top ``top`` functions by cumulative time as text.

    Device work is asynchronous: GPU time shows up in the host function that waits for it (the
    guard's host sync, a ``.item()``), which is itself the finding when that wait is large.
    """
    stats = pstats.Stats(str(profile_path))
    found: Dict[str, Dict[str, float]] = {}
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        path = filename.replace("\\", "/")
        for label, suffix, function in PROFILE_FUNCTIONS:
            if name == function and path.endswith(suffix):
                entry = found.setdefault(label, {"seconds": 0.0})
                entry["seconds"] += cumulative
    for entry in found.values():
        entry["ms_per_step"] = 1e3 * entry["seconds"] / max(train_steps, 1)
    import io

    buf = io.StringIO()
    # the run's own code paths, not the one-off imports that dominate a short run's cumulative list
    pstats.Stats(str(profile_path), stream=buf).sort_stats("cumulative").print_stats(
        r"st3_hf/|accelerate/|torch/utils/data/|torch/autograd/|torch/optim/", top)
    return {"train_steps": train_steps, "functions": found,
            "total_s": getattr(stats, "total_tt", None)}, buf.getvalue()


def export_zero_fraction(folder: Path | str) -> Dict[str, Any]:
    """Load an export with plain timm (``local-dir:``, no st3_hf code involved) and count the zeros of its
    Conv2d/Linear weights: what a user who downloads the model gets."""
    import timm
    import torch.nn as nn

    model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True)
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return {"zero_fraction": zeros / total, "weights": total, "architecture": type(model).__name__}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m acceptance.measure")
    sub = p.add_subparsers(dest="what", required=True)
    loader = sub.add_parser("loader", help="images/s of a recipe's training DataLoader alone")
    loader.add_argument("recipe")
    loader.add_argument("overrides", nargs="*")
    loader.add_argument("--batches", type=int, default=40)
    loader.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    result = loader_throughput(args.recipe, args.overrides, args.batches, args.warmup)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
