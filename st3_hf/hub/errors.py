"""Exceptions of the Hub layer: each is also the built-in exception a caller would already catch.

>>> from st3_hf.errors import St3Error
>>> isinstance(HubAuthError("no token"), (St3Error, PermissionError))
True
"""
from st3_hf.errors import HubError, ModelLoadError


class HubAuthError(HubError, PermissionError):
    """No Hugging Face token is available, or the Hub rejected it."""


class HubUploadError(HubError, RuntimeError):
    """An upload failed on the Hub side or the network; the local folder is unchanged."""

    exit_code = 1


class ExportError(HubError):
    """The inputs of an export are invalid (metrics in percent, data config not fitting the model...)."""


class ExportFileNotFoundError(HubError, FileNotFoundError):
    """A file or folder an export or a push needs does not exist."""


class NotAModelFolderError(ModelLoadError, NotADirectoryError):
    """A path given as a model folder is a file."""


class UnsafeModelError(ModelLoadError):
    """A model repo asks for something st3_hf never does: run its code, unpickle objects, read other files."""
