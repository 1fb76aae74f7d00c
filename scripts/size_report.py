"""How small the compact file is: against the dense safetensors file and the entropy bound."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Dict, Mapping

import torch

from st3_hf.hub.compact import save_compact


def binary_entropy(p: float) -> float:
    """Bits per element of an i.i.d. mask with density ``p``."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy_bound_bytes(tensors: Mapping[str, torch.Tensor], sparse_names: set) -> float:
    """Lower bound for a lossless file: mask entropy + raw non-zero values for sparse tensors, raw bytes otherwise."""
    total_bits = 0.0
    for name, t in tensors.items():
        bits_per_value = t.element_size() * 8
        if name in sparse_names:
            n = t.numel()
            k = int((t != 0).sum())
            total_bits += n * binary_entropy(k / n) + k * bits_per_value
        else:
            total_bits += t.numel() * bits_per_value
    return total_bits / 8


def compact_size_report(tensors: Mapping[str, torch.Tensor], sparse_names: set) -> Dict[str, float]:
    """Sizes (bytes) of the dense safetensors file, the compact file and the entropy bound, and their ratios."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "model.safetensors"
        compact = Path(tmp) / "model.sparse.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dense))
        save_compact(tensors, compact, sparse_names=sparse_names)
        dense_bytes, compact_bytes = dense.stat().st_size, compact.stat().st_size
    bound = entropy_bound_bytes(tensors, sparse_names)
    return {
        "dense_bytes": dense_bytes,
        "compact_bytes": compact_bytes,
        "entropy_bound_bytes": bound,
        "dense_over_compact": dense_bytes / compact_bytes,
        "compact_over_bound": compact_bytes / bound,
    }
