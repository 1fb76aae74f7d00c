"""Atomic, rotating training checkpoints on top of ``accelerator.save_state``."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


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

    def resolve(self, spec: str) -> Optional[Path]:
        """``"latest"`` -> newest checkpoint or None; otherwise a folder that must exist."""
        if spec == "latest":
            return self.latest()
        path = Path(spec)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"resume_from_checkpoint={spec!r} is not a checkpoint folder (no {TRAINER_STATE})")
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
        write(tmp)
        barrier()
        if is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final


def read_trainer_state(checkpoint: Path) -> Dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
