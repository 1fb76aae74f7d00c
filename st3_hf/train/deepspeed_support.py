"""ST-3 under DeepSpeed ZeRO-1/2: thresholds and masks from the fp32 master weights, dtypes the engine expects.

Under ZeRO-1/2 every rank holds the whole (fp32 or bf16) module, while the optimizer's fp32 master
copy is partitioned over the ranks and the update happens inside the engine. The module copy is
bf16 under ``mixed_precision: bf16``: a threshold taken from it is not the threshold of the weights
being trained, and the sparsity would be off by the rounding. :class:`DeepSpeedSparsity` therefore
runs every sparsifier operation on the assembled fp32 masters (``deepspeed.utils.safe_get_full_fp32_param``,
one all-reduce per prunable layer), writes weights the sparsifier changes (freezing) back into the
masters, and casts inputs to the engine's dtype and logits back to fp32.

    >>> ds = DeepSpeedSparsity(sparsifier, engine)  # doctest: +SKIP
    >>> ds.step()    # after accelerator.backward(loss) on a step the engine applied  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch
import torch.nn as nn

from st3_hf.sparse.layers import SparseLayerMixin
from st3_hf.sparse.sparsifier import Sparsifier
def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the DeepSpeed engine keeps the module in."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class DeepSpeedSparsity:
    """Drives a :class:`~st3_hf.Sparsifier` whose model is wrapped by a DeepSpeed ZeRO-1/2 engine."""

    def __init__(self, sparsifier: Sparsifier, engine: Any):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        stage = int(engine.zero_optimization_stage())
        if stage not in (0, 1, 2):
            raise ValueError(f"DeepSpeedSparsity supports ZeRO stages 0-2, got {stage}")
        self.sparsifier = sparsifier
        self.engine = engine
        self.dtype = engine_dtype(engine)
        self._hooks: List[Any] = []
        self._get_fp32 = safe_get_full_fp32_param
        self._set_fp32 = safe_set_full_fp32_param
        for _, layer in sparsifier.named_layers():
            # module.bfloat16() converted the threshold buffer too; it must stay exact
            layer.threshold = layer.threshold.float()
        self._cast_effective()
        if self.dtype != torch.float32:
            module = engine.module
            # the engine converts parameters only; BatchNorm statistics must match the activations' dtype
            for sub in module.modules():
                if isinstance(sub, SparseLayerMixin):
                    continue
                for key, buf in list(sub._buffers.items()):
                    if buf is not None and buf.is_floating_point():
                        sub._buffers[key] = buf.to(self.dtype)
            self._hooks = [
                module.register_forward_pre_hook(lambda m, args: tuple(_cast_floating(a, self.dtype) for a in args)),
                module.register_forward_hook(lambda m, args, out: _cast_floating(out, torch.float32)),
            ]

    def _masters(self) -> Dict[str, torch.Tensor]:
        """Full fp32 master weight of every prunable layer (a collective: every rank calls it)."""
        masters = {}
        for name, layer in self.sparsifier.named_layers():
            full = self._get_fp32(layer.latent_weight)
            if full is None:
                raise RuntimeError(f"DeepSpeed holds no fp32 master for {name}.weight (is it trained by the engine?)")
            masters[name] = full
        return masters

    @contextlib.contextmanager
    def _on_masters(self, write_back: bool) -> Iterator[None]:
        """Point each prunable layer's ``weight`` at its fp32 master while the sparsifier works."""
        masters = self._masters()
        saved: List[tuple] = []
        try:
            for name, layer in self.sparsifier.named_layers():
                saved.append((layer, layer.latent_weight.data))
                layer.latent_weight.data = masters[name]
            yield
        finally:
            for layer, module_copy in saved:
                layer.latent_weight.data = module_copy
        if write_back:
            for name, layer in self.sparsifier.named_layers():
                self._set_fp32(layer.latent_weight, masters[name])
                layer.latent_weight.data.copy_(masters[name])
                layer._synced_version = layer.latent_weight._version
        self._cast_effective()

    def _cast_effective(self) -> None:
        for _, layer in self.sparsifier.named_layers():
            if layer.effective.dtype != layer.latent_weight.dtype:
                layer.effective = layer.effective.to(layer.latent_weight.dtype)
            layer._synced_version = layer.latent_weight._version

    def step(self) -> None:
        """:meth:`Sparsifier.step` on the masters (frozen: re-zeroes the pruned masters too)."""
        with self._on_masters(write_back=self.sparsifier.frozen):
            self.sparsifier.step()

    def refresh(self) -> None:
        """Effective weights from the masters (after ``prepare`` and after ``accelerator.load_state``)."""
        with self._on_masters(write_back=self.sparsifier.frozen):
            self.sparsifier.refresh()

    def freeze(self) -> None:
        """:meth:`Sparsifier.freeze` with the effective weights written into the masters."""
        with self._on_masters(write_back=True):
            self.sparsifier.freeze()

    @torch.no_grad()
    def full_precision_model(self, model: nn.Module) -> nn.Module:
        """``model`` (the engine's module) turned back to fp32 with every parameter set to its master (collective).

        For the export at the end of training: the masters are the weights that were trained.
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for param in model.parameters():
            full = self._get_fp32(param)
            param.data = full.reshape(param.shape).clone() if full is not None else param.data.float()
        for module in model.modules():
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    module._buffers[key] = buf.float()
        for _, layer in self.sparsifier.named_layers():
            layer._synced_version = -1  # effective weights are recomputed from the fp32 weights on the next read
        return model
