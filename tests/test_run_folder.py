"""The output folder belongs to its run (st3_hf/train/run_folder.py): users' files are never replaced or
deleted by mistake, two runs never share a folder, a checkpoint is never overwritten by an export, and
Ctrl-C under `accelerate launch` checkpoints and says how to resume. Real files, real processes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from st3_hf.train.cli import export_main
from train_utils import REPO, SMALL, TRAIN, accelerate_cmd, env, error_line, free_port, in_process, records, train_in_process

pytestmark = pytest.mark.slow  # end-to-end: real runs through the CLI

QUICKSTART = "recipes/quickstart.yaml"
LONG = [*SMALL, "training.epochs=50", "training.log_every_steps=1"]  # stopped from outside
TINY = [*SMALL, "data.train_subset=64", "data.eval_subset=32", "training.epochs=1", "training.max_steps=2"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> sha256): equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(*args: str) -> subprocess.CompletedProcess:
    return train_in_process(QUICKSTART, *TINY, *args)


def make_users_folder(folder: Path) -> None:
    for name, text in {"README.md": "# my notes", "config.json": '{"mine": 1}', "recipe.yaml": "mine: 1\n",
                       "notes.txt": "do not lose", "checkpoints/step_1/data.txt": "my data"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for step in (2, 3, 4):
        (folder / "checkpoints" / f"step_{step}").mkdir()


def test_a_folder_that_is_not_a_run_is_refused_and_rotation_never_deletes_users_folders(tmp_path):
    out = tmp_path / "mine"
    make_users_folder(out)
    before = snapshot(out)
    line = error_line(train(f"output_dir={out}"), exit_code=2)
    assert "is not empty and is not an st3_hf run folder" in line and "training.overwrite_output_dir=true" in line
    assert snapshot(out) == before
    # told to write into it: the run's checkpoints rotate among themselves, the user's step_N folders stay
    proc = train(f"output_dir={out}", "training.overwrite_output_dir=true", "training.checkpoint_every_steps=1",
                 "training.keep_checkpoints=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "do not lose"
    assert (out / "checkpoints" / "step_1" / "data.txt").read_text() == "my data"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002", "step_1", "step_2", "step_3", "step_4"]


def test_a_fresh_start_in_a_run_folder_is_refused_then_overwrite_starts_over(tmp_path):
    out = tmp_path / "run"
    first = train(f"output_dir={out}", "training.epochs=2", "training.max_steps=4", "training.checkpoint_every_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    line = error_line(train(f"output_dir={out}", "training.seed=1"), exit_code=2)
    assert "holds an earlier run" in line and "step_00000004" in line and "metrics.jsonl" in line
    assert "training.resume_from_checkpoint=latest" in line and "training.overwrite_output_dir=true" in line
    assert snapshot(out) == before  # metrics, export and checkpoints untouched
    # start over: the earlier run's checkpoints and metrics go first, so the new run resumes its own checkpoint
    again = train(f"output_dir={out}", "training.seed=1", "training.overwrite_output_dir=true",
                  "training.checkpoint_every_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [2]
    resumed = train(f"output_dir={out}", "training.seed=1", "training.resume_from_checkpoint=latest",
                    "training.max_steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'}" in resumed.stdout + resumed.stderr


def test_export_into_a_checkpoint_or_the_checkpoint_tree_is_refused(tmp_path):
    out = tmp_path / "run"
    assert train(f"output_dir={out}", "training.checkpoint_every_steps=1").returncode == 0
    checkpoint = out / "checkpoints" / "step_00000002"
    before = snapshot(out / "checkpoints")
    for target in (checkpoint, out / "checkpoints", out / "checkpoints" / "hub"):
        proc = in_process(export_main, str(REPO / "scripts" / "export.py"), [str(checkpoint), "--output-dir", str(target)])
        line = error_line(proc, exit_code=2)
        assert "is inside the training checkpoints" in line, line
    assert snapshot(out / "checkpoints") == before


def _popen_train(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, QUICKSTART, *LONG, f"output_dir={out}", *args], env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_train_records(proc: subprocess.Popen, out: Path, count: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and sum(r["kind"] == "train" for r in records(out)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("the run logged no training step in time")


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "run"
    first = _popen_train(out, "training.checkpoint_every_steps=1")
    try:
        _wait_for_train_records(first, out, 2)
        line = error_line(train(f"output_dir={out}", "training.resume_from_checkpoint=latest", "training.seed=2"),
                          exit_code=2)
        assert f"is in use by another run (pid {first.pid} on " in line, line
    finally:
        first.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        first.wait()
    last = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    resumed = train_in_process(QUICKSTART, *LONG, f"output_dir={out}", "training.resume_from_checkpoint=latest",
                   f"training.max_steps={last + 1}", check=True)
    assert f"at step {last}" in resumed.stdout + resumed.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_under_accelerate_launch_checkpoints_and_says_how_to_resume(tmp_path, processes):
    out = tmp_path / "run"
    launch = (["--config_file", "recipes/accelerate_configs/cpu.yaml"] if processes == 1 else
              ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())])
    args = [QUICKSTART, *LONG, f"output_dir={out}"]
    # as in a terminal, Ctrl-C's default action: a test runner started in the background (or a worker process)
    # may ignore SIGINT, and an ignored signal stays ignored in every program it starts
    launcher = subprocess.Popen(accelerate_cmd(*launch, TRAIN, *args), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_train_records(launcher, out, 2)
        os.killpg(launcher.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
        log, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    stop = [line for line in log.splitlines() if line.startswith("stopped by signal 2 at step")]
    assert len(stop) == 1 and "training.resume_from_checkpoint=latest" in stop[0], log[-3000:]
    step = int(stop[0].split("at step ")[1].split(":")[0])
    saved = json.loads((out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())
    assert saved["global_step"] == step
    resumed = train_in_process(*args, "training.resume_from_checkpoint=latest", f"training.max_steps={step + 1}", check=True)
    assert f"at step {step}" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in records(out) if r["kind"] == "final"] == [step + 1]
