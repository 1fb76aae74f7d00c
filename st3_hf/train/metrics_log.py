"""Reporting a run: the JSONL metrics file (one record per line, continued across resumes) and the progress
display (a tqdm bar on a terminal, a plain line every N steps in a redirected log, which would otherwise
receive thousands of carriage-return bar updates on a single line)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

from tqdm.auto import tqdm


def _clean(value: Any) -> Any:
    """Non-finite floats become null: strict JSON parsers reject NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return [_clean(v) for v in value] if isinstance(value, (list, tuple)) else value


class JsonlLogger:
    """Appends records to ``path``; :meth:`truncate` drops records written after a resumed checkpoint."""

    def __init__(self, path: Path | str, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def log(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(_clean(record), sort_keys=True) + "\n")

    def count(self) -> int:
        return len(self.read()) if self.enabled else 0

    def truncate(self, num_records: int) -> None:
        """Keep the first ``num_records`` records: those written before the checkpoint being resumed."""
        if not self.enabled or not self.path.is_file():
            return
        size = kept = 0
        with self.path.open("rb") as f:
            for line in f:
                if kept == num_records:
                    break
                size, kept = size + len(line), kept + bool(line.strip())
        os.truncate(self.path, size)  # one system call: a kill leaves the old file or the shortened one

    def read(self) -> List[Dict[str, Any]]:
        """The records in order; a torn last line (a kill mid-write) is left out."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []
        records = [json.loads(line) for line in lines[:-1]]
        try:
            return records + [json.loads(line) for line in lines[-1:]]
        except json.JSONDecodeError:
            return records


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, printing ``train: step N/T (p%) ...`` every ``every`` steps."""

    def __init__(self, total: int, initial: int, every: int, stream: TextIO):
        self.total, self.n, self.start_n, self.every, self.stream = total, initial, initial, max(1, every), stream
        self.postfix, self.started = "", time.time()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            rate = (self.n - self.start_n) / max(time.time() - self.started, 1e-9)
            line = f"train: step {self.n}/{self.total} ({100.0 * self.n / max(self.total, 1):.0f}%) {rate:.2f} steps/s"
            print(f"{line} {self.postfix}".rstrip(), file=self.stream, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def make_progress(total: int, initial: int, *, enabled: bool, every: int, stream: Optional[TextIO] = None) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`; disabled: silent."""
    stream = stream or sys.stderr
    if not enabled or stream.isatty():
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream, disable=not enabled)
    return LineProgress(total, initial, every, stream)
