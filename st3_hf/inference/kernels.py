"""CPU kernels of one pruned layer, each an ``nn.Module``: dense, and sparse through torch's CSR (MKL) products
(the C direct conv is in :mod:`st3_hf.inference.native`).

A k x k conv runs as k*k taps instead of ``unfold``: every tap ``(i, j)`` is an ``out x in`` sparse matrix
that multiplies the *input* image (as a ``[in, H * W]`` matrix, a free view of NCHW) once; its product is
added into the output shifted by the tap's offset.  Taps that read the same stride phase of the input share
one sparse product (their matrices are stacked), so a stride-1 conv is one sparse product plus one shifted
add per non-empty tap; no patch matrix is built (a strided conv copies each input phase once).  Groups (depthwise included) are block-diagonal
tap matrices.  Images are taken one at a time: the stacked products of one image stay in cache, those of a
whole batch would not.

The sparse kernels take a dense weight or a :class:`~st3_hf.inference.storage.SparseWeight` (its stored
positions and values) and build their matrices from the stored elements only: no dense copy is made.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from st3_hf.inference.storage import SparseWeight


def csr_from_entries(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     size: Tuple[int, int]) -> torch.Tensor:
    """A CSR matrix of ``size`` from its entries, which must be sorted by row and, within a row, by column
    (torch flags CSR support as beta; the warning says nothing to our users)."""
    crow = torch.zeros(size[0] + 1, dtype=torch.int64)
    if rows.numel():
        crow[1:] = torch.bincount(rows, minlength=size[0]).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols.to(torch.int64), values.contiguous(), size)


def as_sparse_weight(weight: Union[torch.Tensor, SparseWeight]) -> SparseWeight:
    """``weight`` as its stored elements (a dense tensor's non-zeros)."""
    return weight if isinstance(weight, SparseWeight) else SparseWeight.from_dense(weight)


class SparseLinear(nn.Module):
    """``F.linear`` with a CSR weight: ``(W @ x^T)^T`` for inputs of any leading shape."""

    def __init__(self, weight: Union[torch.Tensor, SparseWeight], bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        weight = as_sparse_weight(weight)
        self.out_features, self.in_features = weight.shape
        # row-major positions: the rows come sorted, and the columns within each row
        self.weight_csr = csr_from_entries(weight.positions // self.in_features, weight.positions % self.in_features,
                                           weight.values, weight.shape)
        self.bias = None if bias is None else bias.detach().clone().view(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        columns = x.reshape(-1, self.in_features).t().contiguous()
        out = torch.sparse.mm(self.weight_csr, columns)
        if self.bias is not None:
            out.add_(self.bias)
        # a contiguous result: the ops after a Linear (norms, attention reshapes) run slower on a transposed one
        return out.t().contiguous().view(*lead, self.out_features)


class SparseConv2d(nn.Module):
    """``F.conv2d`` (zero padding, any stride, dilation, groups) as per-phase stacked sparse taps."""

    def __init__(self, weight: Union[torch.Tensor, SparseWeight], bias: Optional[torch.Tensor],
                 stride: Tuple[int, int], padding: Tuple[int, int, int, int], dilation: Tuple[int, int],
                 groups: int) -> None:
        super().__init__()
        weight = as_sparse_weight(weight)
        out_ch, in_per_group, kh, kw = weight.shape
        self.out_channels, self.in_channels = out_ch, in_per_group * groups
        self.kernel_size, self.stride, self.dilation = (kh, kw), stride, dilation
        self.pad_top, self.pad_bottom, self.pad_left, self.pad_right = padding
        self.bias = None if bias is None else bias.detach().clone()
        o, c, i, j = weight.coordinates()
        column = (o // (out_ch // groups)) * in_per_group + c  # groups as block-diagonal tap matrices
        tap = i * kw + j
        present = torch.zeros(kh * kw, dtype=torch.bool)
        present[tap] = True  # an empty tap costs nothing
        # phase (rh, rw) -> taps [(i * kw + j, row offset q_h, column offset q_w)] reading x[:, :, rh::sh, rw::sw]
        phases: Dict[Tuple[int, int], List[Tuple[int, int, int]]] = {}
        for t in torch.nonzero(present).reshape(-1).tolist():
            qh, rh = divmod((t // kw) * dilation[0] - self.pad_top, stride[0])
            qw, rw = divmod((t % kw) * dilation[1] - self.pad_left, stride[1])
            phases.setdefault((rh, rw), []).append((t, qh, qw))
        self.phases = []
        for phase, taps in sorted(phases.items()):
            # the phase's tap matrices stacked: tap k of the phase holds rows k * out .. (k + 1) * out
            slot = torch.full((kh * kw,), -1, dtype=torch.int64)
            slot[torch.tensor([t for t, _, _ in taps])] = torch.arange(len(taps))
            mine = slot[tap] >= 0
            rows, cols = slot[tap][mine] * out_ch + o[mine], column[mine]
            order = torch.argsort(rows * self.in_channels + cols)
            stacked = csr_from_entries(rows[order], cols[order], weight.values[mine][order],
                                       (len(taps) * out_ch, self.in_channels))
            self.phases.append((phase, [(qh, qw) for _, qh, qw in taps], stacked))
        self.taps = sum(len(offsets) for _, offsets, _ in self.phases)
        self.is_pointwise = (kh, kw) == (1, 1) and stride == (1, 1) and not any(padding) and self.taps == 1

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((height + self.pad_top + self.pad_bottom - dh * (kh - 1) - 1) // sh + 1,
                (width + self.pad_left + self.pad_right - dw * (kw - 1) - 1) // sw + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_h, out_w = self.output_size(height, width)
        x = x.contiguous()
        out = x.new_empty(batch, self.out_channels, out_h, out_w)
        for image, image_out in zip(x, out):
            self._conv_image(image, image_out)
        return out

    def _conv_image(self, image: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` (``[out, H', W']``) = the conv of one ``[in, H, W]`` image."""
        out_h, out_w = out.shape[1:]
        sh, sw = self.stride
        if self.is_pointwise:  # 1x1, stride 1, no padding: the product is the output
            flat = out.view(self.out_channels, -1)
            if self.bias is None:
                torch.mm(self.phases[0][2], image.view(image.shape[0], -1), out=flat)
            else:
                torch.addmm(self.bias.view(-1, 1), self.phases[0][2], image.view(image.shape[0], -1), out=flat)
            return
        if self.bias is None:
            out.zero_()
        else:
            out.copy_(self.bias.view(-1, 1, 1).expand_as(out))
        for (rh, rw), offsets, stacked in self.phases:
            part = image if sh == sw == 1 else image[:, rh::sh, rw::sw].contiguous()
            part_h, part_w = part.shape[1:]
            products = torch.mm(stacked, part.view(part.shape[0], -1)).view(len(offsets), -1, part_h, part_w)
            for tap, (qh, qw) in enumerate(offsets):
                # output row oh reads phase row oh + qh: both must lie inside their tensors
                h0, h1 = max(0, -qh), min(out_h, part_h - qh)
                w0, w1 = max(0, -qw), min(out_w, part_w - qw)
                if h0 < h1 and w0 < w1:
                    out[:, h0:h1, w0:w1] += products[tap, :, h0 + qh:h1 + qh, w0 + qw:w1 + qw]


class DenseConv2d(nn.Module):
    """The dense conv on the effective weight, as ``nn.Conv2d`` runs it (zero padding)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                 padding: Tuple[int, int, int, int], dilation: Tuple[int, int], groups: int) -> None:
        super().__init__()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.stride, self.dilation, self.groups = stride, dilation, groups
        top, bottom, left, right = padding
        self.symmetric = top == bottom and left == right
        self.padding = (top, left) if self.symmetric else (0, 0)
        self.explicit_pad = (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            x = F.pad(x, self.explicit_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DenseLinear(nn.Module):
    """``F.linear`` on the effective weight."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
