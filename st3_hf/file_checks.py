"""Is a weights file intact? Answered from headers, sizes and CRCs, never by unpickling anything.

Used for training checkpoints (before ``resume_from_checkpoint``) and for exports (before a push).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from st3_hf.errors import describe_cause


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not an intact safetensors file, or None (safetensors' own header validation also checks
    that the data section covers the file exactly: a truncated or extended file fails it)."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: any failure means unreadable
        return (f"{path.name} is not a readable safetensors file (a corrupt header, or corrupt or truncated data): "
                f"{describe_cause(err)}")
    return None


def torch_zip_problem(path: Path) -> Optional[str]:
    """``torch.save`` files are zip archives with CRCs: a cut or flipped byte shows without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{path.name} is not a readable torch file ({err})"
    return f"{path.name} is corrupt (bad CRC in {bad})" if bad else None
