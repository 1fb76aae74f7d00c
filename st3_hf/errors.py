"""The project's own exceptions: problems a user can fix, reported as one line by the scripts.

Every class derives from :class:`St3Error` *and* from the built-in exception a
caller would already catch (``ValueError``, ``FileNotFoundError``, ...), so
``except ValueError`` keeps working while the command-line entry points can
tell "your input is wrong" (one line, exit code 2) from a bug (a traceback).

>>> from st3_hf.errors import DataError, St3Error
>>> isinstance(DataError("no class folders"), (St3Error, ValueError))
True
"""
from __future__ import annotations

import re

__all__ = [
    "St3Error",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "ModelLoadError",
    "ModelNotFoundError",
    "CheckpointError",
    "CheckpointWriteError",
    "HubError",
    "OutputDirError",
    "TrainingDivergedError",
    "UnsupportedLayerError",
    "EngineError",
    "one_line",
    "describe_cause",
]

CAUSE_LIMIT = 300  # characters of a library's message quoted as the cause: enough to identify it


class St3Error(Exception):
    """Base class: an input, file or state the user can fix; the message says what and how.

    ``exit_code``: what the command-line scripts exit with (2: bad input, found before training;
    1: the run failed on the way).
    """

    exit_code = 2


class ConfigError(St3Error, ValueError):
    """A recipe, an override or a configuration value is invalid."""


class DataError(St3Error, ValueError):
    """A dataset is missing, empty, or not laid out as the recipe says."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset path that does not exist."""


class ModelLoadError(St3Error, ValueError):
    """A model folder, repo or checkpoint cannot be loaded (corrupt, incomplete, wrong architecture...)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model folder / repo id / file that does not exist."""


class CheckpointError(St3Error, ValueError):
    """A training checkpoint cannot be written or read back."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, quota...); the previous one is intact."""

    exit_code = 1


class HubError(St3Error, ValueError):
    """A Hub operation cannot be done as asked (bad repo id, missing token, incomplete folder)."""


class OutputDirError(St3Error, OSError):
    """The output folder is not writable or too small for the run's checkpoints."""


class TrainingDivergedError(St3Error, RuntimeError):
    """Too many consecutive non-finite losses or gradients; a checkpoint was saved first."""

    exit_code = 1


class UnsupportedLayerError(St3Error, NotImplementedError):
    """A layer of the model cannot be pruned faithfully (the message says why and how to keep it dense)."""


class EngineError(St3Error, RuntimeError):
    """The distributed engine that was asked for (DeepSpeed, FSDP, a process count) is not what would run."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines and tabs included) collapsed to one space.

    >>> one_line("config.json:\\n  bad   value")
    'config.json: bad value'
    """
    return re.sub(r"\s+", " ", str(text)).strip()


def describe_cause(error: BaseException, limit: int = CAUSE_LIMIT) -> str:
    """``"TypeName: message"`` of a library's exception, on one line and cut at ``limit`` characters.

    Libraries (torch, huggingface_hub) put multi-line explanations in their messages; quoted whole
    they would break the one-line contract of ours.
    """
    text = one_line(str(error))
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
