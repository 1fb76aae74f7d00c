"""The per-update pruning of all layers at once, over one flat view of their weights.

Why: a per-layer Python loop costs ~10 small ops per layer and step (1,490 aten ops for
a ResNet-50); on a GPU each is a kernel launch, so the update was launch-bound, and on
the CPU each allocated fresh temporaries.  Here the latent weights are concatenated
once into a persistent flat buffer and every step of the method runs as a handful of
whole-model ops writing into persistent buffers: the layers' ``effective``, ``mask``
and ``threshold`` buffers *are* views into this object's flat buffers, so nothing is
copied back.  The threshold is the same exact quantile
(:func:`~st3_hf.sparse.threshold.exact_quantile`) over the same scores as the per-layer path,
and masks and soft-thresholded values are bit-identical to
:func:`~st3_hf.sparse.methods.st3.effective_weight`; the per-channel rescale uses the same per-row means
(one small reduction per layer: the only per-layer ops left).

Only the built-in rule is fused (magnitude threshold, soft or hard, optional rescale:
:mod:`~st3_hf.sparse.methods.st3`); a method whose ``fusable`` is false (a rule of its own)
makes :meth:`FusedUpdate.supports` false and takes the per-layer path.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from st3_hf.sparse.layers import SparseLayerMixin
from st3_hf.sparse.methods.st3 import rescale_factor, row_means
from st3_hf.sparse.threshold import SelectionWorkspace, exact_quantile


class FusedUpdate:
    """Flat buffers and views for ``layers`` (one device, one floating dtype, one rule).

    >>> import torch, timm
    >>> from st3_hf import sparsify
    >>> sp = sparsify(timm.create_model("resnet10t", num_classes=3), method="st3", target=0.9, end_step=10)
    >>> sp.apply(0.5); sp._fused is not None and sp._fused.bound()
    True
    """

    def __init__(self, layers: Sequence[SparseLayerMixin], score_scales: Sequence[float]) -> None:
        self.layers: List[SparseLayerMixin] = list(layers)
        first = self.layers[0]
        self.soft = bool(first.soft_threshold)
        self.rescale = bool(first.rescale)
        self.score_scales = [float(s) for s in score_scales]
        self.uniform_scale = all(s == 1.0 for s in self.score_scales)
        self._bind()

    @staticmethod
    def supports(layers: Sequence[SparseLayerMixin]) -> bool:
        """True when one fused pass computes exactly what each layer's ``compute_effective`` would."""
        if not layers:
            return False
        w0 = layers[0].latent_weight
        if not w0.is_floating_point():
            return False
        first = layers[0]
        for layer in layers:
            w = layer.latent_weight
            if not layer.sparsity_method.fusable:
                return False  # the method's own rule (Feather, ProbMask): the per-layer path
            if w.device != w0.device or w.dtype != w0.dtype or w.dim() < 1:
                return False
            if (layer.soft_threshold, layer.rescale) != (first.soft_threshold, first.rescale):
                return False
        return True

    # ------------------------------------------------------------------ buffers
    def _bind(self) -> None:
        """Create the flat buffers on the layers' device and make the layers' buffers views of them."""
        latents = [layer.latent_weight for layer in self.layers]
        device, dtype = latents[0].device, latents[0].dtype
        self.device, self.dtype = device, dtype
        self.numels = [w.numel() for w in latents]
        self.numel = sum(self.numels)
        rows = [w.shape[0] for w in latents]
        self.rows = rows
        with torch.no_grad():
            # current values travel into the flat buffers (masks of a frozen or resumed model matter)
            effective = torch.cat([layer.effective.detach().reshape(-1).to(device, dtype) for layer in self.layers])
            mask = torch.cat([layer.mask.detach().reshape(-1).to(device) for layer in self.layers])
            thresholds = torch.stack([layer.threshold.detach().reshape(()).to(device, torch.float32) for layer in self.layers])
        self.effective, self.mask, self.thresholds = effective, mask, thresholds
        self.latent_flat = torch.empty(self.numel, device=device, dtype=dtype)
        self.magnitude = torch.empty(self.numel, device=device, dtype=dtype)
        self.scratch = torch.empty(self.numel, device=device, dtype=dtype)
        self.selection = SelectionWorkspace()
        self._zero = torch.zeros((), device=device, dtype=dtype)
        self.row_scale = torch.empty(sum(rows), device=device, dtype=dtype)
        self.kept_mean = torch.empty(sum(rows), device=device, dtype=dtype)
        self.total_mean = torch.empty(sum(rows), device=device, dtype=dtype)
        self.layer_scales = torch.tensor(self.score_scales, device=device, dtype=torch.float32)
        self.layer_numels = torch.tensor(self.numels, device=device)
        self._effective_views: List[torch.Tensor] = []
        self._latent_views: List[torch.Tensor] = []
        self._effective_rows: List[torch.Tensor] = []
        self._scale_cols: List[torch.Tensor] = []
        self._kept_means: List[torch.Tensor] = []
        self._total_means: List[torch.Tensor] = []
        offset = row_offset = 0
        for i, layer in enumerate(self.layers):
            n, r = self.numels[i], rows[i]
            shape = layer.latent_weight.shape
            eff = effective[offset:offset + n].view(shape)
            layer._buffers["effective"] = eff  # type: ignore[attr-defined]
            layer._buffers["mask"] = mask[offset:offset + n].view(shape)  # type: ignore[attr-defined]
            layer._buffers["threshold"] = thresholds[i]  # type: ignore[attr-defined]
            self._effective_views.append(eff)
            self._latent_views.append(self.latent_flat[offset:offset + n].view(shape))
            self._effective_rows.append(effective[offset:offset + n].view(r, n // r))
            self._scale_cols.append(self.row_scale[row_offset:row_offset + r].view(r, 1))
            self._kept_means.append(self.kept_mean[row_offset:row_offset + r])
            self._total_means.append(self.total_mean[row_offset:row_offset + r])
            offset += n
            row_offset += r

    def _rows_of(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Per-layer ``(rows, fan_in)`` views of a flat tensor laid out like the weights."""
        views, offset = [], 0
        for n, r in zip(self.numels, self.rows):
            views.append(flat[offset:offset + n].view(r, n // r))
            offset += n
        return views

    def bound(self) -> bool:
        """Whether every layer still uses this object's views (``model.to(...)`` replaces buffers)."""
        return all(layer._buffers["effective"] is eff for layer, eff in zip(self.layers, self._effective_views))  # type: ignore[attr-defined]

    def ensure_bound(self) -> None:
        if not self.bound() or any(layer.latent_weight.device != self.device for layer in self.layers):
            self._bind()

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def prune(self, ratio: float) -> torch.Tensor:
        """Global threshold for ``ratio``, then every layer's mask and effective weight; returns the threshold."""
        self.ensure_bound()
        w = self.latent_flat
        # one foreach copy into the flat buffer's per-layer views (not torch.cat(out=)): one launch on a GPU,
        # and on this CPU the fastest of cat / per-layer copy_ / foreach (ResNet-18 best of 15: 22 vs 39 vs 48 ms)
        torch._foreach_copy_(self._latent_views, [layer.latent_weight.detach() for layer in self.layers])
        a = self.magnitude
        torch.abs(w, out=a)
        if self.uniform_scale:
            global_t = exact_quantile(a.float() if a.dtype != torch.float32 else a, ratio, True, self.selection)
            torch.div(global_t, self.layer_scales, out=self.thresholds)
            thr: torch.Tensor = self.thresholds[0].to(self.dtype)
        else:
            scales = self.layer_scales.to(self.dtype).repeat_interleave(self.layer_numels, output_size=self.numel)
            scores = torch.mul(a, scales, out=self.scratch)
            global_t = exact_quantile(scores.float() if scores.dtype != torch.float32 else scores, ratio, True, self.selection)
            # the same per-layer division the per-layer path does, then one value per element
            torch.div(global_t, self.layer_scales, out=self.thresholds)
            thr = self.thresholds.to(self.dtype).repeat_interleave(self.layer_numels, output_size=self.numel)
        torch.gt(a, thr, out=self.mask)
        if self.soft:
            # w - clamp(w, -t, t) == w - sign(w) t where |w| > t, and w - w == +0.0 elsewhere
            torch.clamp(w, min=-thr, max=thr, out=self.scratch)
            torch.sub(w, self.scratch, out=self.effective)
        else:
            torch.where(self.mask, w, self._zero, out=self.effective)
        if self.rescale:
            # per-row means with the per-layer path's own function (bit-identical results)
            if self.uniform_scale and self.device.type == "cpu":
                # |w| m as aten's threshold (x if x > t else 0: the mask's own strict >, bit-identical); on
                # this CPU 7x faster than where(out=) (ResNet-18 best of 15: 20 vs 140 ms). It takes t as a
                # host number, hence CPU only: on a GPU that would be a device sync
                kept_magnitude = torch.ops.aten.threshold.out(a, float(thr), 0.0, out=self.scratch)
            else:
                kept_magnitude = torch.where(self.mask, a, self._zero, out=self.scratch)  # |w| m, no bool->float copy
            for kept_rows, magnitude_rows, kept_out, total_out in zip(
                self._rows_of(kept_magnitude), self._rows_of(a), self._kept_means, self._total_means
            ):
                row_means(kept_rows, out=kept_out)
                row_means(magnitude_rows, out=total_out)
            self.row_scale.copy_(rescale_factor(self.kept_mean, self.total_mean))
            torch._foreach_mul_(self._effective_rows, self._scale_cols)
        for layer in self.layers:
            layer.sparse_mode = "pruned"
            layer.mark_synced()
        return global_t


def fused_update_for(layers: Sequence[SparseLayerMixin], score_scales: Sequence[float]) -> Optional[FusedUpdate]:
    """A :class:`FusedUpdate` when the layers allow one, else ``None`` (per-layer path)."""
    return FusedUpdate(layers, score_scales) if FusedUpdate.supports(layers) else None
