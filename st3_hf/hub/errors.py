"""Exceptions of the Hub layer (export, push, load) and helpers that keep their messages on one line.

Each class derives from a :mod:`st3_hf.errors` class *and* from the built-in
exception this code raised before it existed (``PermissionError`` for a missing
token, ``FileNotFoundError`` for a missing export file, ``RuntimeError`` for a
failed upload...), so ``except PermissionError`` in a caller keeps working
while the scripts report every :class:`~st3_hf.errors.St3Error` as one
``error: ...`` line.

>>> from st3_hf.errors import HubError, St3Error
>>> isinstance(HubAuthError("no token"), (St3Error, HubError, PermissionError))
True
>>> one_line("config.json:\\n  bad   value")
'config.json: bad value'
"""
from __future__ import annotations

import re

from st3_hf.errors import HubError, ModelLoadError, describe_cause, one_line  # noqa: F401 - re-exported

__all__ = [
    "HubAuthError",
    "HubUploadError",
    "HubDownloadError",
    "ExportError",
    "ExportFileNotFoundError",
    "NotAModelFolderError",
    "UnsafeModelError",
    "one_line",
    "describe_cause",
]

class HubAuthError(HubError, PermissionError):
    """No Hugging Face token is available, or the Hub rejected it."""


class HubUploadError(HubError, RuntimeError):
    """An upload failed on the Hub side or the network; the local folder is unchanged."""

    exit_code = 1


class HubDownloadError(ModelLoadError, OSError):
    """A repo could not be fetched for another reason than "not found" (network, server)."""


class ExportError(HubError):
    """The inputs of an export are invalid (metrics in percent, data config not fitting the model...)."""


class ExportFileNotFoundError(HubError, FileNotFoundError):
    """A file or folder an export or a push needs does not exist (metrics file, export folder, config.json...)."""


class NotAModelFolderError(ModelLoadError, NotADirectoryError):
    """A path given as a model folder is a file."""


class UnsafeModelError(ModelLoadError):
    """A model repo asks for something st3_hf never does: run its code, unpickle objects, read other files."""
