"""Evaluation with the `evaluate` library: top-1 / top-5 accuracy and loss, in training and of any export, and
``evaluate_model.py --sparse-inference``: the same evaluation run dense and with :func:`st3_hf.sparse_inference`."""
from __future__ import annotations

import itertools
import os
import sys
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from st3_hf.errors import ConfigError, DataError
from st3_hf.sparse.macs import count_macs
from st3_hf.train.data.loaders import build_dataloaders
from st3_hf.train.data.sources import UNREADABLE_LABEL, check_num_classes

TOPK_METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "topk_accuracy")  # local: no Hub access


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, accelerator, *, gather: bool = True,
                   max_batches: Optional[int] = None, show_progress: bool = True) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``loader``. With ``gather`` the
    loader is sharded across processes (accelerate-prepared) and results are gathered with ``gather_for_metrics``;
    without it every process evaluates the whole loader."""
    import evaluate
    metric = evaluate.load(TOPK_METRIC_PATH)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = skipped = nonfinite = k = 0
    # a bar on a terminal only: in a log file its carriage-return updates are noise
    show = show_progress and accelerator.is_main_process and sys.stderr.isatty()
    total = len(loader) if hasattr(loader, "__len__") else None  # the bar's length, as the cut below gives it
    total = total if total is None or max_batches is None else min(total, max_batches)
    for images, labels in tqdm(itertools.islice(loader, max_batches), total=total, desc="eval", leave=False, disable=not show):
        with accelerator.autocast():
            logits = model(images).float()
        k = min(5, logits.shape[1])
        ranked = logits.topk(k, dim=1).indices
        losses = F.cross_entropy(logits, labels, reduction="none", ignore_index=UNREADABLE_LABEL)
        # NaN logits still rank: their top-1 would look like a score (int: gathered by every backend)
        finite = torch.isfinite(logits).all(dim=1).int()
        if gather:
            ranked, labels, losses, finite = accelerator.gather_for_metrics((ranked, labels, losses, finite))
        # unreadable images (st3_hf.train.data) are left out: the scores are over the images really evaluated
        readable = labels != UNREADABLE_LABEL
        skipped += int((~readable).sum())
        nonfinite += int((readable & (finite == 0)).sum())
        loss_sum += losses[readable].double().sum()
        count += int(readable.sum())
        if readable.any():
            metric.add_batch(predictions=ranked[readable].tolist(), references=labels[readable].tolist())
    model.train(was_training)
    if count == 0:
        raise DataError("the evaluation loader is empty: check the recipe's eval split and eval_subset")
    scores = metric.compute(k=[1, k])
    return {"top1": scores["top1"], "top5": scores[f"top{k}"], "loss": float(loss_sum) / count,
            "num_examples": count, "skipped_examples": skipped, "nonfinite_examples": nonfinite}


def model_figures(model: nn.Module, sparsifier: Any, input_size) -> Dict[str, float]:
    """Sparsity over the prunable weights and over every parameter, and dense / sparse MFLOPs of one image."""
    macs = count_macs(model, list(input_size))
    return {"sparsity": sparsifier.sparsity(), "sparsity_all_params": sparsifier.sparsity_of_all_parameters(),
            "dense_mflops": macs.dense_mflops, "sparse_mflops": macs.sparse_mflops}


def without_nonfinite_scores(scores: Dict[str, object]) -> Dict[str, object]:
    """``scores`` with top-1 / top-5 / loss null when some outputs were NaN/inf: no score is measured from
    them (NaN logits still rank), and NaN is not JSON."""
    return dict(scores, top1=None, top5=None, loss=None) if scores["nonfinite_examples"] else scores


def evaluate_sparse_model(name_or_path: str, recipe) -> Dict[str, object]:
    """Load a sparse model with :func:`st3_hf.from_pretrained` and evaluate it on ``recipe.data``'s eval split,
    with the training's evaluation loader (timm's eval transform): an export reproduces its card's numbers.

    >>> from st3_hf.train.recipe import load_recipe
    >>> evaluate_sparse_model("outputs/quickstart", load_recipe("outputs/quickstart/recipe.yaml"))  # doctest: +SKIP
    """
    from accelerate import Accelerator
    model, sparsifier = _load_checked(name_or_path, recipe)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe.training.mixed_precision)
    model, eval_loader = accelerator.prepare(model, build_dataloaders(recipe.data, recipe.training.seed)[1])
    scores = evaluate_model(model, eval_loader, accelerator, max_batches=recipe.evaluation.max_batches)
    return {"model": str(name_or_path), **without_nonfinite_scores(scores), "outputs_finite": not scores["nonfinite_examples"],
            **model_figures(accelerator.unwrap_model(model), sparsifier, recipe.data.input_size)}


def _load_checked(name: str, recipe) -> Tuple[nn.Module, Any]:
    """The model and its sparsifier (masks frozen), checked against the recipe before any image is read: a
    :class:`~st3_hf.errors.ConfigError` when its classes or input channels differ from the recipe's (else an index
    error deep in ``cross_entropy`` or a conv shape error mid-evaluation)."""
    from st3_hf.hub import from_pretrained
    model, sparsifier = from_pretrained(name)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and int(num_classes) != int(recipe.model.num_classes):
        raise ConfigError(f"model {name} has {num_classes} classes but the recipe's data has "
                          f"{recipe.model.num_classes} (model.num_classes): pass the recipe the model was trained with (--recipe)")
    channels = int(recipe.data.input_size[0])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != channels:
        raise ConfigError(f"model {name} takes {first_conv.in_channels}-channel images but the recipe's "
                          f"data.input_size {list(recipe.data.input_size)} has {channels}: pass the recipe the model was trained with "
                          "(--recipe)")
    check_num_classes(recipe.data, recipe.model.num_classes)
    if not sparsifier.frozen:
        sparsifier.freeze()
    return model, sparsifier


class _TimedForward(nn.Module):
    """Counts the seconds and images that go through ``model``'s forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seconds, self.images = model, 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - start
        self.images += x.shape[0]
        return out


