"""Plain JSONL metrics file, one record per line, that survives and continues across resumes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List


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
        self.path = Path(path)
        self.enabled = enabled

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
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
