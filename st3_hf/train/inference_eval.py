"""``evaluate_model.py --sparse-inference``: the same evaluation run dense and with :func:`st3_hf.sparse_inference`.

Both runs are float32 on the CPU with the same torch thread count; images/s counts the model's forward time only
(not data loading), so the two figures compare the kernels.
"""
from __future__ import annotations

import time
from typing import Dict

import torch
import torch.nn as nn

from st3_hf.inference import sparse_inference
from st3_hf.train.evaluation import check_model_fits_data, evaluate_model, without_nonfinite_scores


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
    """Top-1 / top-5 / loss and images/s of the model run dense and with sparse kernels, on the recipe's eval data."""
    from accelerate import Accelerator

    from st3_hf.train.data import build_dataloaders
    from st3_hf.train.data.sources import check_num_classes
    from st3_hf.hub import from_pretrained
    model, sparsifier = from_pretrained(name_or_path)
    check_model_fits_data(model, recipe, str(name_or_path))
    check_num_classes(recipe.data, recipe.model.num_classes)
    if not sparsifier.frozen:
        sparsifier.freeze()
    model = model.cpu().float()
    model.eval()
    accelerator = Accelerator(cpu=True)  # float32 on the CPU: what the sparse kernels run
    eval_loader = build_dataloaders(recipe.data, recipe.training.seed)[1]
    example = next(iter(eval_loader))[0].float()
    # the dense baseline runs plain F.conv2d / F.linear on the effective weights, as timm does on an export
    runs = {"dense": sparse_inference(model, example, force="dense"), "sparse_inference": sparse_inference(model, example)}
    out: Dict[str, object] = {"model": str(name_or_path), "threads": torch.get_num_threads(), "dtype": "float32"}
    for name, runnable in runs.items():
        timed = _TimedForward(runnable)
        scores = evaluate_model(timed, eval_loader, accelerator, gather=False, max_batches=recipe.evaluation.max_batches)
        out[name] = {**without_nonfinite_scores(scores), "images_per_s": timed.images / timed.seconds}
    dense = out["dense"]
    out.update(outputs_finite=not dense["nonfinite_examples"], nonfinite_examples=dense["nonfinite_examples"],  # type: ignore[index]
               num_examples=dense["num_examples"])  # type: ignore[index]
    plan = runs["sparse_inference"].summary()
    out["sparse_layers"], out["dense_layers"] = plan["sparse_layers"], plan["dense_layers"]
    out["speedup_over_dense"] = out["sparse_inference"]["images_per_s"] / out["dense"]["images_per_s"]  # type: ignore[index]
    return out
