"""The formulas of docs/method.md, written once for the tests, independently of st3_hf's code."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn


def soft_threshold_rescaled(w: torch.Tensor, t: float) -> torch.Tensor:
    """ST-3 forward weight from docs/method.md (steps 1-2)."""
    m = (w.abs() > t).to(w.dtype)
    q = (w - torch.sign(w) * t) * m
    dims = list(range(1, w.dim()))
    r = ((w.abs() * m).mean(dim=dims) + 1e-6) / (w.abs().mean(dim=dims) + 1e-6)
    return q * (1.01 / (r + 0.01)).reshape(-1, *([1] * (w.dim() - 1)))


def train_sparse_resnet(steps: int = 4, target: float = 0.85, seed: int = 0):
    """A resnet10t (1 channel, 5 classes) trained a few SGD steps with ST-3 ramping to ``target``."""
    from st3_hf import SparsityConfig, sparsify

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=target, start_step=0, end_step=steps - 2))
    optimizer = sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4))
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 5, (8,))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sparsifier
