"""Where ``model.init_from`` points: a local folder (resolved like ``inherit:``) or a Hub repo id.

A relative path in a recipe file is relative to that file's folder, on the command line to the working directory.
A value shaped like a Hub id (``ORG/NAME``) that is no local folder stays a Hub id; anything else is a path, and a
path that does not exist is an error at start, never a silent Hub lookup.

    >>> from pathlib import Path
    >>> resolve_init_from("st3-hf/resnet50-st3-98", Path("recipes"))
    'st3-hf/resnet50-st3-98'
    >>> resolve_init_from("../outputs/quickstart", Path("/repo/recipes"))
    '/repo/outputs/quickstart'
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from st3_hf.errors import ConfigError
from st3_hf.hub.pretrained import HUB_PREFIX

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_hub_id(value: str) -> bool:
    """``ORG/NAME`` (or ``hf-hub:ORG/NAME``): the shape of a Hugging Face model repo id."""
    name = value[len(HUB_PREFIX):] if value.startswith(HUB_PREFIX) else value
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_init_from(value: str, base_dir: Path) -> str:
    """``value`` as an absolute path when it is one (relative ones against ``base_dir``), else the Hub id."""
    if value.startswith(HUB_PREFIX):
        return value
    candidate = Path(base_dir) / os.path.expanduser(value)  # an absolute path replaces base_dir
    if os.path.exists(candidate) or not is_hub_id(value):  # False for a NUL byte or a name too long, too
        return os.path.normpath(str(candidate.absolute()))
    return value


def check_init_from(value: Optional[str]) -> None:
    """Raise :class:`~st3_hf.errors.ConfigError` when ``model.init_from`` is a path that does not exist."""
    if value and not os.path.exists(value) and not is_hub_id(value):
        raise ConfigError(f"model.init_from {value!r} does not exist (a relative path in a recipe is relative to the "
                          f"recipe file's folder, like inherit:; on the command line to the working directory): point "
                          f"it at an exported folder or checkpoint, or at a Hub repo id ORG/NAME")
