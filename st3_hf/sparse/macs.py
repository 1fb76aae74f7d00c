"""Multiply-accumulates of Conv2d / Linear layers, dense and sparse, as the paper counts them.

A layer's dense MACs are ``output elements x (in_channels / groups) x kernel area`` (``in_features x out_features``
per row for Linear), times the density of the weight it uses for the sparse count. A dispatch mode sees every
convolution and matrix product of one forward and attributes it to the layer whose weight it read: timm's
``F.linear(x, self.qkv.weight)`` counts, a weight read twice counts twice, products of activations do not (as in
the paper). Under ``torch.autocast`` a low-precision copy is traced back to its weight; every tensor seen is kept
alive for the pass, so no freed copy's address can be taken for another weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from st3_hf.sparse import layers as _layers
from st3_hf.sparse.layers import SparseLayerMixin
_aten = torch.ops.aten


@dataclass
class LayerMacs:
    name: str
    dense_macs: int
    density: float
    num_weights: int

    sparse_macs = property(lambda self: self.dense_macs * self.density)


@dataclass
class MacsReport:
    """Per-layer and total MACs of a model at one input size."""

    input_size: Sequence[int]
    layers: List[LayerMacs] = field(default_factory=list)

    dense_macs = property(lambda self: sum(l.dense_macs for l in self.layers))
    sparse_macs = property(lambda self: sum(l.sparse_macs for l in self.layers))
    dense_mflops = property(lambda self: self.dense_macs / 1e6)
    sparse_mflops = property(lambda self: self.sparse_macs / 1e6)

    def as_dict(self) -> Dict[str, object]:
        return {"input_size": list(self.input_size), "dense_mflops": self.dense_mflops,
                "sparse_mflops": self.sparse_mflops,
                "layers": {l.name: {"dense_mflops": l.dense_macs / 1e6, "sparse_mflops": l.sparse_macs / 1e6,
                                    "density": l.density} for l in self.layers}}


def _storage_key(t: torch.Tensor) -> Tuple[int, int]:
    # a weight and its transpose/view share storage pointer and storage offset
    return (t.untyped_storage().data_ptr(), t.storage_offset())


class _CountOps(TorchDispatchMode):
    """Records (weight key, MACs) for every convolution and matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Tuple[Tuple[int, int], int]] = []
        self.cast_from: Dict[Tuple[int, int], Tuple[int, int]] = {}  # a dtype copy -> the tensor it copies
        self.alive: List[torch.Tensor] = []  # both sides of every cast, kept for the pass: addresses stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet is _aten._to_copy:  # autocast's low-precision copy of a weight
            self.cast_from[_storage_key(out)] = _storage_key(args[0])
            self.alive += [args[0], out]
        elif packet is _aten.convolution:
            weight = args[1]
            self.ops.append((_storage_key(weight), out.numel() * math.prod(weight.shape[1:])))
        elif packet in (_aten.mm, _aten.addmm):
            x, weight_t = (args[0], args[1]) if packet is _aten.mm else (args[1], args[2])
            self.ops.append((_storage_key(weight_t), x.shape[0] * x.shape[1] * weight_t.shape[1]))
        return out


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> MacsReport:
    """Dense and sparse MACs of every Conv2d/Linear weight ``model`` uses for one input of ``input_size`` (C, H, W).

    >>> import timm
    >>> round(count_macs(timm.create_model("resnet50")).dense_mflops)
    4089
    """
    owners: Dict[Tuple[int, int], str] = {}
    modules: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):  # the sparse layers among them are found by their reads
            modules[name] = module
            if not isinstance(module, SparseLayerMixin):
                owners[_storage_key(module.weight)] = name
    reads: List[Tuple[SparseLayerMixin, torch.Tensor]] = []  # kept alive: their storage keys stay unique
    was_training, param, counter = model.training, next(model.parameters()), _CountOps()
    previous, _layers.READ_LOG = _layers.READ_LOG, reads
    try:
        model.eval()
        torch.clear_autocast_cache()  # a weight cast earlier in an enclosing autocast region is cast again, seen
        with counter:
            model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        _layers.READ_LOG = previous
        model.train(was_training)
    names_of = {id(m): n for n, m in modules.items()}
    for layer, tensor in reads:
        owners[_storage_key(tensor)] = names_of[id(layer)]
    by_name: Dict[str, LayerMacs] = {}
    for key, macs in counter.ops:
        while key in counter.cast_from:  # back to the tensor it was (possibly repeatedly) cast from
            key = counter.cast_from[key]
        name = owners.get(key)
        if name is None:
            continue  # a product of activations (attention), or a weight of no Conv2d/Linear
        if name not in by_name:
            module = modules[name]
            weight = module.used_weight() if isinstance(module, SparseLayerMixin) else module.weight
            by_name[name] = LayerMacs(name, 0, float((weight != 0).sum()) / weight.numel(), weight.numel())
        by_name[name].dense_macs += int(macs)
    return MacsReport(tuple(input_size), list(by_name.values()))
