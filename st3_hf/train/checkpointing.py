"""Atomic, rotating training checkpoints on top of ``accelerator.save_state``.

Accelerate's own rotation (``automatic_checkpoint_naming``, ``total_limit``) deletes the oldest of *every* folder
under ``checkpoints/``, a user's included, and publishes a half-written folder under its final name;
``register_for_checkpointing`` unpickles with ``weights_only=False``. So naming, rotation (of this trainer's folders
only; a checkpoint is complete or absent) and the extra state (sparsifier, trainer state, best weights) stay here.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from safetensors import SafetensorError

from st3_hf.errors import ModelError, RunError, describe_cause
from st3_hf.file_checks import safetensors_problem, torch_zip_problem

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
# the trainer's own naming (step_%08d): a user's `step_1` folder is never taken for a checkpoint
_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d{{8,}})$")
# errors of a full, read-only or failing disk: the run stops naming the last good checkpoint
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO}


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (``trainer_state.json``)."""

    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed
    global_step: int = 0  # optimizer steps taken (gradient-accumulation boundaries)
    log_records: int = 0  # lines of metrics.jsonl at checkpoint time
    elapsed_s: float = 0.0
    phases_started: int = 0  # training phases (st3_hf/train/lrr.py) whose start (freeze, prune) has run
    best: Optional[Dict[str, Any]] = None  # the kept best evaluation of this phase (rewinds); weights in the checkpoint
    # the train record's sums since the last one: a checkpoint between two records resumes them, so the next
    # record equals an uninterrupted run's
    train_loss_sum: float = 0.0
    train_loss_count: int = 0
    skipped_images: int = 0  # over all processes


class CheckpointManager:
    """Checkpoints in ``folder/step_<N>``, written to a ``.tmp`` folder (never picked up, cleaned on the next
    save) and renamed when complete; the last ``keep`` are kept."""

    def __init__(self, folder: os.PathLike | str, keep: int = 3):
        self.folder, self.keep = Path(folder), keep

    def checkpoints(self) -> List[Path]:
        found = [(int(m.group(1)), p) for p in (self.folder.iterdir() if self.folder.is_dir() else ())
                 if (m := _PATTERN.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def own_checkpoints(self) -> List[Path]:
        """The checkpoints this trainer published (its naming and its state file, written last), oldest first: the
        only folders rotation deletes."""
        return [p for p in self.checkpoints() if (p / TRAINER_STATE).is_file()]

    def latest(self) -> Optional[Path]:
        return (self.checkpoints() or [None])[-1]

    def latest_valid(self) -> Optional[Path]:
        """Newest checkpoint that passes :func:`verify_checkpoint`; damaged newer ones are skipped with a warning."""
        for path in reversed(self.checkpoints()):
            if (problem := checkpoint_problem(path)) is None:
                return path
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
        return None

    def resolve(self, spec: str) -> Optional[Path]:
        """``"latest"`` -> newest intact checkpoint or None; otherwise a folder that must be an intact checkpoint."""
        if spec == "latest":
            return self.latest_valid()
        path = Path(spec)
        if not path.is_dir():
            raise ModelError(f"resume_from_checkpoint={spec!r} does not exist; use 'latest' or one of: "
                             f"{', '.join(str(p) for p in self.checkpoints()) or 'no checkpoints yet'}")
        verify_checkpoint(path)
        return path

    def _set_aside(self, checkpoint: Path) -> Path:
        """Rename ``checkpoint`` to a hidden name before deleting it: a kill while deleting must not leave a
        half-deleted folder that still reads as ``step_N`` (this run holds the folder's lock)."""
        aside = self.folder / f".{checkpoint.name}.old"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(checkpoint, aside)
        return aside

    def save(self, step: int, write: Callable[[Path], None], trainer_state: Dict[str, Any], is_main: bool,
             barrier: Callable[[], None]) -> Path:
        """Run ``write(tmp_folder)`` on every process, then publish it as ``step_<step>`` (main process)."""
        final = self.folder / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = self.folder / f".{final.name}.tmp"
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        try:
            write(tmp)
            barrier()
            if is_main:
                (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
                replaced = self._set_aside(final) if final.exists() else None  # the same step, saved again
                os.replace(tmp, final)  # the commit point: a folder named step_N is always complete
                if replaced is not None:
                    shutil.rmtree(replaced, ignore_errors=True)
        except (OSError, RuntimeError, SafetensorError) as err:
            # disk full, quota, file-size limit, read-only remount: safetensors and torch.save report them as their
            # own exception types, so the free space is said as well
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            last, reason = self.latest(), getattr(err, "strerror", None) or describe_cause(err)
            raise RunError(
                f"writing checkpoint {final.name} in {self.folder} failed ({reason}; "
                f"{shutil.disk_usage(self.folder).free / 1e6:.0f} MB free); "
                f"{f'the last complete checkpoint {last} is intact' if last else 'no earlier checkpoint exists'}: "
                f"free space, then continue with training.resume_from_checkpoint=latest") from err
        if is_main:
            for old in self.own_checkpoints()[: -self.keep]:
                shutil.rmtree(self._set_aside(old), ignore_errors=True)
        barrier()
        return final


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not an intact checkpoint, or None. Reads headers and CRCs, never unpickles."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE} (not a checkpoint folder, or an interrupted write)"
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError) as err:
        return f"{TRAINER_STATE} is unreadable ({describe_cause(err)})"
    except ValueError:
        return f"{TRAINER_STATE} is not valid JSON"
    known = {f.name for f in fields(TrainState)}
    if not isinstance(state, dict):
        return f"{TRAINER_STATE} is not a JSON object"
    if set(state) - known or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} has keys {sorted(set(state) - known) or 'without global_step'} (expected {sorted(known)})"
    checks = {".safetensors": safetensors_problem, ".bin": torch_zip_problem, ".pkl": torch_zip_problem,
              ".pt": torch_zip_problem}
    for path in sorted(folder.iterdir()):
        if path.suffix in checks and (problem := checks[path.suffix](path)):
            return problem
    return None


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`ModelError` naming the damaged file and the fix."""
    if problem := checkpoint_problem(folder):
        siblings = [p.name for p in CheckpointManager(Path(folder).parent).checkpoints() if p != Path(folder)]
        raise ModelError(f"checkpoint {folder} is damaged: {problem}; resume from another one"
                         f"{' (' + ', '.join(siblings) + ')' if siblings else ''} or with "
                         f"training.resume_from_checkpoint=latest")


def checkpoint_tree_holding(path: Path) -> Optional[Path]:
    """The checkpoint, or folder of checkpoints, that ``path`` is or lies in; None when it lies in none."""
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if (folder / TRAINER_STATE).is_file() or CheckpointManager(folder).own_checkpoints():
            return folder
    return None
