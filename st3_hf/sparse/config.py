"""Configuration of a sparsification run (:class:`SparsityConfig`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple, get_args

from st3_hf.sparse.feather import DEFAULT_P, default_theta

Method = Literal["st3", "st3_sigma", "gmp", "ste_hard", "feather", "probmask", "dense"]
Criterion = Literal["l1", "l1std"]
METHODS: Tuple[str, ...] = get_args(Method)
CRITERIA: Tuple[str, ...] = get_args(Criterion)

# method -> (criterion, soft_threshold, rescale, straight_through); feather's "soft threshold" is its p-norm
# operator (feather.py); probmask (probmask.py) is the original's hard mask without STE, soft_threshold /
# rescale give the ST-3 reference's other variants
METHOD_DEFAULTS: Dict[str, Tuple[str, bool, bool, bool]] = {
    "st3": ("l1", True, True, True), "st3_sigma": ("l1std", True, True, True), "gmp": ("l1", False, False, False),
    "ste_hard": ("l1", False, False, True), "dense": ("l1", False, False, True), "feather": ("l1", True, False, True),
    "probmask": ("l1", False, False, False),
}
# switches that only one method reads: setting them for another method would silently do nothing
METHOD_ONLY_KEYS = {"p": "feather", "theta": "feather", "steps_per_epoch": "probmask",
                    "temperature_epochs": "probmask", "mask_seed": "probmask"}


class SparsityConfigError(ValueError):
    """A :class:`SparsityConfig` value that makes no sense: ``key`` names the field, ``problem`` says why."""

    def __init__(self, key: str, problem: str, message: Optional[str] = None):
        super().__init__(message or f"{key} {problem}")
        self.key, self.problem = key, problem


def _refuse(key: str, problem: str, message: Optional[str] = None) -> None:
    raise SparsityConfigError(key, problem, message)


@dataclass
class SparsityConfig:
    """How a model is sparsified: ``method`` picks the defaults of the other switches (``criterion``,
    ``soft_threshold``, ``rescale``, ``straight_through``; set any for ablations). The schedule is the
    cubic ramp of docs/method.md, counted in *optimizer steps*::

        ratio(s) = 0                                     s <  start_step
                 = target * (1 - (1 - (s - start) / (end - start)) ** power)
                 = target                                s >= end_step

    Example::

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
    # Feather only: p-norm exponent (default 3), gradient scale of pruned weights (0.5 above 95% target, else 1)
    p: Optional[float] = None
    theta: Optional[float] = None
    # ProbMask only: the temperature follows the epoch (steps_per_epoch) of a run of temperature_epochs
    # epochs; mask_seed seeds the Bernoulli draw of the final masks
    steps_per_epoch: Optional[int] = None
    temperature_epochs: Optional[int] = None
    mask_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.method not in METHOD_DEFAULTS:
            _refuse("method", f"is {self.method!r}; valid methods: {', '.join(METHODS)}",
                    f"unknown sparsity method {self.method!r}; valid methods: {', '.join(METHODS)}")
        for key, default in zip(("criterion", "soft_threshold", "rescale", "straight_through"),
                                METHOD_DEFAULTS[self.method]):
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.criterion not in CRITERIA:
            _refuse("criterion", f"is {self.criterion!r}; valid criteria: {', '.join(CRITERIA)}")
        if not 0.0 <= float(self.target) < 1.0:
            _refuse("target", f"must be in [0, 1) (a fraction of pruned weights), got {self.target}")
        if self.method == "dense" and self.target != 0:
            _refuse("target", f"must be 0 when the method is 'dense', got {self.target}")
        if self.start_step < 0 or self.end_step < self.start_step:
            _refuse("start_step", f"must satisfy 0 <= start_step <= end_step, got start_step={self.start_step}, "
                                  f"end_step={self.end_step}")
        if self.power <= 0:
            _refuse("power", f"must be > 0, got {self.power}")
        self.exclude = tuple(self.exclude)
        for key, method in METHOD_ONLY_KEYS.items():
            if getattr(self, key) is not None and self.method != method:
                problem = f"is a {method} setting; method {self.method!r} does not use it"
                _refuse(key, problem, f"{key!r} {problem}")
        if self.method == "feather":
            self._check_feather()
        if self.method == "probmask":
            self._check_probmask()

    def _check_feather(self) -> None:
        self.p = DEFAULT_P if self.p is None else self.p
        self.theta = default_theta(self.target) if self.theta is None else self.theta
        if not (self.p > 0 and math.isfinite(self.p)):
            _refuse("p", f"must be a finite number > 0, got {self.p}")
        if not 0.0 <= self.theta <= 1.0:
            _refuse("theta", f"must be in [0, 1], got {self.theta}")
        if self.rescale:
            _refuse("rescale", "must stay off: feather has no rescaling step (an ST-3 switch)")
        if not (self.soft_threshold and self.straight_through):
            _refuse("soft_threshold", "and straight_through must stay on: feather always thresholds with its p-norm "
                                      "operator and a scaled straight-through gradient (theta=0 masks the gradient)")

    def _check_probmask(self) -> None:
        if self.straight_through:
            _refuse("straight_through", "must stay off: probmask trains through the sampled mask, not a "
                                        "straight-through estimator")
        if self.criterion != "l1":
            _refuse("criterion", "must stay 'l1': probmask ranks keep-probabilities, not weights")
        for key in ("steps_per_epoch", "temperature_epochs"):
            value = getattr(self, key)
            if value is None or value < 1:
                _refuse(key, f"must be >= 1 for probmask (its temperature follows the epoch), got {value}",
                        f"probmask needs {key} >= 1 (its temperature follows the epoch), got {value}")
        if self.mask_seed is None:
            self.mask_seed = 0

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SparsityConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SparsityConfig keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)
