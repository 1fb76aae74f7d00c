"""Which distributed engine a launch asked for, how to build the Accelerator for it, and a check that it runs.

``accelerate launch`` (its flags or a ``--config_file``) tells the training script what it wants
through environment variables (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``,
``ACCELERATE_USE_FSDP``, ``WORLD_SIZE``...). Accelerate silently drops an engine it cannot set up
(DeepSpeed with ``cpu=True``, FSDP without a GPU backend) and trains plain DDP instead; here every
such mismatch is an :class:`~st3_hf.errors.EngineError`, raised before anything is trained.
FSDP2 is run by the trainer itself (:mod:`st3_hf.train.fsdp_support`): accelerate is built without
its FSDP plugin and runs the processes, and the trainer shards the model.

>>> request = requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
>>> request.name, request.zero_stage
('deepspeed', 1)
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional

from st3_hf.errors import EngineError

# accelerate's DeepSpeed plugin imports transformers unconditionally
DEEPSPEED_NEEDS = ("deepspeed", "transformers")
ZERO3_REFUSAL = (
    "DeepSpeed ZeRO-3 is not supported: it partitions the parameters, and st3_hf's masks and effective weights "
    "need whole layers on every rank; use recipes/accelerate_configs/deepspeed_zero2.yaml (or zero1)"
)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


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
            stage = f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else ""
            return f"DeepSpeed{stage} on {self.world_size} process(es)"
        if self.name == "fsdp":
            return f"FSDP{self.fsdp_version or ''} on {self.world_size} process(es)"
        return f"data parallel on {self.world_size} process(es)" if self.world_size > 1 else "one process"


def _zero_stage_of_file(path: str) -> Optional[int]:
    """``zero_optimization.stage`` of a DeepSpeed JSON config file, or None if it does not say."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise EngineError(f"the DeepSpeed config file {path} cannot be read ({err}); fix the path given to --deepspeed_config_file") from err
    stage = config.get("zero_optimization", {}).get("stage")
    return None if stage in (None, "auto") else int(stage)


def requested_engine(env: Optional[Mapping[str, str]] = None) -> EngineRequest:
    """The engine the environment (set by ``accelerate launch``) asks for."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        config_file = None if config_file in (None, "", "none") else config_file
        stage = None
        if config_file is not None:
            stage = _zero_stage_of_file(config_file)
        if stage is None and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        if stage is None and config_file is None:
            stage = 2  # accelerate's DeepSpeedPlugin default
        if _flag(env, "ACCELERATE_USE_FSDP"):
            raise EngineError("both DeepSpeed and FSDP were requested; launch with one of them")
        return EngineRequest("deepspeed", world_size, stage, config_file)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return EngineRequest("fsdp", world_size, fsdp_version=int(env.get("FSDP_VERSION", "1") or 1))
    return EngineRequest("ddp", world_size)


def accelerator_device_kwargs(request: EngineRequest, cuda_available: bool) -> Dict[str, Any]:
    """``cpu`` and process-group ``backend`` for ``Accelerator(...)`` that let the requested engine start.

    Accelerate drops DeepSpeed when ``cpu=True``; without CUDA, DeepSpeed runs on its CPU accelerator,
    which needs ``cpu=False`` and an explicit gloo backend (otherwise accelerate sees one process).
    """
    if cuda_available:
        return {"cpu": False, "backend": None}
    if request.name == "deepspeed":
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": True, "backend": None}


def deepspeed_zero_stage(accelerator: Any) -> Optional[int]:
    """The ZeRO stage of the DeepSpeed engine the Accelerator runs, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def refuse_before_start(request: EngineRequest, env: Optional[Mapping[str, str]] = None) -> None:
    """Requests this project cannot train, refused before accelerate or DeepSpeed start anything."""
    if request.name == "deepspeed" and request.zero_stage == 3:
        raise EngineError(ZERO3_REFUSAL)
    if request.name == "deepspeed" and _flag(os.environ if env is None else env, "ACCELERATE_USE_CPU"):
        raise EngineError(
            "DeepSpeed was requested together with --cpu / use_cpu: true, with which accelerate drops DeepSpeed; "
            "remove use_cpu from the accelerate config (DeepSpeed runs on CPUs without it) or launch without DeepSpeed"
        )
    if request.name == "deepspeed":
        missing = [name for name in DEEPSPEED_NEEDS if importlib.util.find_spec(name) is None]
        if missing:
            raise EngineError(
                f"DeepSpeed was requested but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                f"installed; run: DS_BUILD_OPS=0 pip install --no-build-isolation 'st3_hf[deepspeed]' "
                f"(or launch without DeepSpeed)"
            )


@contextlib.contextmanager
def accelerate_without_fsdp(request: EngineRequest) -> Iterator[None]:
    """Build the Accelerator without its FSDP plugin when the trainer runs FSDP2 itself (restored after)."""
    if request.name != "fsdp":
        yield
        return
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ACCELERATE_USE_FSDP"]
        else:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def check_engine_engaged(request: EngineRequest, accelerator: Any) -> None:
    """Raise :class:`EngineError` when the Accelerator does not run what was requested."""
    from accelerate.utils import DistributedType

    running = {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(accelerator.distributed_type, "ddp")
    processes = int(accelerator.num_processes)
    # FSDP2: accelerate runs plain processes, the trainer shards (shard_sparsity_state checks every layer)
    if running != ("ddp" if request.name == "fsdp" else request.name):
        raise EngineError(
            f"{request.describe()} was requested but accelerate set up {running} instead "
            f"(distributed_type={accelerator.distributed_type}); check the accelerate config file and that "
            f"the engine is installed (pip install 'st3_hf[deepspeed]'), or launch without it"
        )
    if processes != request.world_size:
        raise EngineError(
            f"{request.world_size} processes were launched but accelerate sees {processes} "
            f"(distributed_type={accelerator.distributed_type}); check the accelerate config (num_processes, backend)"
        )
    if running == "deepspeed":
        stage = deepspeed_zero_stage(accelerator)
        if stage == 3:
            raise EngineError(ZERO3_REFUSAL)
        if request.zero_stage is not None and stage != request.zero_stage:
            raise EngineError(f"DeepSpeed ZeRO-{request.zero_stage} was requested but the engine is set up for ZeRO-{stage}")
