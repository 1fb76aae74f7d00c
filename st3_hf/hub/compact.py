"""Compact sparse checkpoints: safetensors with bitmask-packed sparse tensors (``docs/compact_format.md``).

A packed tensor ``NAME`` is ``NAME.bitmask`` (``uint8``, element ``i`` row-major = bit ``i % 8`` of byte
``i // 8``), ``NAME.values`` and ``NAME.shape`` (``int64``); an element is stored when its bytes are not all
zero, so the round trip is bitwise exact (``-0.0``, NaN).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from st3_hf.errors import ModelError, describe_cause

FORMAT_NAME = "st3-sparse-bitmask"
FORMAT_VERSION = "1"
COMPACT_FILENAME = "model.sparse.safetensors"
_KEY_FORMAT, _KEY_VERSION, _KEY_TENSORS = "st3_hf.format", "st3_hf.format_version", "st3_hf.tensors"
# integer dtype of each element size: "all bytes zero" is tested, and raw bits moved, through it
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_PARTS = (".bitmask", ".values", ".shape")

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class CompactTensor:
    """A packed tensor as the file stores it, checked by :func:`read_compact` (what sparse kernels are built from)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    bitmask: torch.Tensor  # uint8, bit i % 8 of byte i // 8 = element i (row-major) is stored
    values: torch.Tensor  # the stored elements, row-major

    def _mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, math.prod(self.shape))

    def positions(self) -> torch.Tensor:
        """Flat row-major indices of the stored elements, increasing (``int64``)."""
        return torch.nonzero(self._mask()).reshape(-1)

    def to_dense(self) -> torch.Tensor:
        """The tensor, bitwise identical to the one saved."""
        dense_bits = torch.zeros(math.prod(self.shape), dtype=_BITS_VIEW[self.values.element_size()])
        dense_bits[self._mask()] = self.values.contiguous().view(dense_bits.dtype)
        return dense_bits.view(self.dtype).reshape(self.shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened row-major) into ``uint8``, least significant bit first.

    >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True]))
    tensor([1, 1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)  # <= 255


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat boolean tensor."""
    return ((packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1).reshape(-1)[:count].to(torch.bool)


def save_compact(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None, *,
                 sparse_names: Iterable[str] = (), min_zero_fraction: float = 0.5) -> Path:
    """Write ``tensors`` to ``path``, packing those in ``sparse_names`` and those with >= ``min_zero_fraction`` zeros.

    ``metadata`` (str -> str) is kept in the file; ``"format"`` and keys starting with ``"st3_hf."`` are reserved.

    >>> import tempfile, os
    >>> w = torch.tensor([[0.0, 1.5], [0.0, 0.0]])
    >>> p = save_compact({"fc.weight": w}, os.path.join(tempfile.mkdtemp(), "model.sparse.safetensors"))
    >>> torch.equal(load_compact(p)["fc.weight"], w)
    True
    """
    import safetensors.torch

    forced = set(sparse_names)
    if unknown := sorted(forced - set(tensors)):
        raise KeyError(f"sparse_names not among the tensors: {unknown}")
    if reserved := [key for key in metadata or {} if key.startswith("st3_hf.") or key == "format"]:
        raise ModelError(f"metadata keys {reserved} are reserved by the compact format: rename them")
    out: Dict[str, torch.Tensor] = {}
    table: Dict[str, Dict[str, object]] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        entry: Dict[str, object] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape)}
        int_dtype = _BITS_VIEW.get(tensor.element_size())
        packable = int_dtype is not None and not tensor.is_complex() and tensor.dim() > 0
        if name in forced and not packable:
            raise ModelError(f"{name}: a {tensor.dim()}-d {tensor.dtype} tensor cannot be stored compact")
        bits = tensor.contiguous().view(int_dtype).reshape(-1) if packable else None
        keep = None if bits is None else bits != 0
        if name in forced or (packable and keep.numel() and
                              keep.numel() - int(keep.sum()) >= min_zero_fraction * keep.numel()):
            values = bits[keep].view(tensor.dtype)  # indexing the raw bits canonicalises nothing
            new = {f"{name}.bitmask": pack_bits(keep), f"{name}.values": values,
                   f"{name}.shape": torch.tensor(list(tensor.shape), dtype=torch.int64)}
            entry.update(layout="bitmask", stored=int(values.numel()))
        else:
            new, entry["layout"] = {name: tensor.contiguous()}, "dense"
        if any(key in out for key in new):
            raise ModelError(f"tensor name collision on {next(k for k in new if k in out)!r}: "
                             "rename the tensors before saving compact")
        out.update(new)
        table[name] = entry
    header = {"format": "pt", _KEY_FORMAT: FORMAT_NAME, _KEY_VERSION: FORMAT_VERSION,
              _KEY_TENSORS: json.dumps(table, separators=(",", ":")), **(metadata or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, str(path), metadata=header)
    return Path(path)


def _read(path: PathLike, with_tensors: bool) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ModelError(f"compact checkpoint not found: {path} (re-run the export to write it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except Exception as e:  # safetensors' own SafetensorError for corrupt headers and truncated data
        raise ModelError(f"{path}: not a readable safetensors file (corrupt or truncated): {describe_cause(e)}; "
                         "re-download or re-export it") from e


def read_compact_metadata(path: PathLike) -> Dict[str, str]:
    """The metadata of a compact file (format keys included), without reading tensors."""
    return _read(path, with_tensors=False)[0]


def read_compact(path: PathLike) -> Dict[str, Union[torch.Tensor, CompactTensor]]:
    """Read a file written by :func:`save_compact` with every check of :func:`load_compact`, packed tensors kept
    packed (:class:`CompactTensor`)."""
    metadata, raw = _read(path, with_tensors=True)
    if metadata.get(_KEY_FORMAT) != FORMAT_NAME:
        raise ModelError(f"{path}: not an st3_hf compact file (metadata {_KEY_FORMAT!r} is "
                         f"{metadata.get(_KEY_FORMAT)!r}): load it with safetensors.torch.load_file instead")
    if metadata.get(_KEY_VERSION) != FORMAT_VERSION:
        raise ModelError(f"{path}: unsupported compact format version {metadata.get(_KEY_VERSION)!r} (this "
                         f"st3_hf reads {FORMAT_VERSION}): upgrade st3_hf or use the dense model.safetensors")
    try:
        try:
            entries = {name: (getattr(torch, e["dtype"]), tuple(int(s) for s in e["shape"]), e["layout"], e)
                       for name, e in json.loads(metadata[_KEY_TENSORS]).items()}
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ModelError(f"missing or unreadable tensor table in the metadata ({describe_cause(e)})") from e
        used = {name + part for name, (_, _, layout, _) in entries.items()
                for part in ([""] if layout == "dense" else _PARTS)}
        if used != set(raw):
            raise ModelError(f"entries missing: {sorted(used - set(raw))[:5]}; tensors not described by the "
                             f"metadata: {sorted(set(raw) - used)[:5]}")
        out: Dict[str, Union[torch.Tensor, CompactTensor]] = {}
        for name, (dtype, shape, layout, entry) in entries.items():
            if layout == "dense" and (raw[name].dtype != dtype or tuple(raw[name].shape) != shape):
                raise ModelError(f"{name} is {raw[name].dtype} {tuple(raw[name].shape)} but the metadata "
                                 f"says {dtype} {shape}")
            if layout not in ("dense", "bitmask"):
                raise ModelError(f"unknown layout {layout!r} for {name!r}")
            out[name] = raw[name] if layout == "dense" else _decode(name, entry, dtype, shape, raw)
        return out
    except ModelError as e:  # the same fix for every disagreement
        raise ModelError(f"{path}: {e}; the file is damaged: re-download it or re-export the model") from e


def load_compact(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a file written by :func:`save_compact` back to dense tensors (bitwise identical); :class:`ModelError`
    for a corrupt, truncated or foreign file or inconsistent entries (the checks of ``docs/compact_format.md``)."""
    return {name: t.to_dense() if isinstance(t, CompactTensor) else t for name, t in read_compact(path).items()}


def _decode(name: str, entry: Mapping[str, object], dtype: torch.dtype, shape: tuple,
            raw: Dict[str, torch.Tensor]) -> CompactTensor:
    bitmask, values, stored_shape = (raw[name + part] for part in _PARTS)
    if stored_shape.dtype != torch.int64 or tuple(stored_shape.tolist()) != shape:
        raise ModelError(f"{name}.shape is {stored_shape.tolist()} but the metadata says {list(shape)}")
    numel = math.prod(shape)
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != (numel + 7) // 8:
        raise ModelError(f"{name}.bitmask must be {(numel + 7) // 8} uint8 bytes for {numel} elements, "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    if values.dtype != dtype or values.dim() != 1 or values.element_size() not in _BITS_VIEW:
        raise ModelError(f"{name}.values is {values.dtype} {tuple(values.shape)}, expected 1-d {dtype}")
    full = unpack_bits(bitmask, 8 * bitmask.numel())
    if bool(full[numel:].any()):
        raise ModelError(f"{name}.bitmask has bits set past the tensor's {numel} elements")
    count = int(full[:numel].sum())
    if count != values.numel() or count != entry.get("stored", count):
        raise ModelError(f"inconsistent {name}: the bitmask marks {count} stored elements, {name}.values "
                         f"holds {values.numel()}, the metadata says {entry.get('stored')}")
    return CompactTensor(shape, dtype, bitmask, values)
