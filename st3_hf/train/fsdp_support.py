"""FSDP2 under ``scripts/train.py``: the trainer shards the model itself, the same way on CPUs and GPUs.

Accelerate enables its FSDP plugin only with a GPU backend, and its sharding knows nothing of the
sparsity state. So for ``accelerate launch --use_fsdp --fsdp_version 2`` (or
``recipes/accelerate_configs/fsdp2.yaml``) accelerate runs the processes, the data and the LR
schedule, and :class:`FsdpTraining` runs FSDP2 with :func:`~st3_hf.sparse.fsdp.fully_shard_sparse`:
every sparse layer its own FSDP unit (plus the blocks ``fsdp_transformer_layer_cls_to_wrap`` names),
the exact sharded threshold, sharded checkpoints (``torch.distributed.checkpoint``: weights,
optimizer state and masks, one file per rank), and at the end one whole copy on the main process
for the export. Options of accelerate's FSDP config that this path does not carry out are refused
by :func:`fsdp_settings`, never ignored.

>>> fsdp_settings({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}).reshard_after_forward
False
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from st3_hf.errors import EngineError
from st3_hf.sparse.sparsifier import Sparsifier

SHARDED_CHECKPOINT = "sharded"  # the torch.distributed.checkpoint folder inside a training checkpoint
# accelerate FSDP options (environment variables of `accelerate launch`) that this path does not carry out
_REFUSED_FLAGS = {
    "FSDP_OFFLOAD_PARAMS": "parameter CPU offload (fsdp_offload_params)",
    "FSDP_ACTIVATION_CHECKPOINTING": "activation checkpointing (fsdp_activation_checkpointing)",
}
# FSDP_CPU_RAM_EFFICIENT_LOADING / FSDP_SYNC_MODULE_STATES (on by default in `accelerate launch --use_fsdp`) change
# nothing here: every process builds the same model from the same seed or checkpoint before sharding


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "full_shard")


@dataclass(frozen=True)
class FsdpSettings:
    """What of accelerate's FSDP config the trainer honours."""

    reshard_after_forward: bool = True
    wrap_classes: Tuple[str, ...] = ()  # module class names sharded as their own unit, besides the sparse layers


def fsdp_settings(env: Mapping[str, str]) -> FsdpSettings:
    """Read accelerate's FSDP variables; :class:`EngineError` for any this path would not carry out."""
    version = int(env.get("FSDP_VERSION", "1") or 1)
    if version != 2:
        raise EngineError(f"FSDP{version} was requested; st3_hf trains under FSDP2 only: set fsdp_version: 2 "
                          f"(recipes/accelerate_configs/fsdp2.yaml, or accelerate launch --fsdp_version 2)")
    for key, what in _REFUSED_FLAGS.items():
        if _true(env.get(key, "false")):
            raise EngineError(f"FSDP2 with {what} is not supported by scripts/train.py; remove it from the accelerate config")
    state_dict_type = env.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").upper()
    if state_dict_type != "SHARDED_STATE_DICT":
        raise EngineError(f"fsdp_state_dict_type {state_dict_type} is not supported: checkpoints are sharded "
                          f"(torch.distributed.checkpoint) and the export is a whole model; use SHARDED_STATE_DICT")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").upper()
    if policy not in ("NO_WRAP", "TRANSFORMER_BASED_WRAP"):
        raise EngineError(f"fsdp_auto_wrap_policy {policy} is not supported: every sparse layer is its own FSDP unit; "
                          f"use NO_WRAP or TRANSFORMER_BASED_WRAP (with fsdp_transformer_layer_cls_to_wrap)")
    classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "") if policy == "TRANSFORMER_BASED_WRAP" else ""
    return FsdpSettings(
        reshard_after_forward=_true(env.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
        wrap_classes=tuple(name.strip() for name in classes.split(",") if name.strip()),
    )


class FsdpTraining:
    """The trainer's FSDP2 engine: shard, checkpoint, resume and gather for the export."""

    def __init__(self, settings: FsdpSettings, mixed_precision: str):
        if mixed_precision == "fp16":
            raise EngineError("training.mixed_precision fp16 does not run under FSDP2 here (no loss scaler); use bf16 or no")
        self.settings = settings
        self.mixed_precision = mixed_precision

    def shard(self, model: nn.Module, sparsifier: Sparsifier, device: torch.device) -> nn.Module:
        """Move ``model`` to ``device`` and shard it and its sparsity state (every rank; before the optimizer)."""
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from st3_hf.sparse.fsdp import fully_shard_sparse

        wanted = set(self.settings.wrap_classes)
        # children before their parents: fully_shard goes bottom-up
        blocks = [m for m in reversed(list(model.modules())) if type(m).__name__ in wanted]
        missing = wanted - {type(m).__name__ for m in blocks}
        if missing:
            raise EngineError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(sorted(missing))}, which "
                              f"{type(model).__name__} does not have; name its block classes or use NO_WRAP")
        bf16 = None
        if self.mixed_precision == "bf16":
            # the sparse layers' weights gathered and multiplied in bf16, their gradients reduced and their
            # shards kept in fp32 (the threshold is taken from those); outputs back in fp32, so the norms,
            # whose parameters stay fp32, and the loss run in fp32
            bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
        if not dist.is_initialized():  # one process (accelerate starts no group): a one-rank group, no network
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        model.to(device)
        return fully_shard_sparse(model, sparsifier, modules=list(sparsifier.layers.values()) + blocks,
                                  layer_mp_policy=bf16, reshard_after_forward=self.settings.reshard_after_forward)

    @staticmethod
    @torch.no_grad()
    def sync_buffers(model: nn.Module) -> None:
        """Give every rank the main process's BatchNorm statistics (a collective), as DDP does at each forward.

        FSDP2 shards parameters only: each rank's running statistics follow its own batches. Training uses batch
        statistics, so only evaluations, checkpoints and the export see them; they are synced before each.
        """
        import torch.distributed as dist

        from st3_hf.sparse.layers import SparseLayerMixin

        for module in model.modules():
            if not isinstance(module, SparseLayerMixin):  # the sparse layers' buffers are this rank's rows
                for buffer in module.buffers(recurse=False):
                    dist.broadcast(buffer, src=0)

    @staticmethod
    def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier) -> None:
        from st3_hf.sparse.fsdp import save_sharded

        save_sharded(str(Path(folder) / SHARDED_CHECKPOINT), model, optimizer, sparsifier)

    @staticmethod
    def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier) -> None:
        from st3_hf.sparse.fsdp import load_sharded

        if not (Path(folder) / SHARDED_CHECKPOINT).is_dir():
            raise FileNotFoundError(f"no {SHARDED_CHECKPOINT}/ folder: it was not written under FSDP2")
        load_sharded(str(Path(folder) / SHARDED_CHECKPOINT), model, optimizer, sparsifier)

    @staticmethod
    def whole_copy(
        model: nn.Module, sparsifier: Sparsifier, build: Callable[[], Tuple[nn.Module, Sparsifier]], is_main: bool
    ) -> Optional[Tuple[nn.Module, Sparsifier]]:
        """On the main process, an unsharded model and sparsifier equal to the sharded ones (a collective).

        ``build`` makes a fresh model and sparsifier of the run (the same code path as the start).
        """
        from st3_hf.sparse.fsdp import full_masks, full_state_dict

        weights, masks = full_state_dict(model), full_masks(sparsifier)
        if not is_main:
            return None
        whole, whole_sparsifier = build()
        whole.load_state_dict(weights)
        whole_sparsifier.load_state_dict({**sparsifier.state_dict(), "masks": masks})
        return whole, whole_sparsifier
