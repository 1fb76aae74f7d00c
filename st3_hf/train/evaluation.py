"""Evaluation with the `evaluate` library: top-1 / top-5 accuracy and loss.

Problems the user can fix (an empty evaluation set, a model whose classes or
input channels do not fit the recipe's data) are :class:`~st3_hf.errors.St3Error`
subclasses with one-line messages, checked before any batch runs.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from st3_hf.train.data.sources import UNREADABLE_LABEL
from st3_hf.errors import ConfigError, DataError

TOPK_METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "topk_accuracy")  # local: no Hub access


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    accelerator,
    *,
    gather: bool = True,
    max_batches: Optional[int] = None,
    show_progress: bool = True,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``loader``.

    With ``gather`` the loader is sharded across processes (accelerate-prepared)
    and results are gathered with ``gather_for_metrics``; without it every
    process evaluates the whole loader and computes the same numbers.
    """
    import evaluate

    metric = evaluate.load(TOPK_METRIC_PATH)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    skipped = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    # a bar on a terminal only: in a log file its carriage-return updates are noise
    show = show_progress and accelerator.is_main_process and sys.stderr.isatty()
    bar = tqdm(total=total, desc="eval", leave=False, disable=not show)
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        _check_labels(labels, logits.shape[1])
        k = min(5, logits.shape[1])
        ranked = logits.topk(k, dim=1).indices
        losses = F.cross_entropy(logits, labels, reduction="none", ignore_index=UNREADABLE_LABEL)
        if gather:
            ranked, labels, losses = accelerator.gather_for_metrics((ranked, labels, losses))
        # unreadable images (st3_hf.train.data) are left out: the scores are over the images really evaluated
        readable = labels != UNREADABLE_LABEL
        skipped += int((~readable).sum())
        ranked, labels, losses = ranked[readable], labels[readable], losses[readable]
        loss_sum += losses.double().sum()
        count += labels.numel()
        if labels.numel():
            metric.add_batch(predictions=ranked.cpu().tolist(), references=labels.cpu().tolist())
        bar.update(1)
    bar.close()
    model.train(was_training)
    if count == 0:
        raise DataError(
            "the evaluation loader is empty (no batch, or max_batches=0): check the recipe's eval split and eval_subset"
        )
    ks = [1, 5] if k >= 5 else [1, k]
    scores = metric.compute(k=ks)
    return {
        "top1": scores["top1"],
        "top5": scores.get("top5", scores.get(f"top{k}")),
        "loss": float(loss_sum) / count,
        "num_examples": count,
        "skipped_examples": skipped,
    }


def _check_labels(labels: torch.Tensor, num_outputs: int) -> None:
    """A label the model has no output for is a data / model mismatch, not an index error inside cross_entropy."""
    if labels.numel() and int(labels.max()) >= num_outputs:
        raise DataError(
            f"the evaluation data has label {int(labels.max())} but the model has only {num_outputs} outputs: "
            "evaluate with the data the model was trained on (recipe data section / model.num_classes)"
        )


def evaluate_sparse_model(name_or_path: str, recipe) -> Dict[str, object]:
    """Load a sparse model with :func:`st3_hf.from_pretrained` and evaluate it on ``recipe.data``'s eval split.

    Uses the same evaluation loader as training (timm's eval transform), so an
    exported model reproduces the numbers of its model card.

    >>> from st3_hf.train.recipe import load_recipe
    >>> evaluate_sparse_model("outputs/quickstart", load_recipe("outputs/quickstart/recipe.yaml"))  # doctest: +SKIP
    """
    from accelerate import Accelerator

    from st3_hf.train.data import build_dataloaders
    from st3_hf.sparse.macs import count_macs
    from st3_hf.train.run_export import from_pretrained
    model, sparsifier = from_pretrained(name_or_path)  # first: a bad model fails before any data is read
    check_model_fits_data(model, recipe, str(name_or_path))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe.training.mixed_precision)
    if not sparsifier.frozen:
        sparsifier.freeze()
    _, eval_loader = build_dataloaders(recipe.data, recipe.training.seed)
    model, eval_loader = accelerator.prepare(model, eval_loader)
    scores = evaluate_model(model, eval_loader, accelerator, max_batches=recipe.evaluation.max_batches)
    macs = count_macs(accelerator.unwrap_model(model), list(recipe.data.input_size))
    return {
        "model": str(name_or_path),
        "top1": scores["top1"],
        "top5": scores["top5"],
        "loss": scores["loss"],
        "num_examples": scores["num_examples"],
        "skipped_examples": scores["skipped_examples"],
        "sparsity": sparsifier.sparsity(),
        "sparsity_all_params": sparsifier.sparsity_of_all_parameters(),
        "dense_mflops": macs.dense_mflops,
        "sparse_mflops": macs.sparse_mflops,
    }


def check_model_fits_data(model: nn.Module, recipe: Any, name: str) -> None:
    """Raise :class:`~st3_hf.errors.ConfigError` when the model's classes or input channels differ from the recipe's.

    Without it a mismatch surfaces mid-evaluation as an index error deep in
    ``cross_entropy`` or a conv shape error.
    """
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and int(num_classes) != int(recipe.model.num_classes):
        raise ConfigError(
            f"model {name} has {num_classes} classes but the recipe's data has {recipe.model.num_classes} "
            "(model.num_classes): pass the recipe the model was trained with (--recipe)"
        )
    channels = int(recipe.data.input_size[0])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != channels:
        raise ConfigError(
            f"model {name} takes {first_conv.in_channels}-channel images but the recipe's data.input_size "
            f"{list(recipe.data.input_size)} has {channels}: pass the recipe the model was trained with (--recipe)"
        )
