"""The project's own exceptions: problems a user can fix, reported as one line by the scripts.

Each also derives from the built-in a caller would already catch (``ValueError`` for bad input, ``RuntimeError``
for a failure on the way), so the scripts tell "your input is wrong" (exit code 2) or "the run failed on the way"
(exit code 1) from a bug (a traceback).

>>> from st3_hf.errors import DataError, St3Error
>>> isinstance(DataError("no class folders"), (St3Error, ValueError))
True
"""
from __future__ import annotations

import re
from typing import Optional

__all__ = ["St3Error", "ConfigError", "DataError", "ModelError", "EngineError", "RunError", "one_line",
           "describe_cause"]

CAUSE_LIMIT = 300  # characters of a library's message quoted as the cause: enough to identify it


class St3Error(Exception):
    """Base class: an input, file or state the user can fix; the message says what and how."""

    exit_code = 2  # what the scripts exit with: 2 bad input (found before training), 1 the run failed on the way


class ConfigError(St3Error, ValueError):
    """A recipe, an override, a configuration value, an output folder or a layer that cannot be pruned;
    ``key`` and ``problem``: the :class:`~st3_hf.SparsityConfig` field and what is wrong with it (else ``None``)."""

    def __init__(self, message: str, key: Optional[str] = None, problem: Optional[str] = None):
        super().__init__(message)
        self.key, self.problem = key, problem


class DataError(St3Error, ValueError):
    """A dataset is missing, empty, or not laid out as the recipe says."""


class ModelError(St3Error, ValueError):
    """A model, checkpoint or export cannot be read, written as asked or pushed: not found, corrupt,
    foreign, unsafe, not a model folder, or refused by the Hub."""


class EngineError(St3Error, RuntimeError):
    """The distributed engine that was asked for (DeepSpeed, FSDP, a process count) is not what would run."""


class RunError(St3Error, RuntimeError):
    """The run failed on the way: diverged training, a checkpoint, export or upload that could not be
    written (what was written before is intact, the message says how to go on)."""

    exit_code = 1


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines and tabs included) collapsed to one space.

    >>> one_line("config.json:\\n  bad   value")
    'config.json: bad value'
    """
    return re.sub(r"\s+", " ", str(text)).strip()


def describe_cause(error: BaseException, limit: int = CAUSE_LIMIT) -> str:
    """``"TypeName: message"`` of a library's exception (torch's and huggingface_hub's span lines), on one line and
    cut at ``limit`` characters."""
    if len(text := one_line(str(error))) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
