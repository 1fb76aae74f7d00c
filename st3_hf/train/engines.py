"""The distributed engines behind one interface: what the launch asked for, and how each engine trains.

``accelerate launch`` passes its request in environment variables (``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_USE_FSDP``, ``WORLD_SIZE``...). Accelerate silently trains plain DDP
when it cannot set up the engine asked for (DeepSpeed with ``cpu=True``, FSDP without a GPU backend); here every such
mismatch is an :class:`~st3_hf.errors.EngineError`, raised before anything is trained. The trainer talks to one
:class:`Engine` (accelerate alone: one process or DDP) and never asks which one it is. :class:`DeepSpeedEngine`
(ZeRO-1/2) updates inside ``backward`` and runs the sparsity on its fp32 master weights (a threshold from bf16 copies
would be off by the rounding). :class:`Fsdp2Engine` leaves processes, data and LR schedule to accelerate and shards the
model itself with :func:`~st3_hf.sparse.fsdp.fully_shard_sparse` (accelerate's FSDP plugin needs a GPU backend and
knows nothing of the sparsity state), checkpoints shards with ``torch.distributed.checkpoint`` and gathers one whole
copy for the export.

>>> request = requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
>>> request.name, request.zero_stage
('deepspeed', 1)
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from st3_hf.errors import EngineError
from st3_hf.sparse.layers import SparseLayerMixin
from st3_hf.sparse.sparsifier import Sparsifier
from st3_hf.hub.state_io import load_sparsifier_state, save_sparsifier_state

# accelerate's DeepSpeed plugin imports transformers unconditionally
DEEPSPEED_NEEDS = ("deepspeed", "transformers")
ZERO3_REFUSAL = (
    "DeepSpeed ZeRO-3 is not supported: it partitions the parameters, and st3_hf's masks and effective weights "
    "need whole layers on every rank; use recipes/accelerate_configs/deepspeed_zero2.yaml (or zero1)"
)
SHARDED_CHECKPOINT = "sharded"  # the torch.distributed.checkpoint folder inside an FSDP2 training checkpoint


def _flag(env: Mapping[str, str], name: str, default: str = "false") -> bool:
    return env.get(name, default).strip().lower() in ("1", "true", "yes", "full_shard")


# ---------------------------------------------------------------------------- what the launch asked for
@dataclass(frozen=True)
class EngineRequest:
    """What the launch asked for: ``name`` is ``"deepspeed"``, ``"fsdp"`` or ``"ddp"`` (plain data parallel or one process)."""

    name: str
    world_size: int = 1
    zero_stage: Optional[int] = None  # DeepSpeed only; None when a DeepSpeed config file decides it
    deepspeed_config_file: Optional[str] = None
    fsdp_version: Optional[int] = None

    def describe(self) -> str:
        if self.name == "deepspeed":
            return f"DeepSpeed{'' if self.zero_stage is None else f' ZeRO-{self.zero_stage}'} on {self.world_size} process(es)"
        if self.name == "fsdp":
            return f"FSDP{self.fsdp_version or ''} on {self.world_size} process(es)"
        return f"data parallel on {self.world_size} process(es)" if self.world_size > 1 else "one process"


def requested_engine(env: Optional[Mapping[str, str]] = None) -> EngineRequest:
    """The engine the environment (set by ``accelerate launch``) asks for."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        if _flag(env, "ACCELERATE_USE_FSDP"):
            raise EngineError("both DeepSpeed and FSDP were requested; launch with one of them")
        config_file, stage = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), None
        config_file = None if config_file in (None, "", "none") else config_file
        if config_file is not None:  # its zero_optimization.stage, unless it leaves it open
            try:
                with open(config_file) as f:
                    stage = json.load(f).get("zero_optimization", {}).get("stage")
            except (OSError, ValueError) as err:
                raise EngineError(f"the DeepSpeed config file {config_file} cannot be read ({err}); fix the path given "
                                  f"to --deepspeed_config_file") from err
            stage = None if stage in (None, "auto") else int(stage)
        if stage is None and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        if stage is None and config_file is None:
            stage = 2  # accelerate's DeepSpeedPlugin default
        return EngineRequest("deepspeed", world_size, stage, config_file)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return EngineRequest("fsdp", world_size, fsdp_version=int(env.get("FSDP_VERSION", "1") or 1))
    return EngineRequest("ddp", world_size)


