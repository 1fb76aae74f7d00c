"""The pieces behind the fault matrix, in process: the non-finite guard, checkpoint verification, preflight."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from st3_hf.train.checkpointing import CheckpointManager, checkpoint_problem, verify_checkpoint
from st3_hf.errors import ConfigError, ModelError
from st3_hf.train.nonfinite import NonFiniteGuard
from st3_hf.train.modeling import check_model_name
from st3_hf.train.run_folder import SpaceEstimate, check_output_dir


def test_guard_restores_batchnorm_statistics_poisoned_by_a_bad_batch():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model.train()
    model(torch.randn(8, 1, 6, 6))
    guard = NonFiniteGuard(model, max_consecutive=2)
    guard.commit()
    good = {k: v.clone() for k, v in model[1].state_dict().items()}
    loss = model(torch.full((8, 1, 6, 6), float("nan"))).mean()
    assert not torch.isfinite(model[1].running_mean).all()  # the forward pass poisoned them
    assert guard.update_is_finite(loss.detach(), grad_norm=None) is False
    guard.reject(step=7)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, good[k]), k
    assert not guard.exhausted
    guard.reject(step=8)
    assert guard.exhausted
    message = str(guard.diverged_error("ckpt/step_00000008"))
    assert "2 consecutive updates (steps 7-8)" in message and "ckpt/step_00000008" in message


def test_guard_checks_the_gradient_norm_and_uses_the_reduction():
    model = nn.Linear(2, 2)
    seen = []

    def reduce_flags(flag):  # what a sum over two processes would give if the other one saw a bad step
        seen.append(flag.clone())
        return flag + 1

    guard = NonFiniteGuard(model, max_consecutive=1, reduce_flags=reduce_flags)
    assert guard.update_is_finite(torch.tensor(1.0), torch.tensor(2.0)) is False
    assert seen[0].item() == 0.0  # locally fine, but another rank was not
    plain = NonFiniteGuard(model, max_consecutive=1)
    assert plain.update_is_finite(torch.tensor(1.0), torch.tensor(float("inf"))) is False
    assert plain.update_is_finite(torch.tensor(1.0), torch.tensor(2.0)) is True
    after_good = NonFiniteGuard(model, max_consecutive=3)
    after_good.reject(1)
    after_good.commit()  # a good update resets the count
    assert after_good.consecutive == 0


def _checkpoint(folder, step=2):
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(folder / "model.safetensors"))
    torch.save({"state": {0: {"momentum_buffer": torch.ones(1000)}}}, folder / "optimizer.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_intact_checkpoint_passes(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path / "step_00000002")) is None


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]), "model.safetensors is"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"), "corrupt header"),
        (lambda f: (f / "optimizer.bin").write_bytes((f / "optimizer.bin").read_bytes()[:500]), "optimizer.bin is not a readable torch file"),
        (lambda f: (f / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda f: (f / "trainer_state.json").write_text("{"), "not valid JSON"),
    ],
)
def test_damage_is_named(tmp_path, damage, expected):
    folder = _checkpoint(tmp_path / "step_00000002")
    damage(folder)
    assert expected in checkpoint_problem(folder)
    with pytest.raises(ModelError, match="is damaged"):
        verify_checkpoint(folder)


def test_a_flipped_byte_inside_torch_data_fails_the_crc(tmp_path):
    folder = _checkpoint(tmp_path / "step_00000002")
    data = bytearray((folder / "optimizer.bin").read_bytes())
    start = data.index(b"\x00\x00\x80\x3f")  # the first 1.0f of the momentum buffer
    data[start + 3] ^= 0x01
    (folder / "optimizer.bin").write_bytes(bytes(data))
    assert "bad CRC" in checkpoint_problem(folder)


def test_latest_valid_skips_damaged_and_tmp_folders(tmp_path):
    _checkpoint(tmp_path / "step_00000002", 2)
    newer = _checkpoint(tmp_path / "step_00000004", 4)
    (newer / "model.safetensors").write_bytes(b"")
    _checkpoint(tmp_path / ".step_00000006.tmp", 6)
    manager = CheckpointManager(tmp_path)
    assert manager.latest() == newer
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert manager.latest_valid() == tmp_path / "step_00000002"
    with pytest.raises(ModelError, match="does not exist"):
        manager.resolve(str(tmp_path / "step_00000099"))


def test_model_name_suggestions():
    check_model_name("resnet10t")
    with pytest.raises(ConfigError, match="did you mean 'resnet10t'"):
        check_model_name("resnet10")


def test_space_estimate_and_probe(tmp_path):
    estimate = SpaceEstimate.for_model(1_000_000, "adamw")
    assert estimate.checkpoint_bytes == 1_000_000 * (4 + 8 + 1) + (1 << 20)
    assert check_output_dir(tmp_path / "out", estimate, keep_checkpoints=3) is None
    assert not list((tmp_path / "out").iterdir())  # the probe is gone
    huge = SpaceEstimate(checkpoint_bytes=1 << 62, export_bytes=0)
    with pytest.raises(ConfigError, match="free but one checkpoint plus the export need"):
        check_output_dir(tmp_path / "out", huge, keep_checkpoints=1)
