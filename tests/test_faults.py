"""Fault matrix (docs/robustness.md): real processes, real files, faults from the OS and PyTorch.

Each test kills, starves or poisons a real ``scripts/train.py`` process (through
``tests/fault_harness.py`` where the fault must hit an exact moment) and then checks
that nothing already saved was lost and that the run resumes or stops clearly.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_utils import fashion_mnist_available
from train_utils import (REPO, SMALL, TRAIN, accelerate_cmd, assert_same_weights, comparable, env, error_line, free_port, records,
                         run, train_in_process)
from st3_hf.train.checkpointing import CheckpointManager, checkpoint_problem

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian dataset-fashion-mnist package (make test installs it)")]

QUICKSTART = "recipes/quickstart.yaml"
HARNESS = str(REPO / "tests" / "fault_harness.py")
# 8 steps per epoch x 2 epochs; a checkpoint every 2 steps
COMMON = [QUICKSTART, *SMALL, "training.checkpoint_every_steps=2", "training.keep_checkpoints=3"]


def harness(*fault: str, args, check: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, HARNESS, *fault, TRAIN, "--", *args], check=check, timeout=timeout)


def final_weights(out: Path):
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "ref"
    train_in_process(*COMMON, f"output_dir={out}", check=True)
    return out


# ----------------------------------------------------------------------------- SIGKILL while writing

def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    out = tmp_path / "killed_in_write"
    # killed once the step-4 checkpoint has its first file but is not complete
    proc = harness("--kill-when", str(out / "checkpoints" / ".step_00000004.tmp" / "*"),
                   args=[*COMMON, f"output_dir={out}"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / ".step_00000004.tmp").is_dir(), "the kill did not land inside the write"
    manager = CheckpointManager(ckpts)
    assert [p.name for p in manager.checkpoints()] == ["step_00000002"]
    assert manager.latest_valid() == ckpts / "step_00000002"
    assert checkpoint_problem(ckpts / ".step_00000004.tmp") is not None
    train_in_process(*COMMON, f"output_dir={out}", "training.resume_from_checkpoint=latest", check=True)
    assert_same_weights(reference, out)
    assert comparable(records(reference)) == comparable(records(out))
    assert not (ckpts / ".step_00000004.tmp").exists(), "the next save cleans the half-written folder"


def test_sigkill_while_writing_the_export_keeps_the_previous_export(tmp_path, reference):
    from st3_hf.hub.pretrained import from_pretrained
    out = tmp_path / "killed_in_export"
    staging = str(out.parent / f".{out.name}.st3-tmp-*")  # the export's hidden temporary sibling
    train_in_process(*COMMON, f"output_dir={out}", "training.max_steps=4", check=True)
    before = final_weights(out)
    # a second run of the same output_dir (starting over) is killed once its export has staged the weights
    proc = harness("--kill-when", str(out.parent / f".{out.name}.st3-tmp-*" / "model.safetensors"),
                   args=[*COMMON, f"output_dir={out}", "training.overwrite_output_dir=true"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert glob.glob(staging), "the kill did not land inside the export"
    after = final_weights(out)  # still the first export, whole
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _, sparsifier = from_pretrained(str(out))
    assert sparsifier.frozen
    # the next export replaces it and clears the leftovers
    train_in_process(*COMMON, f"output_dir={out}", "training.resume_from_checkpoint=latest", check=True)
    assert_same_weights(reference, out)
    assert not glob.glob(staging)


# ----------------------------------------------------------------------------- non-finite steps

def test_nan_batch_is_skipped_without_advancing_the_schedule(tmp_path):
    out = tmp_path / "nan_batch"
    proc = harness("--nan-input-at", "3", args=[*COMMON, f"output_dir={out}"], check=True)
    assert "step 3: non-finite loss or gradient, update skipped" in proc.stderr
    recs = records(out)
    skipped = [r for r in recs if r["kind"] == "skipped_update"]
    assert [r["step"] for r in skipped] == [3]
    last_train = [r for r in recs if r["kind"] == "train"][-1]
    assert last_train["step"] == 16 and last_train["sparsifier_step"] == 15  # one update fewer
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in recs if r["kind"] == "train")
    final = [r for r in recs if r["kind"] == "final"][-1]
    assert torch.isfinite(torch.tensor(final["eval_loss"]))
    for name, tensor in final_weights(out).items():  # BatchNorm statistics were restored, not poisoned
        assert torch.isfinite(tensor).all(), name


def test_consecutive_nan_steps_stop_with_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "diverged"
    args = [*COMMON, f"output_dir={out}", "training.max_consecutive_nonfinite_steps=3", "training.checkpoint_every_steps=100"]
    proc = harness("--nan-input-at", "5,6,7", args=args)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "3 consecutive updates (steps 5-7)" in line and "resume_from_checkpoint=latest" in line
    for step in (5, 6, 7):
        assert f"step {step}: non-finite" in proc.stderr
    ckpt = CheckpointManager(out / "checkpoints").latest_valid()
    assert ckpt is not None and ckpt.name == "step_00000007"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 7
    sparsifier_state = json.loads((ckpt / "sparsifier.json").read_text())
    assert sparsifier_state["step_count"] == 4  # steps 5-7 never advanced the schedule
    for name, tensor in load_file(str(ckpt / "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name
    # the saved state is good: resuming without the fault finishes the run
    train_in_process(*args, "training.resume_from_checkpoint=latest", check=True)
    assert [r for r in records(out) if r["kind"] == "final"]


def test_a_real_divergence_stops_the_run(tmp_path):
    out = tmp_path / "lr_too_high"
    proc = train_in_process(*COMMON, f"output_dir={out}", "optimizer.lr=1e30", "training.grad_clip=null",
                "training.max_consecutive_nonfinite_steps=2", "training.checkpoint_every_steps=100")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 consecutive updates" in error_line(proc)
    assert CheckpointManager(out / "checkpoints").latest_valid() is not None


# ----------------------------------------------------------------------------- disk full / unwritable

def test_too_little_space_is_found_before_training(tmp_path):
    out = tmp_path / "small_disk"
    # any file past 2 MB fails, as on a full disk or an exhausted quota; a checkpoint needs ~25 MB
    proc = harness("--fsize-limit", "2000000", args=[*COMMON, f"output_dir={out}"])
    assert proc.returncode == 2
    line = error_line(proc)
    assert str(out) in line and "cannot hold one checkpoint plus the export" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_disk_full_mid_run_keeps_the_last_good_checkpoint(tmp_path, reference):
    out = tmp_path / "full_mid_run"
    first = out / "checkpoints" / "step_00000002"
    proc = harness("--fsize-limit-after", f"{first}:1000000", args=[*COMMON, f"output_dir={out}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "writing checkpoint step_" in line and "is intact" in line and "resume_from_checkpoint=latest" in line
    manager = CheckpointManager(out / "checkpoints")
    assert not list((out / "checkpoints").glob(".*.tmp")), "the failed write was cleaned up"
    last = manager.latest_valid()
    assert last is not None and last == manager.latest()
    assert str(last) in line
    train_in_process(*COMMON, f"output_dir={out}", "training.resume_from_checkpoint=latest", check=True)
    assert_same_weights(reference, out)


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = train_in_process(*COMMON, f"output_dir={blocker}/out")
    assert proc.returncode == 2
    assert "cannot be created" in error_line(proc)


def test_output_dir_that_is_not_writable(tmp_path):
    if os.geteuid() == 0:
        folder = Path("/sys/kernel")  # sysfs: read-only even for root, which ignores permission bits
        if not folder.is_dir():
            pytest.skip("no /sys/kernel to stand for a read-only folder")
        proc = train_in_process(*COMMON, f"output_dir={folder}")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            proc = train_in_process(*COMMON, f"output_dir={folder}")
        finally:
            folder.chmod(0o755)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"output_dir '{folder}' is not writable" in line, line


# ----------------------------------------------------------------------------- damaged checkpoints

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_latest_skips_a_damaged_checkpoint_and_explicit_one_is_refused(tmp_path, reference):
    out = tmp_path / "damaged"
    train_in_process(*COMMON, f"output_dir={out}", "training.max_steps=6", check=True)
    ckpts = out / "checkpoints"
    _truncate(ckpts / "step_00000006" / "model.safetensors")
    proc = train_in_process(*COMMON, f"output_dir={out}", f"training.resume_from_checkpoint={ckpts / 'step_00000006'}")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "step_00000006 is damaged: model.safetensors is" in line and "step_00000004" in line
    proc = train_in_process(*COMMON, f"output_dir={out}", "training.resume_from_checkpoint=latest", check=True)
    assert "skipping damaged checkpoint" in proc.stderr and "resumed from" in proc.stdout + proc.stderr
    assert_same_weights(reference, out)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    out = tmp_path / "other_arch"
    train_in_process(*COMMON, f"output_dir={out}", "training.max_steps=2", check=True)
    proc = train_in_process(*COMMON, f"output_dir={out}", "model.name=resnet18",
                "training.resume_from_checkpoint=latest")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "written for model resnet10t" in line and "this recipe trains resnet18" in line


# ----------------------------------------------------------------------------- a rank or node dies

LONG = [QUICKSTART, *SMALL, "training.epochs=50", "training.checkpoint_every_steps=1000", "training.collective_timeout_s=20"]


def _descendants(pid: int) -> list:
    children = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            ppid = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            child = int(proc_dir.name)
            children += [child] + _descendants(child)
    return children


def _rank_of(pid: int):
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _wait_for_training(out: Path, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(r["kind"] == "train" for r in records(out)):
            return
        assert all(p.poll() is None for p in procs), "a launcher ended before training started"
        time.sleep(0.2)
    raise AssertionError("training never started")


def _popen(cmd):
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_killed_rank_makes_the_other_rank_exit(tmp_path):
    out = tmp_path / "dead_rank"
    launcher = _popen(accelerate_cmd("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), TRAIN)
                      + [*LONG, f"output_dir={out}"])
    try:
        _wait_for_training(out, [launcher])
        ranks = {_rank_of(pid): pid for pid in _descendants(launcher.pid)}
        assert {0, 1} <= set(ranks), ranks
        os.kill(ranks[1], signal.SIGKILL)
        log = launcher.communicate(timeout=120)[0]
    finally:
        _signal_all(_machine(launcher), signal.SIGKILL)
    assert launcher.returncode != 0, log[-3000:]
    assert not _alive(ranks[0]), "rank 0 outlived the launcher"


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _two_nodes(out: Path) -> list:
    port = str(free_port())
    return [
        _popen(accelerate_cmd("--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                              "--main_process_ip", "127.0.0.1", "--main_process_port", port, TRAIN)
               + [*LONG, f"output_dir={out}"])
        for rank in (0, 1)
    ]


def _signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _machine(node: subprocess.Popen) -> list:
    """The launcher and its workers (torchrun gives the workers process groups of their own)."""
    return [node.pid] + _descendants(node.pid)


@pytest.mark.parametrize(
    "fault, why",
    [
        (signal.SIGKILL, "the machine dies: the survivor's collective fails at once (connection closed)"),
        (signal.SIGSTOP, "the machine hangs with its connections open: only training.collective_timeout_s (20 s) ends the wait"),
    ],
)
def test_dead_or_hung_node_makes_the_other_node_exit(tmp_path, fault, why):
    out = tmp_path / "node"
    nodes = _two_nodes(out)
    machine = []
    try:
        _wait_for_training(out, nodes)
        machine = _machine(nodes[1])
        _signal_all(machine, fault)
        start = time.time()
        log = nodes[0].communicate(timeout=240)[0]
        waited = time.time() - start
    finally:
        _signal_all(_machine(nodes[0]) + machine, signal.SIGKILL)
    assert nodes[0].returncode != 0, log[-3000:]
    if fault == signal.SIGSTOP:
        assert waited > 10, f"{why}; it ended after {waited:.1f} s"
