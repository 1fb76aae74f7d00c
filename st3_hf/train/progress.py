"""Training progress: a tqdm bar on a terminal, one plain line every N steps when the output is a file.

A redirected log (``train.py ... > run.log 2>&1``, a batch scheduler) would otherwise receive
thousands of carriage-return bar updates on a single line.

    >>> progress = make_progress(total=100, initial=0, enabled=True, every=50, stream=io.StringIO())
    >>> for _ in range(100): progress.update(1)
    >>> progress.close()
"""
from __future__ import annotations

import io  # noqa: F401 - used by the doctest
import sys
import time
from typing import Any, Optional, TextIO


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, printing ``train: step N/T (p%) ...`` every ``every`` steps."""

    def __init__(self, total: int, initial: int, every: int, stream: TextIO):
        self.total, self.n, self.every, self.stream = total, initial, max(1, every), stream
        self.postfix = ""
        self.started = time.time()
        self.start_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def _print(self) -> None:
        spent = time.time() - self.started
        rate = (self.n - self.start_n) / spent if spent > 0 else 0.0
        percent = 100.0 * self.n / self.total if self.total else 100.0
        line = f"train: step {self.n}/{self.total} ({percent:.0f}%) {rate:.2f} steps/s"
        print(f"{line} {self.postfix}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        pass


def make_progress(total: int, initial: int, *, enabled: bool, every: int, stream: Optional[TextIO] = None) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`; disabled: a silent tqdm."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if not enabled or getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream, disable=not enabled)
    return LineProgress(total, initial, every, stream)
