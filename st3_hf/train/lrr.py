"""Training phases as the ST-3 reference runs them, and the best weights of a phase that a rewind reloads.
``ramp``: one pruning run; ``lrr``: the run, then the lr schedule restarts and as many epochs train with frozen
masks; ``iterative`` (Renda et al. 2020): ``rounds`` rounds, round ``r >= 1`` starting with the lr reset and a hard
global threshold to ``1 - (1 - round_fraction) ** r`` (masks fixed within a round). ``finetune_epochs`` appends
frozen-mask epochs with the lr schedule continuing past its end (the reference's cosine rises again).

    >>> [(p.name, p.start_epoch, p.epochs) for p in training_phases("lrr", 4, finetune_epochs=1)]
    [('prune', 0, 4), ('retrain', 4, 4), ('finetune', 8, 1)]
    >>> round(round_sparsity(2, 0.2), 4)
    0.36
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from st3_hf.hub.state_io import load_sparsifier_state, save_sparsifier_state

BEST_WEIGHTS = "best_weights.safetensors"
BEST_SPARSIFIER = "best_sparsifier"  # a sub-folder: sparsifier.{safetensors,json} of the best evaluation


@dataclass(frozen=True)
class Phase:
    name: str  # prune | retrain | round | finetune
    start_epoch: int
    epochs: int
    restart_lr: bool  # the learning-rate schedule starts again here
    freeze: bool  # masks are frozen from the start of this phase
    sparsity: Optional[float] = None  # iterative rounds: hard global threshold to this sparsity at the start

    @property
    def end_epoch(self) -> int:
        return self.start_epoch + self.epochs


def round_sparsity(round_index: int, round_fraction: float) -> float:
    """Sparsity of iterative round ``r``: each round prunes ``round_fraction`` of what remains."""
    return 1.0 - (1.0 - round_fraction) ** round_index


def training_phases(schedule: str, epochs: int, finetune_epochs: int = 0, rounds: int = 1,
                    round_fraction: float = 0.2) -> List[Phase]:
    """The phases of a run (see the module docstring; the recipe has validated the arguments)."""
    phases = [Phase("prune", 0, epochs, restart_lr=False, freeze=False)]
    if schedule == "lrr":
        phases.append(Phase("retrain", epochs, epochs, restart_lr=True, freeze=True))
    elif schedule != "ramp":  # iterative
        phases = [Phase("round", r * epochs, epochs, restart_lr=r > 0, freeze=True,
                        sparsity=round_sparsity(r, round_fraction) if r > 0 else None) for r in range(rounds)]
    if finetune_epochs:
        phases.append(Phase("finetune", phases[-1].end_epoch, finetune_epochs, restart_lr=False, freeze=True))
    return phases


def phase_at(phases: List[Phase], epoch: int) -> Tuple[int, Phase]:
    """``(index, phase)`` of the phase that trains ``epoch`` (the last one past the end)."""
    return next(((i, phase) for i, phase in enumerate(phases) if epoch < phase.end_epoch), (len(phases) - 1, phases[-1]))


def schedule_step(phases: List[Phase], step: int, steps_per_epoch: int) -> Tuple[int, bool]:
    """``(step within the current learning-rate schedule, past its end?)`` for optimizer step ``step``: the
    schedule restarts at each phase with ``restart_lr``; the fine-tuning phase runs on past its end."""
    _, phase = phase_at(phases, step // steps_per_epoch)
    start = max((p.start_epoch for p in phases if p.restart_lr and p.start_epoch <= phase.start_epoch), default=0)
    return step - start * steps_per_epoch, phase.name == "finetune"


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
    """Model weights and sparsifier state at the best evaluation (top-1) of the current phase, for the rewind
    (docs/method.md); on the CPU and in every checkpoint, so a resumed run rewinds to the same weights."""

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
                raise FileNotFoundError(f"{folder} names best weights (step {meta.get('step')}) but has no {BEST_WEIGHTS}")
            self._weights = load_file(str(Path(folder) / BEST_WEIGHTS))
            self._sparsifier = load_sparsifier_state(Path(folder) / BEST_SPARSIFIER)
            self.meta = dict(meta)

    def clear(self) -> None:
        """Forget the copy (after a rewind used it: the next phase keeps its own best)."""
        self.meta: Optional[Dict[str, Any]] = None  # step, epoch, phase_index, eval_top1 of the copy
        self._weights: Dict[str, torch.Tensor] = {}
        self._sparsifier: Dict[str, Any] = {}
