"""One JSON line per finished part, and subprocesses that cannot outlive their part's deadline."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

STATUSES = ("ok", "failed", "timeout", "skipped")


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (strict parsers reject them): non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RecordWriter:
    """Appends one record per line to ``path`` and forces it to disk at once (a killed run keeps it).

    >>> w = RecordWriter("/tmp/acceptance_doc.jsonl"); w.path.unlink(missing_ok=True)
    >>> w.write({"part": "environment", "status": "ok"}); read_records(w.path)[0]["status"]
    'ok'
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if record.get("status") not in STATUSES:
            raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
        line = json.dumps(_clean(dict(record)), sort_keys=True, allow_nan=False)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_records(path: Path | str) -> List[Dict[str, Any]]:
    """Every record of an acceptance JSONL file, in order (a torn last line, from a kill mid-write, is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class PartTimeout(Exception):
    """A part's deadline passed while one of its commands ran (the command was killed)."""


@dataclass
class Finished:
    """A command's outcome: exit code, wall seconds, and whether its deadline killed it."""

    command: str
    returncode: Optional[int]
    wall_s: float
    timed_out: bool


def kill_group(proc: subprocess.Popen) -> None:
    """End a command started by :func:`start` and everything it started (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def start(cmd: Sequence[str], log_path: Path, env: Optional[Mapping[str, str]] = None,
          cwd: Optional[Path] = None, stdout_path: Optional[Path] = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a timeout ends its workers too), output appended to
    ``log_path`` (stdout to ``stdout_path`` instead, when given: a command whose stdout is its result)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        out = stdout_path.open("w") if stdout_path is not None else log
        try:
            return subprocess.Popen(list(cmd), stdout=out, stderr=log, env=dict(env or os.environ),
                                    cwd=cwd, start_new_session=True)
        finally:
            if out is not log:
                out.close()


def wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for ``proc`` until the monotonic ``deadline``; kill it there. True when it ended by itself."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return False


def run_command(cmd: Sequence[str], deadline: float, log_path: Path, env: Optional[Mapping[str, str]] = None,
                cwd: Optional[Path] = None, stdout_path: Optional[Path] = None) -> Finished:
    """Run ``cmd`` to completion or to ``deadline`` (monotonic seconds), whichever comes first."""
    began = time.monotonic()
    proc = start(cmd, log_path, env, cwd, stdout_path)
    ended = wait(proc, deadline)
    return Finished(shlex.join(cmd), proc.returncode if ended else None, time.monotonic() - began, not ended)


def log_tail(log_path: Path, chars: int = 1500) -> str:
    """The end of a part's log (what a failed record quotes)."""
    if not log_path.is_file():
        return ""
    text = log_path.read_text(errors="replace")
    return text[-chars:]
