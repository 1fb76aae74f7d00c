"""Training phases as the ST-3 reference runs them (pure Python): ``ramp``, one pruning run; ``lrr``, the run,
then the lr schedule restarts and as many epochs train with frozen masks; ``iterative`` (Renda et al. 2020),
``rounds`` rounds, round ``r >= 1`` starting with the lr reset and a hard global threshold to ``1 - (1 -
round_fraction) ** r`` (masks fixed within a round). ``finetune_epochs`` appends frozen-mask epochs with the lr
schedule continuing past its end (the reference's cosine rises again).

    >>> [(p.name, p.start_epoch, p.epochs) for p in training_phases("lrr", 4, finetune_epochs=1)]
    [('prune', 0, 4), ('retrain', 4, 4), ('finetune', 8, 1)]
    >>> round(round_sparsity(2, 0.2), 4)
    0.36
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple


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
    if schedule == "ramp":
        phases = [Phase("prune", 0, epochs, restart_lr=False, freeze=False)]
    elif schedule == "lrr":
        phases = [Phase("prune", 0, epochs, restart_lr=False, freeze=False),
                  Phase("retrain", epochs, epochs, restart_lr=True, freeze=True)]
    else:  # iterative
        phases = [Phase("round", r * epochs, epochs, restart_lr=r > 0, freeze=True,
                        sparsity=round_sparsity(r, round_fraction) if r > 0 else None) for r in range(rounds)]
    if finetune_epochs:
        start = phases[-1].end_epoch
        phases.append(Phase("finetune", start, finetune_epochs, restart_lr=False, freeze=True))
    return phases


def total_epochs(phases: List[Phase]) -> int:
    return phases[-1].end_epoch


def phase_at(phases: List[Phase], epoch: int) -> Tuple[int, Phase]:
    """``(index, phase)`` of the phase that trains ``epoch`` (the last one past the end)."""
    for index, phase in enumerate(phases):
        if epoch < phase.end_epoch:
            return index, phase
    return len(phases) - 1, phases[-1]


def schedule_step(phases: List[Phase], step: int, steps_per_epoch: int) -> Tuple[int, bool]:
    """``(step within the current learning-rate schedule, past its end?)`` for optimizer step ``step``: the
    schedule restarts at each phase with ``restart_lr``; the fine-tuning phase runs on past its end."""
    _, phase = phase_at(phases, step // steps_per_epoch)
    start = max((p.start_epoch for p in phases if p.restart_lr and p.start_epoch <= phase.start_epoch), default=0)
    return step - start * steps_per_epoch, phase.name == "finetune"
