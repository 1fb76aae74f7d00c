"""Skip optimizer updates whose loss or gradient is NaN/inf, and stop a run that keeps producing them.

A skipped update changes nothing: no optimizer step (so the sparsity schedule does not advance), no LR-scheduler
step, and the buffers the bad forward passes touched (BatchNorm running statistics, batch counts) are put back.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
>>> guard = NonFiniteGuard(model, max_consecutive=3)
>>> guard.update_is_finite(torch.tensor(float("nan")), grad_norm=None)
False
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn

from st3_hf.errors import RunError
from st3_hf.sparse.layers import SparseLayerMixin


class NonFiniteGuard:
    """Decides once per optimizer update whether it may be applied; counts bad updates in a row.
    ``reduce_flags`` (e.g. a sum over processes) makes every rank take the same decision."""

    def __init__(self, model: nn.Module, max_consecutive: int,
                 reduce_flags: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.max_consecutive, self.reduce_flags, self.consecutive = max_consecutive, reduce_flags, 0
        self.bad_steps: List[int] = []
        # what a forward pass updates (BatchNorm statistics); not the sparse layers' buffers (effective weight,
        # mask, threshold): only an applied update changes them, and copying them every step costs a model's traffic
        self._buffers = [b for m in model.modules() if not isinstance(m, SparseLayerMixin)
                         for b in m.buffers(recurse=False)]
        self._saved = [b.detach().clone() for b in self._buffers]

    @torch.no_grad()
    def update_is_finite(self, window_loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> bool:
        """True when the summed loss of the accumulation window and the gradient norm are finite (one host sync)."""
        bad = ~torch.isfinite(window_loss.detach().float())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float().to(bad.device))
        flag = bad.float().reshape(1)
        return not bool((flag if self.reduce_flags is None else self.reduce_flags(flag)).item() > 0)

    @torch.no_grad()
    def commit(self) -> None:
        """The update was applied: remember the buffers as the state to return to."""
        self.consecutive = 0
        if self._buffers:
            torch._foreach_copy_(self._saved, [b.detach() for b in self._buffers])

    @torch.no_grad()
    def reject(self, step: int) -> None:
        """The update was skipped: restore the buffers and count it (see :attr:`exhausted`)."""
        if self._buffers:
            torch._foreach_copy_([b.data for b in self._buffers], self._saved)
        self.consecutive += 1
        self.bad_steps.append(step)

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def diverged_error(self, checkpoint: Optional[str]) -> RunError:
        first = self.bad_steps[-self.consecutive]
        saved = f"checkpoint {checkpoint} holds the last finite state" if checkpoint else "no checkpoint was written"
        return RunError(f"{self.consecutive} consecutive updates (steps {first}-{self.bad_steps[-1]}) had a non-finite "
                        f"loss or gradient; {saved}; lower the learning rate or check the data, then resume with "
                        f"training.resume_from_checkpoint=latest")