def accelerator_device_kwargs(request: EngineRequest, cuda_available: bool) -> Dict[str, Any]:
    """``cpu`` and process-group ``backend`` for ``Accelerator(...)`` that let the requested engine start: without
    CUDA, DeepSpeed runs on its CPU accelerator, which needs ``cpu=False`` (accelerate drops DeepSpeed when
    ``cpu=True``) and an explicit gloo backend (otherwise accelerate sees one process)."""
    if cuda_available:
        return {"cpu": False, "backend": None}
    if request.name == "deepspeed":
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": True, "backend": None}


def check_engine_engaged(request: EngineRequest, accelerator: Any) -> None:
    """Raise :class:`EngineError` when the Accelerator does not run what was requested."""
    from accelerate.utils import DistributedType
    kind = accelerator.distributed_type
    running = {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(kind, "ddp")
    # FSDP2: accelerate runs plain processes, the engine shards (fully_shard_sparse checks every layer)
    if running != ("ddp" if request.name == "fsdp" else request.name):
        raise EngineError(f"{request.describe()} was requested but accelerate set up {running} instead "
                          f"(distributed_type={kind}); check the accelerate config file and that the engine is "
                          f"installed (pip install 'st3_hf[deepspeed]'), or launch without it")
    if int(accelerator.num_processes) != request.world_size:
        raise EngineError(f"{request.world_size} processes were launched but accelerate sees "
                          f"{accelerator.num_processes} (distributed_type={kind}); check the accelerate config "
                          f"(num_processes, backend)")
    if running == "deepspeed":
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        if stage == 3:
            raise EngineError(ZERO3_REFUSAL)
        if request.zero_stage is not None and stage != request.zero_stage:
            raise EngineError(f"DeepSpeed ZeRO-{request.zero_stage} was requested but the engine is set up for ZeRO-{stage}")


def build_engine(request: EngineRequest, recipe: Any) -> "Engine":
    """The engine for ``request``; what it cannot train is refused here, before any process group starts."""
    if request.name == "deepspeed":
        return DeepSpeedEngine(request)
    return Fsdp2Engine(fsdp_settings(os.environ), recipe) if request.name == "fsdp" else Engine()


# ---------------------------------------------------------------------------- the interface: accelerate alone
class Engine:
    """One process or DDP, as accelerate runs them. The trainer calls only these methods, after :meth:`prepare`
    (which keeps the accelerator, the prepared model and optimizer and the sparsifier)."""

    title = "data parallel"
    rewinds_weights = True  # best-weights rewinds load whole weights into the module
    accelerate_env: Dict[str, str] = {}  # environment variables set while accelerate's ``Accelerator(...)`` is built

    def configure(self, accelerator: Any, recipe: Any) -> None:
        """Fill in what the engine's config left to the recipe, once the Accelerator exists."""
        self.training = recipe.training

    def prepare(self, accelerator: Any, model: nn.Module, sparsifier: Sparsifier,
                make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], make_scheduler: Callable[[Any], Any]) -> Tuple[Any, Any, Any]:
        """``(model, optimizer, scheduler)`` ready to train; :attr:`sparsity` is what steps, refreshes and freezes masks."""
        optimizer = sparsifier.wrap(make_optimizer(model))  # each real step() also advances the sparsity
        return self._keep(accelerator, sparsifier, accelerator.prepare(model, optimizer, make_scheduler(optimizer)))

    def _keep(self, accelerator: Any, sparsifier: Sparsifier, prepared: Tuple[Any, Any, Any]) -> Tuple[Any, Any, Any]:
        self.accelerator, self.sparsifier, self.sparsity = accelerator, sparsifier, sparsifier
        self.model, self.optimizer, self.scheduler = prepared
        return prepared

    def update(self, guard: Any, window_loss: torch.Tensor) -> bool:
        """The optimizer update of a gradient-sync step; whether the window's loss and gradient were finite. The LR
        schedule advances only on an update really applied."""
        accelerator, training = self.accelerator, self.training
        # fp16: overflowing gradients are the loss scaler's business (it skips those steps itself)
        check_grads = training.mixed_precision != "fp16"
        grad_norm = None
        if training.grad_clip:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), training.grad_clip)
        elif guard is not None and check_grads:
            accelerator.unscale_gradients()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; its collectives must not reach the guard's
            grad_norm = grad_norm.full_tensor()
        finite = guard is None or guard.update_is_finite(window_loss, grad_norm if check_grads else None)
        if finite:
            self.optimizer.step()  # the wrapped optimizer advances the sparsity
            if not accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
        return finite

    def log_fields(self) -> Dict[str, Any]:
        return {}

    def agreement_row(self) -> torch.Tensor:
        """Per layer (kept count, position-weighted count, weight sum) in float64: equal on every rank iff they agree."""
        rows = []
        for _, layer in self.sparsifier.named_layers():
            mask = layer.mask.reshape(-1)
            positions = torch.arange(mask.numel(), device=mask.device, dtype=torch.float64)
            rows.append(torch.stack([mask.sum().double(), (positions * mask).sum(), layer.latent_weight.detach().double().sum()]))
        return torch.cat(rows)

    def sync_buffers(self) -> None:
        """Make every rank's non-parameter state equal before it is read (evaluation, checkpoint, export)."""

    def save(self, folder: Path) -> None:
        """The sparsity state next to ``accelerator.save_state``'s files."""
        if self.accelerator.is_main_process:
            save_sparsifier_state(self.sparsifier.state_dict(), folder)

    def load(self, folder: Path) -> None:
        self.sparsifier.load_state_dict(load_sparsifier_state(folder))

    def export_copy(self, raw_model: nn.Module, build: Callable[[], Tuple[nn.Module, Sparsifier]]) -> Optional[Tuple[nn.Module, Sparsifier]]:
        """The whole fp32 model and sparsifier to export, on the main process (may be a collective)."""
        return raw_model, self.sparsifier


