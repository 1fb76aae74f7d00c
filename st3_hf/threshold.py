"""Exact global quantile of many tensors, without a full sort.

The reference sorts every prunable weight each step and interpolates linearly
(``torch.quantile`` semantics).  Here the two order statistics that the
interpolation needs are found with one ``topk`` (or ``kthvalue`` on CPU) over the
smaller tail, which gives the same value as the sort and keeps the result on the
device: no host synchronisation is needed since the rank only depends on the
(host-known) ratio and element count.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def quantile_ranks(numel: int, q: float) -> tuple[int, int, float]:
    """Zero-based ranks ``lo <= hi`` and weight ``frac`` of the linear-interpolation quantile."""
    if numel <= 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    pos = q * (numel - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, numel - 1)
    return lo, hi, pos - lo


def exact_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values.flatten(), q)`` (linear interpolation), computed by selection.

    >>> x = torch.tensor([3.0, 1.0, 2.0, 4.0])
    >>> float(exact_quantile(x, 0.5))
    2.5
    """
    flat = values.reshape(-1)
    n = flat.numel()
    lo, hi, frac = quantile_ranks(n, q)
    if flat.device.type == "cpu" and flat.dtype != torch.float16:
        v_lo = torch.kthvalue(flat, lo + 1).values
        v_hi = torch.kthvalue(flat, hi + 1).values if hi != lo else v_lo
    else:
        # select from whichever tail is shorter; topk returns it sorted
        if lo < n - lo:
            smallest = torch.topk(flat, hi + 1, largest=False, sorted=True).values
            v_lo, v_hi = smallest[lo], smallest[hi]
        else:
            largest = torch.topk(flat, n - lo, largest=True, sorted=True).values
            v_lo, v_hi = largest[-1], largest[-1 - (hi - lo)]
    # lerp, as torch.quantile does, so the result is bit-identical to the sort
    return torch.lerp(v_lo, v_hi, frac)


def global_quantile(tensors: Sequence[torch.Tensor], q: float) -> torch.Tensor:
    """Exact ``q``-quantile of all elements of ``tensors`` taken together."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return exact_quantile(flat, q)
