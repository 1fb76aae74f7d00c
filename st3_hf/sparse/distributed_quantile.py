"""Exact quantile of non-negative scores spread over processes, without gathering them.

Non-negative float32 values sort like their bits read as int32: one ``all_reduce`` of a histogram of the high 16
bits finds the bucket of each wanted rank, a second one of the low 16 bits inside it the exact bit pattern
(bit-identical to a sort of the gathered tensor; ~1.5 MiB of traffic whatever the model size). Shards may be
empty; ``-0.0`` counts as ``+0.0``; every process of ``group`` calls :func:`sharded_quantile` with the same ``q``.

>>> x = torch.tensor([3.0, 1.0, 2.0, 4.0])
>>> float(sharded_quantile(x, 0.5))  # one process (no process group): the plain quantile
2.5
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from st3_hf.sparse.threshold import bucket_of_rank, quantile_ranks
_BITS = 16
_BUCKETS = 1 << _BITS  # 65,536 buckets per pass
_LOW_MASK = _BUCKETS - 1


def _all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def sharded_order_statistics(local_scores: torch.Tensor, ranks: Tuple[int, ...],
                             group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The 0-based ``ranks``-th smallest of all processes' ``local_scores`` together (float32, exact).

    ``local_scores``: this process's non-negative, non-NaN scores (any shape, may be empty).
    Two ``all_reduce`` calls (one with the element count and a validity flag folded in).
    """
    x = local_scores.detach().reshape(-1).to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0: one bit pattern for zero
    bits = x.view(torch.int32)
    invalid = (bits < 0) | (bits > 0x7F800000)  # negative values and NaNs (+inf is 0x7F800000 and sorts last)
    high = torch.where(invalid, 0, bits >> _BITS).long()
    counts = torch.zeros(_BUCKETS + 1, dtype=torch.int64, device=x.device)
    counts[:_BUCKETS] = torch.bincount(high[~invalid], minlength=_BUCKETS)
    counts[_BUCKETS] = invalid.sum()
    _all_reduce_sum(counts, group)
    if int(counts[_BUCKETS]):
        raise ValueError(f"{int(counts[_BUCKETS])} scores are negative or NaN; the sharded quantile takes magnitudes")
    cumulative = counts[:_BUCKETS].cumsum(0)
    total = int(cumulative[-1])
    if any(not 0 <= r < total for r in ranks):
        raise ValueError(f"ranks {ranks} out of range for {total} scores")
    located = [bucket_of_rank(cumulative, r) for r in ranks]

    low = (bits & _LOW_MASK).long()
    low_counts = torch.zeros(len(ranks), _BUCKETS, dtype=torch.int64, device=x.device)
    for row, (bucket, _) in enumerate(located):
        low_counts[row] = torch.bincount(low[high == bucket], minlength=_BUCKETS)
    _all_reduce_sum(low_counts, group)
    low_cumulative = low_counts.cumsum(1)

    patterns = [(bucket << _BITS) | bucket_of_rank(low_cumulative[row], rank - before)[0]
                for row, (rank, (bucket, before)) in enumerate(zip(ranks, located))]
    return torch.tensor(patterns, dtype=torch.int32, device=x.device).view(torch.float32)


def sharded_quantile(local_scores: torch.Tensor, q: float, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) of every process's ``local_scores`` together, exactly.

    The total count is summed over the processes first (one small ``all_reduce``); empty shards are fine.
    """
    numel = torch.tensor([local_scores.numel()], dtype=torch.int64, device=local_scores.device)
    _all_reduce_sum(numel, group)
    lo, hi, frac = quantile_ranks(int(numel), q)
    values = sharded_order_statistics(local_scores, (lo, hi), group)
    return torch.lerp(values[0], values[1], frac)
