"""Atomic, rotating training checkpoints on top of ``accelerator.save_state``."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from safetensors import SafetensorError

from st3_hf.errors import CheckpointError, CheckpointWriteError, describe_cause
from st3_hf.file_checks import safetensors_problem, torch_zip_problem

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# errors of a full, read-only or failing disk: the run stops naming the last good checkpoint
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO}


class CheckpointManager:
    """Checkpoints in ``folder/step_<N>``, written to a temporary folder and renamed when complete.

    A crash while writing leaves only a ``.tmp`` folder, which is never picked up
    by :meth:`latest` and is cleaned on the next save.  The last ``keep`` are kept.
    """

    def __init__(self, folder: os.PathLike | str, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def checkpoints(self) -> List[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def latest_valid(self) -> Optional[Path]:
        """Newest checkpoint that passes :func:`verify_checkpoint`; damaged newer ones are skipped with a warning."""
        for path in reversed(self.checkpoints()):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
        return None

    def resolve(self, spec: str) -> Optional[Path]:
        """``"latest"`` -> newest intact checkpoint or None; otherwise a folder that must be an intact checkpoint."""
        if spec == "latest":
            return self.latest_valid()
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(
                f"resume_from_checkpoint={spec!r} does not exist; use 'latest' or one of: "
                f"{', '.join(str(p) for p in self.checkpoints()) or 'no checkpoints yet'}"
            )
        verify_checkpoint(path)
        return path

    def save(
        self,
        step: int,
        write: Callable[[Path], None],
        trainer_state: Dict[str, Any],
        is_main: bool,
        barrier: Callable[[], None],
    ) -> Path:
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
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)  # the commit point: a folder named step_N is always complete
        except (OSError, RuntimeError, SafetensorError) as err:
            # disk full, quota, file-size limit, read-only remount: safetensors and torch.save report
            # them as their own exception types, so the free space is said as well
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            reason = getattr(err, "strerror", None) or describe_cause(err)
            free = shutil.disk_usage(self.folder).free / 1e6
            raise CheckpointWriteError(
                f"writing checkpoint {final.name} in {self.folder} failed ({reason}; {free:.0f} MB free); "
                f"{f'the last complete checkpoint {last} is intact' if last else 'no earlier checkpoint exists'}: "
                f"free space, then continue with training.resume_from_checkpoint=latest"
            ) from err
        if is_main:
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final


def read_trainer_state(checkpoint: Path) -> Dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{checkpoint}/{TRAINER_STATE} is unreadable ({err}); resume from another checkpoint") from err


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not an intact checkpoint, or None. Reads headers and CRCs, never unpickles."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE} (not a checkpoint folder, or an interrupted write)"
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except ValueError:
        return f"{TRAINER_STATE} is not valid JSON"
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            problem = torch_zip_problem(path)
        else:
            continue
        if problem:
            return problem
    return None


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the damaged file and the fix."""
    problem = checkpoint_problem(folder)
    if problem:
        siblings = [p.name for p in CheckpointManager(Path(folder).parent).checkpoints() if p != Path(folder)]
        raise CheckpointError(
            f"checkpoint {folder} is damaged: {problem}; resume from another one"
            f"{' (' + ', '.join(siblings) + ')' if siblings else ''} or with training.resume_from_checkpoint=latest"
        )