# ---------------------------------------------------------------------------- DeepSpeed ZeRO-1/2
def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _cast_buffers(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    for module in modules:
        module._buffers.update({key: _cast_floating(buf, dtype) for key, buf in module._buffers.items()})


class DeepSpeedEngine(Engine):
    """ZeRO-1/2: every rank holds the whole module (bf16 under ``mixed_precision: bf16``), the fp32 masters are
    partitioned and updated inside the engine. Every sparsity operation runs on the assembled masters
    (``safe_get_full_fp32_param``, one all-reduce per prunable layer); weights it changes go back into them."""

    title = "DeepSpeed"
    rewinds_weights = False  # whole weights loaded into the module would not reach the fp32 masters

    def __init__(self, request: EngineRequest):
        if request.zero_stage == 3:
            raise EngineError(ZERO3_REFUSAL)
        if _flag(os.environ, "ACCELERATE_USE_CPU"):
            raise EngineError("DeepSpeed was requested together with --cpu / use_cpu: true, with which accelerate drops "
                              "DeepSpeed; remove use_cpu from the accelerate config (DeepSpeed runs on CPUs without it) "
                              "or launch without DeepSpeed")
        missing = [name for name in DEEPSPEED_NEEDS if importlib.util.find_spec(name) is None]
        if missing:
            raise EngineError(f"DeepSpeed was requested but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
                              f" not installed; run: DS_BUILD_OPS=0 pip install --no-build-isolation "
                              f"'st3_hf[deepspeed]' (or launch without DeepSpeed)")
        self._hooks: list = []

    def configure(self, accelerator: Any, recipe: Any) -> None:
        super().configure(accelerator, recipe)
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_cfg.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds_cfg["train_micro_batch_size_per_gpu"] = recipe.data.batch_size

    def prepare(self, accelerator, model, sparsifier, make_optimizer, make_scheduler):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
        optimizer = make_optimizer(model)  # not wrapped: the update happens inside the engine (see update)
        engine, optimizer, scheduler = self._keep(accelerator, sparsifier,
                                                  accelerator.prepare(model, optimizer, make_scheduler(optimizer)))
        self.sparsity = self  # the sparsity interface (step / refresh / freeze) runs on the masters
        self._get_fp32, self._set_fp32 = safe_get_full_fp32_param, safe_set_full_fp32_param
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
        for _, layer in sparsifier.named_layers():
            layer.threshold = layer.threshold.float()  # module.bfloat16() converted it too; it must stay exact
        self._cast_effective()
        if self.dtype != torch.float32:
            # the engine converts parameters only; BatchNorm statistics must match the activations' dtype
            _cast_buffers([m for m in engine.module.modules() if not isinstance(m, SparseLayerMixin)], self.dtype)
            self._hooks = [
                engine.module.register_forward_pre_hook(lambda m, args: tuple(_cast_floating(a, self.dtype) for a in args)),
                engine.module.register_forward_hook(lambda m, args, out: _cast_floating(out, torch.float32)),
            ]
        return engine, optimizer, scheduler

    def update(self, guard, window_loss):
        # the engine already stepped inside backward: a bad update is counted, it cannot be undone
        finite = guard is None or guard.update_is_finite(window_loss, None)
        if getattr(self.model, "was_step_applied", lambda: True)():
            self.step()
            self.scheduler.step()
        return finite

    def log_fields(self) -> Dict[str, Any]:
        return {"engine_steps": int(self.model.global_steps)}

    def _on_masters(self, work: Callable[[], None], write_back: bool) -> None:
        """Point each prunable layer's ``weight`` at its fp32 master while the sparsifier does ``work`` (a collective)."""
        layers = dict(self.sparsifier.named_layers())
        masters = {name: self._get_fp32(layer.latent_weight) for name, layer in layers.items()}
        if (missing := next((name for name, master in masters.items() if master is None), None)) is not None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master for {missing}.weight (is it trained by the engine?)")
        module_copies = {name: layer.latent_weight.data for name, layer in layers.items()}
        try:
            for name, layer in layers.items():
                layer.latent_weight.data = masters[name]
            work()
        finally:
            for name, layer in layers.items():
                layer.latent_weight.data = module_copies[name]
        for name, layer in layers.items() if write_back else ():
            self._set_fp32(layer.latent_weight, masters[name])
            layer.latent_weight.data.copy_(masters[name])
        self._cast_effective()

    def _cast_effective(self) -> None:
        for _, layer in self.sparsifier.named_layers():
            if layer.effective.dtype != layer.latent_weight.dtype:
                layer.effective = layer.effective.to(layer.latent_weight.dtype)
            layer._synced_version = layer.latent_weight._version

    # the sparsity interface (step / refresh / freeze), on the masters; frozen: the pruned masters are re-zeroed
    def step(self) -> None:
        self._on_masters(self.sparsifier.step, write_back=self.sparsifier.frozen)

    def refresh(self) -> None:
        self._on_masters(self.sparsifier.refresh, write_back=self.sparsifier.frozen)

    def freeze(self) -> None:
        self._on_masters(self.sparsifier.freeze, write_back=True)

    @torch.no_grad()
    def export_copy(self, raw_model, build):
        """The module back in fp32 with every parameter set to its master: the weights that were trained."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for param in raw_model.parameters():
            full = self._get_fp32(param)
            param.data = full.reshape(param.shape).clone() if full is not None else param.data.float()
        _cast_buffers(raw_model.modules(), torch.float32)
        for _, layer in self.sparsifier.named_layers():
            layer._synced_version = -1  # effective weights are recomputed from the fp32 weights on the next read
        return raw_model, self.sparsifier


# ---------------------------------------------------------------------------- FSDP2
# accelerate FSDP options (environment variables of `accelerate launch`) that this path does not carry out
_REFUSED_FSDP_FLAGS = {
    "FSDP_OFFLOAD_PARAMS": "parameter CPU offload (fsdp_offload_params)",
    "FSDP_ACTIVATION_CHECKPOINTING": "activation checkpointing (fsdp_activation_checkpointing)",
}
# FSDP_CPU_RAM_EFFICIENT_LOADING / FSDP_SYNC_MODULE_STATES (on by default in `accelerate launch --use_fsdp`) change
# nothing here: every process builds the same model from the same seed or checkpoint before sharding


@dataclass(frozen=True)
class FsdpSettings:
    """What of accelerate's FSDP config the engine honours."""

    reshard_after_forward: bool = True
    wrap_classes: Tuple[str, ...] = ()  # module class names sharded as their own unit, besides the sparse layers


def fsdp_settings(env: Mapping[str, str]) -> FsdpSettings:
    """Read accelerate's FSDP variables; :class:`EngineError` for any this path would not carry out."""
    version = int(env.get("FSDP_VERSION", "1") or 1)
    if version != 2:
        raise EngineError(f"FSDP{version} was requested; st3_hf trains under FSDP2 only: set fsdp_version: 2 "
                          f"(recipes/accelerate_configs/fsdp2.yaml, or accelerate launch --fsdp_version 2)")
    for key, what in _REFUSED_FSDP_FLAGS.items():
        if _flag(env, key):
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
    return FsdpSettings(reshard_after_forward=_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true"),
                        wrap_classes=tuple(name.strip() for name in classes.split(",") if name.strip()))


class Fsdp2Engine(Engine):
    """Every sparse layer its own FSDP2 unit (plus the blocks ``fsdp_transformer_layer_cls_to_wrap`` names), the
    exact sharded threshold, checkpoints of one shard file per rank, one whole copy for the export."""

    title = "FSDP2"
    rewinds_weights = False  # whole weights loaded into the module would not reach the shards
    accelerate_env = {"ACCELERATE_USE_FSDP": "false"}  # accelerate builds no FSDP plugin: the sharding is ours

    def __init__(self, settings: FsdpSettings, recipe: Any):
        if recipe.training.mixed_precision == "fp16":
            raise EngineError("training.mixed_precision fp16 does not run under FSDP2 here (no loss scaler); use bf16 or no")
        for key in ("compile", "channels_last"):  # FSDP2 shards contiguous parameters only
            if getattr(recipe.model, key):
                raise EngineError(f"model.{key} is not supported under FSDP2 by scripts/train.py; set model.{key}=false")
        self.settings, self.mixed_precision = settings, recipe.training.mixed_precision

    def prepare(self, accelerator, model, sparsifier, make_optimizer, make_scheduler):
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from st3_hf.sparse.fsdp import fully_shard_sparse
        wanted = set(self.settings.wrap_classes)
        blocks = [m for m in reversed(list(model.modules())) if type(m).__name__ in wanted]  # fully_shard goes bottom-up
        missing = wanted - {type(m).__name__ for m in blocks}
        if missing:
            raise EngineError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(sorted(missing))}, which "
                              f"{type(model).__name__} does not have; name its block classes or use NO_WRAP")
        # bf16: the sparse layers' weights gathered and multiplied in bf16, their gradients reduced and their shards
        # kept in fp32 (the threshold is taken from those); outputs back in fp32 for the norms and the loss
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    output_dtype=torch.float32) if self.mixed_precision == "bf16" else None
        device = accelerator.device
        if not dist.is_initialized():  # one process (accelerate starts no group): a one-rank group, no network
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        model = fully_shard_sparse(model.to(device), sparsifier, modules=list(sparsifier.layers.values()) + blocks,
                                   layer_mp_policy=bf16, reshard_after_forward=self.settings.reshard_after_forward)
        optimizer = sparsifier.wrap(make_optimizer(model))
        # sharded already, and its optimizer state is checkpointed by every rank: accelerate must neither wrap
        # them (DDP) nor save them (main process only)
        return self._keep(accelerator, sparsifier, (model, optimizer, accelerator.prepare(make_scheduler(optimizer))))

    def agreement_row(self) -> torch.Tensor:
        """Every rank holds other rows of the masks: the threshold and the step must agree."""
        return torch.stack([self.sparsifier.global_threshold.double().reshape(()).cpu(),
                            torch.tensor(float(self.sparsifier.step_count), dtype=torch.float64)])

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """The main process's BatchNorm statistics on every rank (a collective), as DDP does at each forward (FSDP2
        shards parameters only: each rank's running statistics follow its own batches)."""
        import torch.distributed as dist
        for module in self.model.modules():
            if not isinstance(module, SparseLayerMixin):  # the sparse layers' buffers are this rank's rows
                for buffer in module.buffers(recurse=False):
                    dist.broadcast(buffer, src=0)

    def save(self, folder):
        from st3_hf.sparse.fsdp import save_sharded
        save_sharded(str(Path(folder) / SHARDED_CHECKPOINT), self.model, self.optimizer, self.sparsifier)  # every rank

    def load(self, folder):
        from st3_hf.sparse.fsdp import load_sharded
        if not (Path(folder) / SHARDED_CHECKPOINT).is_dir():
            raise FileNotFoundError(f"no {SHARDED_CHECKPOINT}/ folder: it was not written under FSDP2")
        load_sharded(str(Path(folder) / SHARDED_CHECKPOINT), self.model, self.optimizer, self.sparsifier)

    def export_copy(self, raw_model, build):
        """An unsharded model and sparsifier equal to the sharded ones, built by ``build`` (a collective)."""
        from st3_hf.sparse.fsdp import full_masks, full_state_dict
        weights, masks = full_state_dict(self.model), full_masks(self.sparsifier)
        if not self.accelerator.is_main_process:
            return None
        whole, whole_sparsifier = build()
        whole.load_state_dict(weights)
        whole_sparsifier.load_state_dict({**self.sparsifier.state_dict(), "masks": masks})
        return whole, whole_sparsifier
