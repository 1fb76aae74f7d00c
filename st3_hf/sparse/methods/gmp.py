"""The baselines of ST-3's layer (docs/method.md, "Baselines of the same layer"): GMP, hard STE, dense."""
from __future__ import annotations

from typing import Any

from st3_hf.sparse.methods.base import refuse, register
from st3_hf.sparse.methods.st3 import ST3


@register("gmp")
class GMP(ST3):
    """Gradual magnitude pruning (Zhu & Gupta 2017): ``q = w m``, gradient masked."""

    soft_threshold = rescale = straight_through = False


@register("ste_hard")
class SteHard(ST3):
    """Hard threshold with a straight-through gradient: ``q = w m``, ``dL/dw = dL/dq``."""

    soft_threshold = rescale = False


@register("dense")
class Dense(SteHard):
    """No pruning (target 0): a dense baseline trained by the same loop."""

    @classmethod
    def check(cls, config: Any) -> None:
        if config.target != 0:
            refuse("target", f"must be 0 when the method is 'dense', got {config.target}")
