"""FSDP2 (``torch.distributed.fsdp.fully_shard``) training of a sparsified model.

Under ``fully_shard`` each weight is a DTensor sharded along dim 0; FSDP swaps the all-gathered weight in for
the forward and the backward. ST-3 then needs an exact *global* threshold without gathering any weight (every
rank scores its own rows; :func:`~st3_hf.sparse.distributed_quantile.sharded_quantile` gives the order statistic
a sort of the gathered scores would), masks and buffers of this rank's rows only (rows stay whole, so the
per-channel rescale is local), and the effective weight computed inside the forward from the gathered weight (a
full-size copy between steps would cancel FSDP's saving; a saved-tensor hook keeps a recipe instead of the copy
the conv / matmul would save, and recomputes it from the re-gathered weight in backward).

Only the straight-through ST-3 family (``st3``, ``st3_sigma``, ``ste_hard``) runs sharded.

>>> # in every process of a torch.distributed group (see tests/test_fsdp.py):
>>> # sp = sparsify(model, method="st3", target=0.9, end_step=1000)
>>> # fully_shard_sparse(model, sp)               # fully_shard each sparse layer, then the root
>>> # opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from st3_hf.errors import EngineError
from st3_hf.sparse.layers import SparseLayerMixin
from st3_hf.sparse.methods.st3 import ST3, StraightThrough, effective_weight
from st3_hf.sparse.sparsifier import Sparsifier

__all__ = ["fully_shard_sparse", "save_sharded", "load_sharded", "full_state_dict", "full_masks"]

#: effective weights recomputed in backward instead of kept from the forward (per process; tests read it)
RECOMPUTED_IN_BACKWARD = 0


class ShardedRead(ST3):
    """The weight a sharded layer's readers get, computed from the gathered weight in the forward
    (masks and statistics between steps: the ST-3 rule on this rank's rows)."""

    def read(self, layer: SparseLayerMixin, gathered: torch.Tensor) -> torch.Tensor:
        if isinstance(gathered, DTensor) or layer.sparse_mode == "dense":
            # a DTensor: outside forward/backward, torch.distributed.checkpoint's state-dict helpers look
            # the parameter itself up by name (pruned values: used_weight())
            return gathered
        if layer.sparse_mode == "frozen":
            # zeros are stored (re-zeroed on this rank's rows after every update); the product keeps
            # their gradient at zero like the unsharded frozen layer's latent * mask
            return gathered * (gathered != 0)
        q = _effective_of(layer, gathered)
        layer._pending_effective = q  # the saved-tensor hook below recognises views of its storage
        return StraightThrough.apply(gathered, q)


def _effective_of(layer: SparseLayerMixin, gathered: torch.Tensor) -> torch.Tensor:
    return effective_weight(gathered.detach(), layer.threshold.to(gathered.dtype), layer.soft_threshold, layer.rescale)[0]


def _unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, tuple):  # (layer, size, stride, offset) that _enter_recompute's pack kept
        global RECOMPUTED_IN_BACKWARD
        RECOMPUTED_IN_BACKWARD += 1
        # FSDP's pre-backward has all-gathered the weight again: the same q, recomputed, viewed as saved
        layer, size, stride, offset = saved
        return _effective_of(layer, layer._parameters["weight"]).as_strided(size, stride, offset)
    return saved


def _enter_recompute(layer: SparseLayerMixin, args: Any) -> None:
    def pack(t: torch.Tensor) -> Any:
        q = getattr(layer, "_pending_effective", None)
        # the conv saves the weight it got, the matmul a transposed view of it: any view of q's storage
        if q is not None and t.untyped_storage().data_ptr() == q.untyped_storage().data_ptr():
            return (layer, t.size(), t.stride(), t.storage_offset())
        return t

    layer._recompute_hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
    layer._recompute_hooks.__enter__()


def _leave_recompute(layer: SparseLayerMixin, args: Any, output: Any) -> None:
    layer._recompute_hooks.__exit__(None, None, None)
    layer._pending_effective = None


