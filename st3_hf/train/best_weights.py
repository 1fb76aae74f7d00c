"""The best evaluated weights of a training phase, for the LRR / iterative rewind (docs/method.md:
the best checkpoint is reloaded): the highest eval top-1 of the phase, a tie keeping the earlier (a resumed run
re-evaluating a step keeps the same copy). Kept in memory (CPU) and in every checkpoint as safetensors, so a run
killed mid-phase and resumed rewinds to the same weights.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from st3_hf.hub.state_io import load_sparsifier_state, save_sparsifier_state

BEST_WEIGHTS = "best_weights.safetensors"
BEST_SPARSIFIER = "best_sparsifier"  # a sub-folder: sparsifier.{safetensors,json} of the best evaluation


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict (sorted keys, dtype, shape, bytes): equal iff the tensors are identical."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cpu_copy(value: Any) -> Any:
    """A copy that shares no storage with the model (``.cpu()`` of a CPU tensor would)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    return copy.deepcopy(value)


class BestWeights:
    """Model weights and sparsifier state at the best evaluation of the current phase."""

    def __init__(self) -> None:
        self.clear()

    def offer(self, top1: float, model: nn.Module, sparsifier, meta: Dict[str, Any]) -> bool:
        """Keep a copy if ``top1`` beats the best of this phase (ties keep the earlier); True if kept."""
        if self.for_phase(meta["phase_index"]) is not None and top1 <= self.meta["eval_top1"]:
            return False
        self.meta = {**meta, "eval_top1": float(top1)}
        self._weights, self._sparsifier = _cpu_copy(model.state_dict()), _cpu_copy(sparsifier.state_dict())
        return True

    def for_phase(self, phase_index: int) -> Optional[Dict[str, Any]]:
        """The copy's metadata if it belongs to ``phase_index`` (else None)."""
        return self.meta if self.meta is not None and self.meta["phase_index"] == phase_index else None

    @torch.no_grad()
    def restore(self, model: nn.Module, sparsifier) -> str:
        """Load the copy into ``model`` and ``sparsifier``; returns :func:`weights_digest` of what was loaded."""
        if self.meta is None:
            raise RuntimeError("no best weights to rewind to")
        model.load_state_dict(self._weights)
        sparsifier.load_state_dict(self._sparsifier)
        sparsifier.refresh()
        return weights_digest(model.state_dict())

    def save(self, folder: Path) -> None:
        """Into a checkpoint folder (the checkpoint's own temporary folder: published atomically with it)."""
        if self.meta is not None:
            save_file(self._weights, str(Path(folder) / BEST_WEIGHTS))
            save_sparsifier_state(self._sparsifier, Path(folder) / BEST_SPARSIFIER)

    def load(self, folder: Path, meta: Optional[Dict[str, Any]]) -> None:
        """What :meth:`save` wrote; ``meta`` comes from the checkpoint's trainer state (None: no copy)."""
        self.clear()
        if meta is not None:
            if not (Path(folder) / BEST_WEIGHTS).is_file():
                raise FileNotFoundError(f"{folder} names best weights (step {meta.get('step')}) but has no "
                                        f"{BEST_WEIGHTS}")
            self._weights = load_file(str(Path(folder) / BEST_WEIGHTS))
            self._sparsifier = load_sparsifier_state(Path(folder) / BEST_SPARSIFIER)
            self.meta = dict(meta)

    def clear(self) -> None:
        """Forget the copy (after a rewind used it: the next phase keeps its own best)."""
        self.meta: Optional[Dict[str, Any]] = None  # step, epoch, phase_index, eval_top1 of the copy
        self._weights: Dict[str, torch.Tensor] = {}
        self._sparsifier: Dict[str, Any] = {}
