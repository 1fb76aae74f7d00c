"""Sparsifier state on disk without pickle: tensors in safetensors, the rest in JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

from safetensors.torch import load_file, save_file

SPARSIFIER_TENSORS = "sparsifier.safetensors"
SPARSIFIER_JSON = "sparsifier.json"
_TENSOR_GROUPS = ("thresholds", "masks")
_OPTIONAL_TENSOR_GROUPS = ("probas", "sampled_masks")  # ProbMask only


def save_sparsifier_state(state: Dict[str, Any], folder: Union[str, Path]) -> None:
    """Write :meth:`Sparsifier.state_dict` to ``folder/sparsifier.{safetensors,json}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = _TENSOR_GROUPS + tuple(g for g in _OPTIONAL_TENSOR_GROUPS if g in state)
    tensors = {f"{group}/{name}": t.detach().cpu().contiguous() for group in groups for name, t in state[group].items()}
    tensors["global_threshold"] = state["global_threshold"].detach().cpu().reshape(1).float()
    save_file(tensors, str(folder / SPARSIFIER_TENSORS))
    plain = {k: v for k, v in state.items() if k not in groups and k != "global_threshold"}
    (folder / SPARSIFIER_JSON).write_text(json.dumps(plain, indent=1, sort_keys=True))


def load_sparsifier_state(folder: Union[str, Path]) -> Dict[str, Any]:
    """Read what :func:`save_sparsifier_state` wrote (no pickle involved)."""
    folder = Path(folder)
    json_path, tensor_path = folder / SPARSIFIER_JSON, folder / SPARSIFIER_TENSORS
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise FileNotFoundError(f"no sparsifier state in {folder}: {p.name} is missing")
    state: Dict[str, Any] = {**json.loads(json_path.read_text()), **{group: {} for group in _TENSOR_GROUPS}}
    tensors = load_file(str(tensor_path))
    state["global_threshold"] = tensors.pop("global_threshold").reshape(())
    for key, t in tensors.items():
        group, name = key.split("/", 1)
        state.setdefault(group, {})[name] = t
    return state
