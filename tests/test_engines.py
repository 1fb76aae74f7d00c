"""Never a silent fallback: a distributed engine that was asked for and is not what would run stops at once.

The environment variables are the ones `accelerate launch` sets from its flags or a `--config_file`;
two tests go through `accelerate launch` itself with 2 processes.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from st3_hf.train.engines import EngineRequest, accelerator_device_kwargs, check_engine_engaged, requested_engine
from st3_hf.errors import EngineError
from train_utils import REPO, SMALL, TRAIN, accelerate_cmd, env, error_line, free_port

QUICKSTART = "recipes/quickstart.yaml"
HAS_DEEPSPEED = all(importlib.util.find_spec(n) is not None for n in ("deepspeed", "transformers"))


def _train_with_env(tmp_path: Path, extra_env: dict) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env)
    cmd = [sys.executable, TRAIN, QUICKSTART, f"output_dir={tmp_path / 'out'}", *SMALL]
    return subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ what the launch asked for
def test_requested_engine_reads_accelerate_launch_variables(tmp_path):
    assert requested_engine({}) == EngineRequest("ddp", 1)
    assert requested_engine({"WORLD_SIZE": "2"}) == EngineRequest("ddp", 2)
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}).zero_stage == 2  # accelerate's default
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}).zero_stage == 1
    assert requested_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == EngineRequest("fsdp", 1, fsdp_version=2)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    request = requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)})
    assert request.zero_stage == 3 and request.deepspeed_config_file == str(config)
    with pytest.raises(EngineError, match="both DeepSpeed and FSDP"):
        requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "true"})


def test_deepspeed_without_gpu_gets_cpu_false_and_gloo():
    # accelerate drops DeepSpeed when cpu=True, and sees one process without an explicit gloo backend
    assert accelerator_device_kwargs(EngineRequest("deepspeed", 2, 2), cuda_available=False) == {"cpu": False, "backend": "gloo"}
    assert accelerator_device_kwargs(EngineRequest("ddp", 2), cuda_available=False) == {"cpu": True, "backend": None}
    assert accelerator_device_kwargs(EngineRequest("deepspeed", 2, 2), cuda_available=True) == {"cpu": False, "backend": None}


# ------------------------------------------------------------------ refused at once, one line
def test_fsdp_options_not_carried_out_are_refused():
    from st3_hf.train.engines import FsdpSettings, fsdp_settings

    v2 = {"FSDP_VERSION": "2"}
    assert fsdp_settings(v2) == FsdpSettings(reshard_after_forward=True, wrap_classes=())
    wrap = {**v2, "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block, Attention"}
    assert fsdp_settings(wrap).wrap_classes == ("Block", "Attention")
    refused = {
        "FSDP1 was requested": {"FSDP_VERSION": "1"},
        "parameter CPU offload": {**v2, "FSDP_OFFLOAD_PARAMS": "true"},
        "activation checkpointing": {**v2, "FSDP_ACTIVATION_CHECKPOINTING": "true"},
        "fsdp_state_dict_type FULL_STATE_DICT": {**v2, "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"},
        "fsdp_auto_wrap_policy SIZE_BASED_WRAP": {**v2, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"},
    }
    for expected, variables in refused.items():
        with pytest.raises(EngineError, match=expected):
            fsdp_settings(variables)


@pytest.mark.slow
def test_fsdp1_is_refused(tmp_path):
    proc = _train_with_env(tmp_path, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "WORLD_SIZE": "2"})
    assert "st3_hf trains under FSDP2 only" in error_line(proc, exit_code=2)


@pytest.mark.slow
def test_zero3_request_is_refused(tmp_path):
    proc = _train_with_env(tmp_path, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert "ZeRO-3 is not supported" in error_line(proc, exit_code=2)


@pytest.mark.slow
def test_zero3_in_a_deepspeed_config_file_is_refused(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    proc = _train_with_env(tmp_path, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)})
    assert "ZeRO-3 is not supported" in error_line(proc, exit_code=2)


@pytest.mark.slow
def test_deepspeed_with_use_cpu_is_refused(tmp_path):
    # --cpu / use_cpu: true makes accelerate build a plain CPU state and ignore DeepSpeed
    proc = _train_with_env(tmp_path, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true"})
    assert "together with --cpu / use_cpu: true" in error_line(proc, exit_code=2)


def test_engine_other_than_requested_is_an_error():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)  # what accelerate builds when it drops an engine: one plain process
    try:
        check_engine_engaged(EngineRequest("ddp", 1), accelerator)
        with pytest.raises(EngineError, match="DeepSpeed ZeRO-2 on 1 process.es. was requested but accelerate set up ddp"):
            check_engine_engaged(EngineRequest("deepspeed", 1, 2), accelerator)
        # FSDP2: accelerate runs plain processes and the trainer shards the model itself
        check_engine_engaged(EngineRequest("fsdp", 1, fsdp_version=2), accelerator)
        with pytest.raises(EngineError, match="2 processes were launched but accelerate sees 1"):
            check_engine_engaged(EngineRequest("ddp", 2), accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _assert_every_rank_refused(proc: subprocess.CompletedProcess, expected: str, ranks: int = 2) -> None:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert len(lines) == ranks and all(expected in l for l in lines), proc.stderr[-4000:]
    assert "st3_hf/" not in proc.stderr, "a traceback through st3_hf instead of one error line"


@pytest.mark.slow
def test_fsdp2_method_that_needs_the_full_mask_is_refused_through_accelerate_launch(tmp_path):
    config = str(REPO / "recipes" / "accelerate_configs" / "fsdp2.yaml")
    cmd = accelerate_cmd("--config_file", config, "--num_processes", "2", "--mixed_precision", "no",
                         "--main_process_port", str(free_port()), TRAIN)
    proc = subprocess.run(cmd + [QUICKSTART, f"output_dir={tmp_path / 'out'}", *SMALL, "sparsity.method=gmp"], env=env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    _assert_every_rank_refused(proc, "error: FSDP2 cannot train method 'gmp': its masked gradient needs the full mask")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="accelerate launch --use_deepspeed needs deepspeed installed")
def test_zero3_through_accelerate_launch_is_refused(tmp_path):
    cmd = accelerate_cmd("--use_deepspeed", "--zero_stage", "3", "--num_processes", "2",
                         "--main_process_port", str(free_port()), TRAIN)
    proc = subprocess.run(cmd + [QUICKSTART, f"output_dir={tmp_path / 'out'}", *SMALL], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    _assert_every_rank_refused(proc, "error: DeepSpeed ZeRO-3 is not supported")


def test_the_training_loop_holds_no_engine_or_method_specific_code():
    """Every difference between one process / DDP, DeepSpeed and FSDP2 is an Engine method; every method difference
    a SparsityMethod attribute: the loop names neither (comments and docstrings aside)."""
    from st3_hf.sparse.methods import METHODS
    from test_method_registry import _code_words

    code = _code_words(Path(REPO) / "st3_hf" / "train" / "trainer.py")
    for word in ("deepspeed", "fsdp", "zero_stage", "shard", *[m for m in METHODS if m not in ("st3", "dense")]):
        assert word not in code, f"trainer.py names {word!r}"