def evaluate_with_sparse_inference(name_or_path: str, recipe) -> Dict[str, object]:
    """Top-1 / top-5 / loss and images/s of the model run dense and with sparse kernels, on the recipe's eval
    data: both float32 on the CPU with the same thread count, images/s over the forward time only (not data
    loading), so the two figures compare the kernels."""
    from accelerate import Accelerator
    from st3_hf.inference import sparse_inference
    model = _load_checked(name_or_path, recipe)[0].cpu().float()
    model.eval()
    accelerator = Accelerator(cpu=True)  # float32 on the CPU: what the sparse kernels run
    eval_loader = build_dataloaders(recipe.data, recipe.training.seed)[1]
    example = next(iter(eval_loader))[0].float()
    # the dense baseline runs plain F.conv2d / F.linear on the effective weights, as timm does on an export
    runs = {"dense": sparse_inference(model, example, force="dense"), "sparse_inference": sparse_inference(model, example)}
    out: Dict[str, Any] = {"model": str(name_or_path), "threads": torch.get_num_threads(), "dtype": "float32"}
    for name, runnable in runs.items():
        timed = _TimedForward(runnable)
        scores = evaluate_model(timed, eval_loader, accelerator, gather=False, max_batches=recipe.evaluation.max_batches)
        out[name] = {**without_nonfinite_scores(scores), "images_per_s": timed.images / timed.seconds}
    dense, plan = out["dense"], runs["sparse_inference"].summary()
    return {**out, "outputs_finite": not dense["nonfinite_examples"], "nonfinite_examples": dense["nonfinite_examples"],
            "num_examples": dense["num_examples"], "sparse_layers": plan["sparse_layers"], "dense_layers": plan["dense_layers"],
            "speedup_over_dense": out["sparse_inference"]["images_per_s"] / dense["images_per_s"]}
