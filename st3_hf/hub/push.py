"""Upload an exported folder to the Hugging Face Hub.

Everything that can be checked locally is checked before any network call:
the repo id, the token, and that the folder is a complete export.  Every
problem is a :class:`~st3_hf.errors.HubError` (:class:`HubAuthError` for the
token, a ``PermissionError`` too; :class:`HubUploadError` for the upload, a
``RuntimeError`` too) with a one-line message.  Only the
export's own files are uploaded (an explicit ``allow_patterns`` list), and the
local folder is never modified.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Union

from st3_hf.errors import HubError
from st3_hf.hub.compact import COMPACT_FILENAME
from st3_hf.hub.errors import ExportFileNotFoundError, HubAuthError, HubUploadError, describe_cause
from st3_hf.hub.export import CONFIG_FILENAME, EXPORT_FILES, REQUIRED_FILES, WEIGHTS_FILENAME

__all__ = ["HubAuthError", "HubUploadError", "check_repo_id", "resolve_token", "files_to_upload", "push_folder"]

PathLike = Union[str, Path]
DEFAULT_COMMIT_MESSAGE = "Upload sparse model exported by st3_hf"
LOGIN_HELP = (
    "no Hugging Face token found: pass token=..., set the HF_TOKEN environment variable, "
    "or log in once with `hf auth login` (or `huggingface-cli login`)"
)


def check_repo_id(repo_id: str) -> str:
    """Raise :class:`~st3_hf.errors.HubError` (a ``ValueError``) unless ``repo_id`` is a valid ``ORG/NAME`` model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise HubError(f"repo id must look like 'ORG/NAME' (owner and name), got {repo_id!r}: pass e.g. my-org/resnet50-st3-90")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid Hub repo id {repo_id!r}: {describe_cause(e)}") from e
    return repo_id


def resolve_token(token: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """The token to push with: the argument, ``HF_TOKEN``, or the one saved by ``hf auth login``.

    Raises :class:`HubAuthError` (a ``PermissionError``) when there is none;
    ``repo_id`` only makes the message name the repo.
    """
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        target = f"cannot push to {repo_id!r}: " if repo_id else ""
        raise HubAuthError(target + LOGIN_HELP)
    return token


def files_to_upload(folder: PathLike) -> List[str]:
    """The exact file list of an export in ``folder``; raise if a required file is missing or unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFileNotFoundError(
            f"{folder} is not a folder: pass the folder written by scripts/export.py (config.json, model.safetensors, ...)"
        )
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file() or (folder / name).stat().st_size == 0]
    if missing:
        raise ExportFileNotFoundError(
            f"{folder} is not a complete st3_hf export: missing or empty {missing} (re-run the export)"
        )
    try:
        config = json.loads((folder / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{folder / CONFIG_FILENAME} is not valid JSON ({describe_cause(e)}): re-run the export") from e
    if not isinstance(config, dict) or "architecture" not in config or not isinstance(config.get("sparsity"), dict):
        raise HubError(
            f"{folder / CONFIG_FILENAME} is not an st3_hf export config (no architecture / sparsity block): "
            "push only folders written by st3_hf's export"
        )
    _check_safetensors_header(folder / WEIGHTS_FILENAME)
    _check_safetensors_header(folder / COMPACT_FILENAME)
    return [name for name in EXPORT_FILES if (folder / name).is_file()]


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:  # safetensors checks the header and that the data is as long as it says, reading no tensor
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: any failure means unreadable
        raise HubError(f"{path} is not a readable safetensors file (corrupt or truncated): {describe_cause(e)}; "
                       "re-run the export") from e


def push_folder(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
) -> str:
    """Upload the export in ``folder`` to the model repo ``repo_id``; return the repo URL.

    The repo is created if needed (``private`` applies to a new repo); with
    ``revision`` the branch is created if needed.  On failure the local folder
    is left as is and the error says what to retry.

        >>> push_folder("outputs/run/hub", "my-org/resnet50-st3-90", private=True)  # doctest: +SKIP
        'https://huggingface.co/my-org/resnet50-st3-90'
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    token = resolve_token(token, repo_id)
    files = files_to_upload(folder)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=files,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )
    except Exception as e:
        raise _upload_error(folder, repo_id, e) from e
    return str(repo_url)


def _upload_error(folder: PathLike, repo_id: str, error: Exception) -> HubError:
    """The one-line error for a failed create/upload: a rejected token is an auth problem, the rest a retry."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return HubAuthError(
            f"the Hub refused the token for {repo_id!r} (HTTP {status}: {describe_cause(error)}); the local folder "
            "is unchanged: check `hf auth whoami` and that the token has write access to the repo's owner"
        )
    return HubUploadError(
        f"pushing {folder} to {repo_id!r} failed ({describe_cause(error)}); the local folder is unchanged, "
        "fix the cause and run the push again"
    )