def fully_shard_sparse(model: nn.Module, sparsifier: Sparsifier, modules: Optional[Iterable[nn.Module]] = None,
                       layer_mp_policy: Optional[MixedPrecisionPolicy] = None, **fully_shard_kwargs: Any) -> nn.Module:
    """``fully_shard`` ``modules`` (default: every sparse layer), then ``model``; masks and buffers become this rank's
    rows, the forward computes the effective weight, the threshold is the sharded quantile. Call it in every process
    after :func:`~st3_hf.sparsify`, before building the optimizer. ``fully_shard_kwargs`` go to ``fully_shard``;
    ``layer_mp_policy`` replaces ``mp_policy`` for the sparse layers only (bf16 matmuls, fp32 norms).
    :class:`~st3_hf.errors.EngineError` for methods that cannot run sharded."""
    if sparsifier.shard_group is not None:
        raise EngineError("the sparsity state is already sharded (fully_shard_sparse ran before)")
    refusal = ("its forward weight needs per-layer state of the whole weight" if not sparsifier.method.fusable else
               "its masked gradient needs the full mask in the backward" if not sparsifier.config.straight_through else "")
    if refusal:  # before anything is sharded
        raise EngineError(f"FSDP2 cannot train method {sparsifier.config.method!r}: {refusal}; use st3, st3_sigma or ste_hard")
    whole_masks = {name: layer.mask.clone() for name, layer in sparsifier.layers.items()}
    layer_kwargs = {**fully_shard_kwargs, **({"mp_policy": layer_mp_policy} if layer_mp_policy else {})}
    for module in list(modules) if modules is not None else list(sparsifier.layers.values()):
        fully_shard(module, **(layer_kwargs if isinstance(module, SparseLayerMixin) else fully_shard_kwargs))
    fully_shard(model, **fully_shard_kwargs)
    sharded_read = ShardedRead(sparsifier.config)
    for name, layer in sparsifier.layers.items():
        weight = layer.latent_weight
        if not isinstance(weight, DTensor) or weight.placements != (Shard(0),):
            raise EngineError(f"layer {name!r} is not sharded along dim 0 by fully_shard (placements {getattr(weight, 'placements', None)})")
        local = weight.to_local()
        offset = int(compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)[1][0])
        layer._buffers["effective"] = torch.empty_like(local)
        layer._buffers["mask"] = whole_masks[name][offset : offset + local.shape[0]].to(local.device)
        layer.sparsity_method = sharded_read
        layer.register_forward_pre_hook(_enter_recompute)
        layer.register_forward_hook(_leave_recompute, always_call=True)
        layer.refresh()
    sparsifier.shard_group = next(iter(sparsifier.layers.values())).latent_weight.device_mesh.get_group()
    sparsifier._fused = None  # the fused pass works on whole local tensors of one process
    return model


def _sharded_masks(sparsifier: Sparsifier) -> Dict[str, DTensor]:
    return {name: DTensor.from_local(layer.mask, w.device_mesh, w.placements, shape=w.shape, stride=w.stride(),
                                     run_check=False)
            for name, layer in sparsifier.layers.items() for w in [layer.latent_weight]}


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """DCP wraps each rank's failure in a ``BaseException``, which ``except Exception`` misses: raise the cause."""
    try:
        yield
    except dcp.api.CheckpointException as err:
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]
        if causes and isinstance(causes[0], Exception):
            raise causes[0] from err
        raise RuntimeError(str(err)) from err


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier) -> Dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
            "sparsifier": {**sparsifier.state_dict(), "masks": _sharded_masks(sparsifier)}}


def save_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier) -> None:
    """Every rank writes its shards (weights, optimizer state, masks) with ``torch.distributed.checkpoint``."""
    with _plain_errors():
        dcp.save(_checkpoint_state(model, optimizer, sparsifier), checkpoint_id=folder)


class _PlainValuesLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, with the non-tensor entries (step counts, config, optimizer hyper-parameters) read by
    ``torch.load(weights_only=True)``: the default unpickles whatever a checkpoint file holds."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier) -> None:
    """Restore :func:`save_sharded` into a model sharded the same way (any world size DCP can reshard to)."""
    target = _checkpoint_state(model, optimizer, sparsifier)
    with _plain_errors():
        dcp.load(target, checkpoint_id=folder, planner=_PlainValuesLoadPlanner())
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, optimizer, target["optimizer"])
    saved = target["sparsifier"]  # this rank's rows of the masks
    sparsifier.load_state_dict({**saved, "masks": {n: m.to_local() for n, m in saved["masks"].items()}})


def full_masks(sparsifier: Sparsifier) -> Dict[str, torch.Tensor]:
    """Every layer's whole mask, on every rank (a collective: call it on all ranks)."""
    return {name: mask.full_tensor().cpu() for name, mask in _sharded_masks(sparsifier).items()}


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's ``state_dict`` (timm's keys) on rank 0, on the CPU; empty on other ranks (after
    ``sparsifier.freeze()`` the weights hold their zeros: what the export writes)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
