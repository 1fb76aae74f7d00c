"""FSDP2 (``fully_shard``) training of a sparsified timm model, in 2 real gloo processes on the CPU.

Against a single process on the same global batches: the threshold each step is the exact
quantile of the *gathered* scores (written here independently: sort + linear interpolation),
the weights agree to float tolerance, no rank holds a full-size mask or effective weight, the
sharded checkpoint resumes bit-identically, and the full state dict loads into plain timm with
the sparsity the sparsifier reports.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F

from dist_utils import run_processes
from st3_hf import sparsify
from st3_hf.errors import EngineError

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **VIT)


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def _reference_threshold(weights: Dict[str, torch.Tensor], ratio: float, criterion: str) -> float:
    """The method page's global threshold: the ``ratio`` quantile of all scores (|w|, or |w| / sigma_l)."""
    scores = []
    for w in weights.values():
        s = w.abs().reshape(-1).double()
        if criterion == "l1std":
            s = s * math.sqrt(sum(w.shape))  # |w| / sigma_l with sigma_l = 1 / sqrt(sum of the weight's dims)
        scores.append(s)
    flat = torch.sort(torch.cat(scores).float()).values
    pos = ratio * (flat.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    return float(torch.lerp(flat[lo], flat[hi], torch.tensor(pos - lo, dtype=torch.float32)))


def _train(method: str, steps: range, sharded: bool, rank: int, sp_model=None):
    """Train ``steps`` (global step numbers); returns per-step records."""
    model, sp, opt = sp_model
    records = []
    for step in steps:
        x, y = _batch(step)
        if sharded:
            half = GLOBAL_BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        full = {n: (l.latent_weight.full_tensor() if sharded else l.latent_weight).detach().clone() for n, l in sp.named_layers()}
        records.append({
            "threshold": float(sp.global_threshold), "ratio": sp.ratio, "sparsity": sp.sparsity(), "weights": full,
            "local_buffer_sizes": {n: (l.effective.numel(), l.mask.numel()) for n, l in sp.named_layers()},
            "local_weight_sizes": {n: l.latent_weight.to_local().numel() if sharded else l.latent_weight.numel()
                                   for n, l in sp.named_layers()},
        })
    return records


def _build(method: str, sharded: bool):
    from torch.distributed.device_mesh import init_device_mesh

    from st3_hf.sparse.fsdp import fully_shard_sparse
    model = _model()
    sp = sparsify(model, method=method, target=0.8, start_step=0, end_step=STEPS)
    if sharded:
        fully_shard_sparse(model, sp, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, sp, opt


def _worker(rank: int, world_size: int, method: str, mode: str, folder: str) -> None:
    from st3_hf.sparse.fsdp import full_state_dict, load_sharded, save_sharded

    model, sp, opt = _build(method, sharded=True)
    if mode == "straight":
        records = _train(method, range(1, STEPS + 1), True, rank, (model, sp, opt))
        from st3_hf.sparse import fsdp
        # every pruned forward weight (from step 2 on: step 1 ran dense, ratio 0) was recomputed for the
        # backward from the re-gathered weight, not kept at full size from the forward
        assert fsdp.RECOMPUTED_IN_BACKWARD == len(sp.layers) * (STEPS - 1), fsdp.RECOMPUTED_IN_BACKWARD
        x, _ = _batch(99)
        sp.freeze()
        with torch.no_grad():
            out = model(x)
        state = full_state_dict(model)
        sparsity = sp.sparsity()  # a collective under FSDP2: every rank calls it
        if rank == 0:
            torch.save({"records": records, "out": out, "state": state, "sparsity": sparsity}, Path(folder) / "fsdp.pt")
    elif mode == "first_half":
        _train(method, range(1, 3), True, rank, (model, sp, opt))
        save_sharded(str(Path(folder) / "ckpt"), model, opt, sp)
    elif mode == "second_half":
        load_sharded(str(Path(folder) / "ckpt"), model, opt, sp)
        assert sp.step_count == 2
        records = _train(method, range(3, STEPS + 1), True, rank, (model, sp, opt))
        if rank == 0:
            torch.save({"records": records}, Path(folder) / "resumed.pt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["st3", "st3_sigma"])
def test_fully_sharded_training_matches_one_process_with_the_exact_threshold(method: str, tmp_path: Path) -> None:
    run_processes(_worker, WORLD, method, "straight", str(tmp_path))
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    single = _train(method, range(1, STEPS + 1), False, 0, _build(method, sharded=False))
    criterion = "l1" if method == "st3" else "l1std"
    for step, (s, r) in enumerate(zip(sharded["records"], single), start=1):
        # the sharded threshold is the exact quantile of the gathered scores (to the bit) ...
        assert s["threshold"] == _reference_threshold(s["weights"], s["ratio"], criterion), step
        # ... and training follows the single process (same global batches, averaged gradients)
        assert s["ratio"] == r["ratio"]
        assert s["threshold"] == pytest.approx(r["threshold"], rel=1e-5), step
        for name in r["weights"]:
            torch.testing.assert_close(s["weights"][name], r["weights"][name], rtol=1e-5, atol=1e-6)
        assert s["sparsity"] == pytest.approx(r["sparsity"], abs=2e-3)
        # no rank keeps a full-size mask or effective weight: both are this rank's rows only
        for name, (effective, mask) in s["local_buffer_sizes"].items():
            assert effective == mask == s["local_weight_sizes"][name] < r["local_weight_sizes"][name]
    assert single[-1]["sparsity"] == pytest.approx(0.8, abs=2e-3)

    # the full state dict (rank 0) is plain timm's and carries the zeros
    plain = _model()
    plain.load_state_dict(sharded["state"])
    names = [n for n, _ in sparsify(_model(), method=method, target=0.8).named_layers()]
    zeros = sum(int((plain.get_submodule(n).weight == 0).sum()) for n in names)
    total = sum(plain.get_submodule(n).weight.numel() for n in names)
    assert zeros / total == pytest.approx(sharded["sparsity"], abs=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(plain(_batch(99)[0]), sharded["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bit_identically(tmp_path: Path) -> None:
    run_processes(_worker, WORLD, "st3", "straight", str(tmp_path))
    run_processes(_worker, WORLD, "st3", "first_half", str(tmp_path))
    assert (tmp_path / "ckpt" / ".metadata").is_file()
    assert len(list((tmp_path / "ckpt").glob("*.distcp"))) == WORLD  # one shard file per rank
    run_processes(_worker, WORLD, "st3", "second_half", str(tmp_path))
    straight = torch.load(tmp_path / "fsdp.pt", weights_only=True)["records"][2:]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)["records"]
    for a, b in zip(straight, resumed):
        assert a["threshold"] == b["threshold"]
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name


@pytest.mark.parametrize("method", ["gmp", "feather", "probmask"])
def test_methods_that_need_the_full_mask_are_refused_before_sharding(method: str) -> None:
    from st3_hf.sparse.fsdp import fully_shard_sparse
    model = _model()
    extra = dict(steps_per_epoch=5, temperature_epochs=1) if method == "probmask" else {}
    sp = sparsify(model, method=method, target=0.8, end_step=10, **extra)
    with pytest.raises(EngineError, match=f"FSDP2 cannot train method '{method}'"):
        fully_shard_sparse(model, sp)


class _NotPlainData:
    """Stands for anything a tampered checkpoint could make torch.load build (pickle runs its code)."""


def test_sharded_checkpoint_values_are_read_without_unpickling_objects(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from st3_hf.sparse.fsdp import _PlainValuesLoadPlanner

    plain = {"step_count": 7, "config": {"method": "st3", "target": 0.9}, "weight": torch.arange(4.0)}
    dcp.save(plain, checkpoint_id=str(tmp_path / "plain"))  # one process: DCP runs without a group
    target = {"step_count": 0, "config": {"method": "", "target": 0.0}, "weight": torch.zeros(4)}  # DCP loads the keys asked for
    dcp.load(target, checkpoint_id=str(tmp_path / "plain"), planner=_PlainValuesLoadPlanner())
    assert target["step_count"] == 7 and target["config"] == plain["config"] and torch.equal(target["weight"], plain["weight"])

    dcp.save({"step_count": _NotPlainData()}, checkpoint_id=str(tmp_path / "tampered"))
    with pytest.raises(dcp.api.CheckpointException) as refused:
        dcp.load({"step_count": 0}, checkpoint_id=str(tmp_path / "tampered"), planner=_PlainValuesLoadPlanner())
    ((cause, _traceback),) = refused.value.failures.values()  # per rank: (exception, where)
    assert isinstance(cause, pickle.UnpicklingError) and "Weights only load failed" in str(cause)
    # DCP's own planner would have built the object
    loaded = {"step_count": 0}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "tampered"))
    assert isinstance(loaded["step_count"], _NotPlainData)
