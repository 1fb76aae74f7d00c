"""The output folder belongs to its run: checked for space first (:func:`check_output_dir`: an unusable folder
fails in seconds), then claimed once, locked for the run's life, never shared by mistake.

A run folder holds :data:`LOCK_FILE`: the folder's mark as an st3_hf run folder and, while a run holds an
``flock`` on it, the lock, which the kernel releases when the process ends in any way (``SIGKILL`` included),
so it is never stale. The file names its last holder (pid, host, start time), which a refused second run prints.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from st3_hf.errors import ConfigError
from st3_hf.hub.compact import COMPACT_FILENAME
from st3_hf.hub.export import METRICS_FILENAME, WEIGHTS_FILENAME
from st3_hf.train.checkpointing import CheckpointManager

LOCK_FILE = ".st3_hf_run.lock"
CHECKPOINTS = "checkpoints"
# what a previous run left that a fresh start would mix with its own
RUN_FILES = (METRICS_FILENAME, WEIGHTS_FILENAME, COMPACT_FILENAME)
OVERWRITE_KEY = "training.overwrite_output_dir"


@dataclass(frozen=True)
class SpaceEstimate:
    """Bytes one checkpoint and one export of a run take (fp32 weights, optimizer slots, one-byte masks)."""

    checkpoint_bytes: int
    export_bytes: int

    @classmethod
    def for_model(cls, num_params: int, optimizer: str) -> "SpaceEstimate":
        slots = {"sgd": 1, "adamw": 2}.get(optimizer, 2)  # SGD momentum buffer; AdamW exp_avg + exp_avg_sq
        return cls(checkpoint_bytes=num_params * (4 + 4 * slots + 1) + (1 << 20),
                   export_bytes=num_params * 8 + (1 << 20))  # dense safetensors + compact file (at most as large)


def check_output_dir(path: os.PathLike | str, estimate: SpaceEstimate, keep_checkpoints: int) -> Optional[str]:
    """Create ``path`` and prove it can hold one checkpoint plus the export (a probe file of that size is
    allocated with ``posix_fallocate``, so quotas, full disks and file-size limits all answer); return a warning
    or None, raise :class:`ConfigError`."""
    folder, needed = Path(path), estimate.checkpoint_bytes + estimate.export_bytes
    where = f"output_dir {str(folder)!r}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{where} cannot be created ({err.strerror or err}); choose a writable output_dir") from err
    probe = folder / f".st3_hf_space_probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as err:
        raise ConfigError(f"{where} is not writable ({err.strerror or err}); fix its permissions or choose "
                          f"another output_dir") from err
    try:
        free = shutil.disk_usage(folder).free
        if free >= needed:
            os.posix_fallocate(fd, 0, needed)  # glibc writes the blocks itself where the filesystem cannot
    except OSError as err:
        raise ConfigError(f"{where} cannot hold one checkpoint plus the export (about {needed / 1e6:.1f} MB): "
                          f"{err.strerror or err}; free space, raise the quota or choose another output_dir") from err
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    if free < needed:
        raise ConfigError(f"{where} has {free / 1e6:.1f} MB free but one checkpoint plus the export need "
                          f"about {needed / 1e6:.1f} MB; free space or choose another output_dir")
    peak = (keep_checkpoints + 1) * estimate.checkpoint_bytes + estimate.export_bytes
    if free < peak:
        return (f"{where} has {free / 1e6:.1f} MB free; keeping {keep_checkpoints} checkpoints (+1 while writing) "
                f"and the export needs about {peak / 1e6:.1f} MB: lower training.keep_checkpoints")
    return None


def trainer_checkpoints(folder: Path) -> List[Path]:
    """The checkpoints a trainer wrote in the run folder ``folder``, oldest first."""
    return CheckpointManager(folder / CHECKPOINTS).own_checkpoints()


def claim_run_folder(path: os.PathLike | str, resuming: bool, overwrite: bool) -> int:
    """Take the folder ``path`` (which :func:`check_output_dir` made sure exists and is writable) for a run and lock
    it (returns the descriptor that holds the ``flock``: ``os.close`` releases it); raise :class:`ConfigError` with the way on when another run holds it, it holds an earlier run and
    ``resuming`` is false, or it holds files of something else. ``overwrite`` (``training.overwrite_output_dir``)
    starts over: the earlier run's checkpoints, metrics and logs are removed (no other file); a foreign folder is
    written into."""
    folder = Path(path)
    where = f"output_dir {str(folder)!r}"
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    # a folder of an earlier st3_hf version has no mark but the trainer's checkpoints
    is_run_folder = (folder / LOCK_FILE).is_file() or bool(trainer_checkpoints(folder))
    if entries and not is_run_folder and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"{where} is not empty and is not an st3_hf run folder (holds {shown}); choose a new or "
                          f"empty output_dir, or set {OVERWRITE_KEY}=true to write the run into it (files of the "
                          f"same names are replaced)")
    lock = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(lock, 4096, 0) or b"{}")
            holder = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (ValueError, KeyError, TypeError, OSError):
            holder = "holder unknown"
        os.close(lock)
        raise ConfigError(f"{where} is in use by another run ({holder}); wait for it to end, or choose another "
                          f"output_dir") from None
    # what an earlier run left, shown in the refusal
    earlier = ([f"{CHECKPOINTS}/{p.name}" for p in trainer_checkpoints(folder)[-2:]]
               + [name for name in RUN_FILES if (folder / name).is_file()]) if is_run_folder else []
    if earlier and not resuming:
        if not overwrite:
            os.close(lock)
            raise ConfigError(f"{where} holds an earlier run ({', '.join(earlier)}); continue it with "
                              f"training.resume_from_checkpoint=latest, or start over with {OVERWRITE_KEY}=true "
                              f"(removes its checkpoints and metrics), or choose another output_dir")
        # the earlier run's checkpoints, metrics and logs, moved aside in one rename each, then deleted
        trash = folder / f".st3_hf_removed.{os.getpid()}"
        trash.mkdir(exist_ok=True)
        for path in [*trainer_checkpoints(folder), folder / METRICS_FILENAME, folder / "logs"]:
            if path.exists():
                path.rename(trash / path.name)
        shutil.rmtree(trash)
    # who holds the lock, for a second run to print (after the checks: a refused run changes nothing)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(lock, 0)
    os.pwrite(lock, json.dumps(holder).encode(), 0)
    return lock
