"""Configuration of a sparsification run (:class:`SparsityConfig`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple, get_args

from st3_hf.sparse.methods import METHODS, refuse

# the built-in methods (st3_hf/sparse/methods/), in the registry's order; any registered method is valid
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]
Criterion = Literal["l1", "l1std"]
CRITERIA: Tuple[str, ...] = get_args(Criterion)
SWITCHES = ("criterion", "soft_threshold", "rescale", "straight_through")


@dataclass
class SparsityConfig:
    """How a model is sparsified: ``method`` picks the defaults of the other switches (``criterion``,
    ``soft_threshold``, ``rescale``, ``straight_through``; set any for ablations). The schedule is the
    cubic ramp of docs/method.md (:func:`~st3_hf.cubic_sparsity`), counted in *optimizer steps*::

        >>> cfg = SparsityConfig(method="st3", target=0.9, start_step=0, end_step=1000)
        >>> cfg.criterion
        'l1'
    """

    method: Method = "st3"
    target: float = 0.9
    start_step: int = 0
    end_step: int = 1000
    power: float = 3.0
    criterion: Optional[Criterion] = None
    soft_threshold: Optional[bool] = None
    rescale: Optional[bool] = None
    straight_through: Optional[bool] = None
    exclude: Tuple[str, ...] = field(default_factory=tuple)
    # one method's own keys (its config_keys; it fills their defaults and checks them); Feather: p-norm
    # exponent (default 3), gradient scale of pruned weights (0.5 above 95% target, else 1)
    p: Optional[float] = None
    theta: Optional[float] = None
    # ProbMask only: the temperature follows the epoch (steps_per_epoch) of a run of temperature_epochs
    # epochs; mask_seed seeds the Bernoulli draw of the final masks
    steps_per_epoch: Optional[int] = None
    temperature_epochs: Optional[int] = None
    mask_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if (method := METHODS.get(self.method)) is None:
            valid = ", ".join(METHODS)
            refuse("method", f"is {self.method!r}; valid methods: {valid}",
                   f"unknown sparsity method {self.method!r}; valid methods: {valid}")
        for key in SWITCHES:  # the method's own switches where the user set none
            if getattr(self, key) is None:
                setattr(self, key, getattr(method, key))
        if self.criterion not in CRITERIA:
            refuse("criterion", f"is {self.criterion!r}; valid criteria: {', '.join(CRITERIA)}")
        if not 0.0 <= float(self.target) < 1.0:
            refuse("target", f"must be in [0, 1) (a fraction of pruned weights), got {self.target}")
        if self.start_step < 0 or self.end_step < self.start_step:
            refuse("start_step", f"must satisfy 0 <= start_step <= end_step, got start_step={self.start_step}, "
                                 f"end_step={self.end_step}")
        if self.power <= 0:
            refuse("power", f"must be > 0, got {self.power}")
        self.exclude = tuple(self.exclude)
        for owner, other in METHODS.items():  # switches only one method reads would silently do nothing
            for key in other.config_keys:
                if getattr(self, key) is not None and key not in method.config_keys:
                    problem = f"is a {owner} setting; method {self.method!r} does not use it"
                    refuse(key, problem, f"{key!r} {problem}")
        method.check(self)

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SparsityConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - names:
            raise ValueError(f"unknown SparsityConfig keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)
