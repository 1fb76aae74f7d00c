"""Multiply-accumulates of Conv2d / Linear layers, dense and sparse, as the paper counts them.

A layer's dense MACs are ``output elements x (in_channels / groups) x kernel
area`` (``in_features x out_features`` per row for Linear); a pruned layer counts
its dense MACs times the density of the weight its forward uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .layers import SparseLayerMixin


@dataclass
class LayerMacs:
    name: str
    kind: str
    dense_macs: int
    density: float
    num_weights: int

    @property
    def sparse_macs(self) -> float:
        return self.dense_macs * self.density


@dataclass
class MacsReport:
    """Per-layer and total MACs of a model at one input size."""

    input_size: Sequence[int]
    layers: List[LayerMacs] = field(default_factory=list)

    @property
    def dense_macs(self) -> int:
        return sum(l.dense_macs for l in self.layers)

    @property
    def sparse_macs(self) -> float:
        return sum(l.sparse_macs for l in self.layers)

    @property
    def dense_mflops(self) -> float:
        return self.dense_macs / 1e6

    @property
    def sparse_mflops(self) -> float:
        return self.sparse_macs / 1e6

    def as_dict(self) -> Dict[str, object]:
        return {
            "input_size": list(self.input_size),
            "dense_mflops": self.dense_mflops,
            "sparse_mflops": self.sparse_mflops,
            "layers": {
                l.name: {"dense_mflops": l.dense_macs / 1e6, "sparse_mflops": l.sparse_macs / 1e6, "density": l.density}
                for l in self.layers
            },
        }


def _used_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, SparseLayerMixin):
        return module.used_weight()
    return module.weight  # type: ignore[return-value]


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> MacsReport:
    """Dense and sparse MACs of every Conv2d/Linear of ``model`` for one input of ``input_size`` (C, H, W).

    >>> import timm
    >>> round(count_macs(timm.create_model("resnet50")).dense_mflops)
    4089
    """
    report = MacsReport(input_size=tuple(input_size))
    hooks = []

    def hook(name: str):
        def fn(module: nn.Module, inputs, output: torch.Tensor) -> None:
            weight = _used_weight(module)
            density = float((weight != 0).sum()) / weight.numel()
            if isinstance(module, nn.Conv2d):
                per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
                macs = output.numel() * per_output
                kind = "conv"
            else:
                macs = (output.numel() // module.out_features) * module.in_features * module.out_features
                kind = "linear"
            report.layers.append(LayerMacs(name, kind, int(macs), density, weight.numel()))

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return report
