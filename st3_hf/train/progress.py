"""Training progress: a tqdm bar on a terminal, one plain line every N steps when the output is a file
(a redirected log would otherwise receive thousands of carriage-return bar updates on a single line)."""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

from tqdm.auto import tqdm


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, printing ``train: step N/T (p%) ...`` every ``every`` steps."""

    def __init__(self, total: int, initial: int, every: int, stream: TextIO):
        self.total, self.n, self.start_n, self.every, self.stream = total, initial, initial, max(1, every), stream
        self.postfix = ""
        self.started = time.time()

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
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`; disabled: a silent
    tqdm."""
    stream = stream or sys.stderr
    if not enabled or stream.isatty():
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream, disable=not enabled)
    return LineProgress(total, initial, every, stream)
