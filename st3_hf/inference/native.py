"""The direct sparse conv (``csrc/direct_conv.c``), compiled on first use with the system C compiler.

Plain C through ``ctypes``: no torch headers, so it builds in about a second; the shared object is cached per
source, flags and CPU.  Without a compiler (or with ``ST3_HF_NATIVE_KERNELS=0``) it is simply not offered:
the planner then times the pure-torch kernels only, and the plan names the kernel that runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from st3_hf.inference.storage import SparseWeight

SOURCE = Path(__file__).with_name("csrc") / "direct_conv.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_loaded: Optional[Tuple[Optional[ctypes.CDLL], str]] = None


def _cpu_name() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _build() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("ST3_HF_NATIVE_KERNELS", "1") == "0":
        return None, "native kernels switched off (ST3_HF_NATIVE_KERNELS=0)"
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "no C compiler found (install gcc)"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS + [compiler, _cpu_name()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ST3_HF_KERNEL_CACHE", Path.home() / ".cache" / "st3_hf" / "kernels"))
    library = cache / f"direct_conv-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        proc = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(partial)
            return None, f"the C compiler failed: {proc.stderr.strip().splitlines()[-1:]}"
        os.replace(partial, library)  # atomic: a concurrent build never loads a half-written file
    lib = ctypes.CDLL(str(library))
    lib.st3_direct_conv2d_f32.restype = None
    return lib, ""


def native_library() -> Tuple[Optional[ctypes.CDLL], str]:
    """``(library, "")`` or ``(None, why it is not available)``; built once per process."""
    global _loaded
    if _loaded is None:
        _loaded = _build()
    return _loaded


def _ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


class DirectSparseConv2d(nn.Module):
    """``F.conv2d`` (zero padding, any stride, dilation, groups; float32) by the direct sparse C kernel."""

    def __init__(self, weight: Union[torch.Tensor, SparseWeight], bias: Optional[torch.Tensor],
                 stride: Tuple[int, int], padding: Tuple[int, int, int, int], dilation: Tuple[int, int],
                 groups: int) -> None:
        super().__init__()
        self.library, reason = native_library()
        if self.library is None:
            raise RuntimeError(reason)
        if not isinstance(weight, SparseWeight):
            weight = SparseWeight.from_dense(weight)
        out_ch, in_per_group, kh, kw = weight.shape
        self.out_channels, self.in_channels, self.kernel_size = out_ch, in_per_group * groups, (kh, kw)
        self.stride, self.dilation, self.padding = stride, dilation, padding
        o, c, i, j = weight.coordinates()  # row-major positions: sorted by output channel
        self.value = weight.values.float().contiguous()
        self.channel = ((o // (out_ch // groups)) * in_per_group + c).to(torch.int32)
        self.dy = (i * dilation[0] - padding[0]).to(torch.int32)
        self.dx = (j * dilation[1] - padding[2]).to(torch.int32)
        self.row_start = torch.zeros(out_ch + 1, dtype=torch.int64)
        self.row_start[1:] = torch.bincount(o, minlength=out_ch).cumsum(0)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"the direct sparse conv runs float32, got {x.dtype}")
        x = x.contiguous()
        batch, _, height, width = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom, left, right = self.padding
        out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
        out = x.new_empty(batch, self.out_channels, out_h, out_w)
        self.library.st3_direct_conv2d_f32(
            _ptr(x), _ptr(out), batch, self.in_channels, height, width, self.out_channels, out_h, out_w, sh, sw,
            _ptr(self.row_start), _ptr(self.channel), _ptr(self.dy), _ptr(self.dx), _ptr(self.value),
            _ptr(self.bias), torch.get_num_threads())
        return out
