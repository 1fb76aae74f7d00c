"""Upload an export to the Hub (``create_repo`` + ``upload_folder``, as timm's push does), all local checks first.

Only the export's files go up, from a copy whose text files name the recipe's local paths by their last component
(a machine's folders are nobody's business on the Hub); the local folder is never modified.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from st3_hf.errors import ModelError, RunError, describe_cause
from st3_hf.file_checks import safetensors_problem
from st3_hf.hub.compact import COMPACT_FILENAME
from st3_hf.hub.export import EXPORT_FILES, RECIPE_FILENAME, REQUIRED_FILES, WEIGHTS_FILENAME

DEFAULT_COMMIT_MESSAGE = "Upload sparse model exported by st3_hf"


def check_repo_id(repo_id: str) -> str:
    """Raise :class:`~st3_hf.errors.ModelError` unless ``repo_id`` is a valid ``ORG/NAME`` model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ModelError(f"repo id must look like 'ORG/NAME', got {repo_id!r}: pass e.g. my-org/resnet50-st3-90")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelError(f"invalid Hub repo id {repo_id!r}: {describe_cause(e)}") from e
    return repo_id


def resolve_token(token: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """The token to push with: the argument, else ``HF_TOKEN`` or ``hf auth login``'s (``get_token``)."""
    from huggingface_hub import get_token

    if not (token := token or get_token()):
        raise ModelError(f"cannot push{f' to {repo_id!r}' if repo_id else ''}: no Hugging Face token found: pass "
                         "token=..., set the HF_TOKEN environment variable, or log in once with `hf auth login`")
    return token


def files_to_upload(folder: Union[str, Path]) -> List[str]:
    """The exact file list of an export in ``folder``; raise if a required file is missing or unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder: pass the folder written by scripts/export.py")
    if missing := [n for n in REQUIRED_FILES if not (folder / n).is_file() or (folder / n).stat().st_size == 0]:
        raise ModelError(f"{folder} is not a complete st3_hf export: missing or empty {missing} (re-run the export)")
    for name in (WEIGHTS_FILENAME, COMPACT_FILENAME):
        if problem := safetensors_problem(folder / name):
            raise ModelError(f"{folder}/{problem}; re-run the export")
    return [name for name in EXPORT_FILES if (folder / name).is_file()]


def stage_without_local_paths(folder: Path, files: List[str], staging: Path) -> Dict[str, str]:
    """``files`` of ``folder`` in ``staging``, the rest linked, text files with each absolute path of the recipe
    (any string value) cut to its last component; returns those replacements, longest path first."""
    def strings(value: Any) -> List[str]:
        if isinstance(value, (dict, list)):
            return [s for v in (value.values() if isinstance(value, dict) else value) for s in strings(v)]
        return [value] if isinstance(value, str) else []

    recipe, values = folder / RECIPE_FILENAME, []
    if recipe.is_file():
        try:
            values = strings(yaml.safe_load(recipe.read_text(encoding="utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ModelError(f"{recipe} is not readable YAML ({describe_cause(e)}); re-run the export") from e
    paths = {v: Path(os.path.expanduser(v)).name or v for v in values if v.startswith(("/", "~")) and len(v) > 1}
    paths = dict(sorted(paths.items(), key=lambda item: -len(item[0])))  # /a/b before /a
    for name in files:
        if name.endswith((".safetensors", ".png")) or not paths:
            (staging / name).symlink_to((folder / name).resolve())
            continue
        text = (folder / name).read_text(encoding="utf-8")
        for path, last in paths.items():
            text = text.replace(path, last)
        (staging / name).write_text(text, encoding="utf-8")
    return paths


def push_folder(folder: Union[str, Path], repo_id: str, *, private: bool = False, revision: Optional[str] = None,
                token: Optional[str] = None, commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
    """Upload the export in ``folder`` to the model repo ``repo_id`` (created if needed; so is ``revision``'s branch).

        >>> push_folder("outputs/run/hub", "my-org/resnet50-st3-90", private=True)  # doctest: +SKIP
        'https://huggingface.co/my-org/resnet50-st3-90'
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    token = resolve_token(token, repo_id)
    files, api = files_to_upload(folder), HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="st3-push-") as staging:
        try:
            replaced = stage_without_local_paths(Path(folder), files, Path(staging))
            if replaced:
                print(f"pushing a copy of {folder} whose text files (card, recipe, metrics) name local paths by their "
                      "last component only: " + ", ".join(f"{path} -> {last}" for path, last in replaced.items()))
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=staging, allow_patterns=files, repo_type="model",
                              revision=revision, commit_message=commit_message)
        except Exception as e:  # a rejected token is an auth problem, the rest a retry
            if (status := getattr(getattr(e, "response", None), "status_code", None)) in (401, 403):
                raise ModelError(f"the Hub refused the token for {repo_id!r} (HTTP {status}: {describe_cause(e)}); the "
                                 "local folder is unchanged: check `hf auth whoami` and that the token has write "
                                 "access to the repo's owner") from e
            raise RunError(f"pushing {folder} to {repo_id!r} failed ({describe_cause(e)}); the local folder is "
                           "unchanged, fix the cause and run the push again") from e
    return str(repo_url)
