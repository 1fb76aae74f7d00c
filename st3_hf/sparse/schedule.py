"""The cubic sparsity ramp of ST-3 (Zhu & Gupta's schedule, counted in optimizer steps)."""
from __future__ import annotations


def cubic_sparsity(step: int, target: float, start_step: int, end_step: int, power: float = 3.0) -> float:
    """Sparsity ratio after ``step`` optimizer updates.

    >>> cubic_sparsity(0, 0.9, 0, 100)
    0.0
    >>> cubic_sparsity(100, 0.9, 0, 100)
    0.9
    """
    if step < start_step:
        return 0.0
    if step >= end_step:
        return float(target)
    progress = (step - start_step) / (end_step - start_step)
    return float(target) * (1.0 - (1.0 - progress) ** power)
