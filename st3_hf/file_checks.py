"""Is a weights file intact? Answered from headers, sizes and CRCs, never by unpickling anything.

Used for training checkpoints (before ``resume_from_checkpoint``) and for exports (before a push).
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from .errors import describe_cause


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not an intact safetensors file, or None.

    The header must parse, the data section must be exactly as long as the header says (catches
    truncation), and safetensors' own validation of the header must pass.
    """
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"{path.name} has a corrupt header (declares {header_len} header bytes, file has {size})"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return f"{path.name} has a corrupt header (not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} has a corrupt header (not a mapping)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + header_len + (max(ends) if ends else 0)
    if expected != size:
        return f"{path.name} is {size} bytes but its header describes {expected} (truncated or overwritten)"
    try:  # the library's own validation on top (offsets, dtypes, shapes); it reads the header only
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: any failure means unreadable
        return f"{path.name} is not a readable safetensors file ({describe_cause(err)})"
    return None


def torch_zip_problem(path: Path) -> Optional[str]:
    """``torch.save`` files are zip archives with CRCs: a cut or flipped byte shows without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{path.name} is not a readable torch file ({err})"
    return f"{path.name} is corrupt (bad CRC in {bad})" if bad else None
