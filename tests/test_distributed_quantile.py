"""The sharded quantile (two histogram all-reduces) against torch.sort of the gathered tensor, in 2 real gloo processes.

Every order statistic must be bit-identical to the sorted gathered scores, and the interpolated quantile to the
linear interpolation between the sorted neighbours (``torch.quantile`` places the position in float32 and differs
in the last digits for large tensors): ties, zeros and -0.0, denormals, +inf, one bucket holding everything,
empty shards, and the st3 / st3_sigma scores of a real timm model split layer by layer across the ranks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dist_utils import run_processes

QUANTILES = [0.0, 1e-3, 0.1, 0.5, 0.9, 0.98, 0.999, 1.0]


def _model_scores(sigma_scaled: bool) -> List[torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    scores = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            w = module.weight.detach()
            # st3_sigma ranks |w| / sigma_l, sigma_l = 1 / sqrt(sum of the weight's dimensions)
            scale = math.sqrt(sum(w.shape)) if sigma_scaled else 1.0
            scores.append((w.abs() * scale).reshape(-1))
    return scores


def cases() -> Dict[str, List[torch.Tensor]]:
    """name -> [scores of rank 0, scores of rank 1]."""
    g = torch.Generator().manual_seed(12)
    normal = torch.randn(1000, generator=g).abs()
    ties = torch.randint(0, 5, (301,), generator=g).float()
    zeros = torch.cat([torch.full((40,), -0.0), torch.zeros(30), torch.rand(50, generator=g)])
    zeros = zeros[torch.randperm(zeros.numel(), generator=g)]
    denormals = torch.cat([torch.rand(200, generator=g) * 1e-40, torch.rand(50, generator=g)])
    with_inf = torch.cat([torch.rand(99, generator=g) * 1e30, torch.tensor([float("inf"), float("inf")])])
    one_bucket = (torch.ones(3000) + torch.arange(3000) * 2.0**-23)[torch.randperm(3000, generator=g)]
    out = {
        "normal_uneven": [normal[:600], normal[600:]],
        "empty_rank1": [normal[:500], torch.empty(0)],
        "empty_rank0": [torch.empty(0), ties],
        "ties": [ties[:100], ties[100:]],
        "zeros_and_negative_zeros": [zeros[:70], zeros[70:]],
        "denormals": [denormals[:125], denormals[125:]],
        "inf": [with_inf[:50], with_inf[50:]],
        "one_bucket": [one_bucket[:1700], one_bucket[1700:]],
        "single_element": [torch.empty(0), torch.tensor([0.25])],
    }
    for name, sigma in (("st3_model", False), ("st3_sigma_model", True)):
        layers = _model_scores(sigma)
        out[name] = [torch.cat(layers[0::2]), torch.cat(layers[1::2])]  # whole layers, alternately per rank
    return out


def _worker(rank: int, world_size: int, result_file: str) -> None:
    from st3_hf.sparse.distributed_quantile import sharded_order_statistics, sharded_quantile
    from st3_hf.sparse.threshold import quantile_ranks
    results = {}
    for name, shards in cases().items():
        local = shards[rank]
        total = sum(s.numel() for s in shards)
        for i, q in enumerate(QUANTILES):
            lo, hi, _ = quantile_ranks(total, q)
            results[f"{name}/{i}/stats"] = sharded_order_statistics(local, (lo, hi))
            results[f"{name}/{i}/quantile"] = sharded_quantile(local, q).reshape(1)
    # a negative score on one rank: every rank refuses (no rank is left waiting in a collective)
    bad = torch.tensor([0.5, -1.0]) if rank == 1 else torch.tensor([0.5])
    try:
        sharded_quantile(bad, 0.5)
        refused = 0
    except ValueError:
        refused = 1
    results["refused_negative"] = torch.tensor([refused])
    flags = torch.tensor([refused])
    dist.all_reduce(flags)
    if rank == 0:
        results["refused_on_all_ranks"] = flags
        save_file(results, result_file)


@pytest.mark.slow
def test_sharded_quantile_bit_identical_to_sort_of_gathered(tmp_path):
    result_file = str(tmp_path / "results.safetensors")
    run_processes(_worker, 2, result_file)
    results = load_file(result_file)
    assert int(results["refused_on_all_ranks"]) == 2
    checked = 0
    for name, shards in cases().items():
        gathered = torch.cat(shards) + 0.0  # scores are magnitudes: -0.0 counts as +0.0
        ordered = torch.sort(gathered).values
        n = gathered.numel()
        for i, q in enumerate(QUANTILES):
            pos = q * (n - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, n - 1)
            expected = torch.stack([ordered[lo], ordered[hi]])
            stats = results[f"{name}/{i}/stats"]
            assert torch.equal(stats.view(torch.int32), expected.view(torch.int32)), (name, q, stats, expected)
            # linear interpolation between the sorted neighbours at position q (n - 1)
            quantile = results[f"{name}/{i}/quantile"]
            reference = torch.lerp(ordered[lo], ordered[hi], pos - lo).reshape(1)
            torch.testing.assert_close(quantile, reference, rtol=0, atol=0, equal_nan=True, msg=f"{name} q={q}")
            checked += 1
    assert checked == len(cases()) * len(QUANTILES)


def test_sharded_quantile_without_process_group_is_the_plain_quantile():
    from st3_hf.sparse.distributed_quantile import sharded_quantile
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5000, generator=g)
    for q in QUANTILES:
        assert torch.equal(sharded_quantile(x, q), torch.quantile(x, q))
