"""Compact sparse checkpoints: a safetensors file with bitmask-packed sparse tensors.

File layout (full description in ``docs/compact_format.md``): a tensor ``NAME``
stored compact becomes three safetensors entries

* ``NAME.bitmask`` – ``uint8``, ``ceil(numel / 8)`` bytes: bit ``i`` of the
  row-major flattened tensor is bit ``i % 8`` (least significant bit first,
  "little" bit order) of byte ``i // 8``; 1 = the element is stored;
* ``NAME.values``  – the stored elements in row-major order, original dtype;
* ``NAME.shape``   – ``int64``, the original shape.

An element is *stored* when its bytes are not all zero, so ``-0.0`` (sign bit
set) is stored and comes back as ``-0.0``: the round trip is bitwise exact for
every tensor, NaN payloads included.  Every other tensor is saved as is.  The
safetensors metadata records the format name/version and, per original tensor,
its layout, dtype and shape (and the stored count), which :func:`load_compact`
checks against the data.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import torch

from st3_hf.errors import ModelLoadError, ModelNotFoundError
from st3_hf.hub.errors import ExportError, describe_cause

FORMAT_NAME = "st3-sparse-bitmask"
FORMAT_VERSION = "1"
COMPACT_FILENAME = "model.sparse.safetensors"
DEFAULT_MIN_ZERO_FRACTION = 0.5

# metadata keys owned by the format (user metadata may not use them)
_KEY_FORMAT = "st3_hf.format"
_KEY_VERSION = "st3_hf.format_version"
_KEY_TENSORS = "st3_hf.tensors"
_RESERVED_PREFIX = "st3_hf."
_SUFFIXES = (".bitmask", ".values", ".shape")

# dtype of the same element size, used to test "all bytes zero" and to move raw bits
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)

PathLike = Union[str, os.PathLike]


class CompactFormatError(ModelLoadError):
    """A compact file is corrupt, truncated or inconsistent (a :class:`~st3_hf.errors.ModelLoadError`, so a ``ValueError``)."""


# ---------------------------------------------------------------------------- bits
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened row-major) into ``uint8``, least significant bit first.

    >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True]))
    tensor([1, 1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1).to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    groups = flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)
    return groups.sum(dim=1, dtype=torch.int32).to(torch.uint8)  # at most 255: exact


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat boolean tensor."""
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].to(torch.bool)


def _bits_view(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor's raw bits as an integer tensor of the same element size (None if unsupported)."""
    int_dtype = _BITS_VIEW.get(tensor.element_size())
    if int_dtype is None or tensor.is_complex():
        return None
    return tensor.contiguous().view(int_dtype)


def stored_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Elements a compact tensor stores: those whose bytes are not all zero (``-0.0`` included)."""
    bits = _bits_view(tensor)
    if bits is None:
        raise TypeError(f"dtype {tensor.dtype} cannot be stored compact")
    return bits != 0


# ---------------------------------------------------------------------------- save
def save_compact(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Optional[Dict[str, str]] = None,
    *,
    sparse_names: Optional[Iterable[str]] = None,
    min_zero_fraction: float = DEFAULT_MIN_ZERO_FRACTION,
) -> Path:
    """Write ``tensors`` to ``path`` with sparse tensors packed as bitmask + values.

    A tensor is stored compact when its name is in ``sparse_names`` (the export
    passes every pruned layer's weight), or when it has at least one dimension
    and at least ``min_zero_fraction`` of its elements are zero (all bytes
    zero).  Everything else is saved unchanged.  ``metadata`` (str -> str) is
    kept in the file; keys starting with ``"st3_hf."`` and ``"format"`` are
    reserved.

    >>> import tempfile, os
    >>> w = torch.tensor([[0.0, 1.5], [0.0, 0.0]])
    >>> p = save_compact({"fc.weight": w}, os.path.join(tempfile.mkdtemp(), "model.sparse.safetensors"))
    >>> torch.equal(load_compact(p)["fc.weight"], w)
    True
    """
    import safetensors.torch

    forced = set(sparse_names or ())
    unknown = forced - set(tensors)
    if unknown:
        raise KeyError(f"sparse_names not among the tensors: {sorted(unknown)}")
    user_metadata = dict(metadata or {})
    for key, value in user_metadata.items():
        if key.startswith(_RESERVED_PREFIX) or key == "format":
            raise ExportError(f"metadata key {key!r} is reserved by the compact format: rename it")
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")

    out: Dict[str, torch.Tensor] = {}
    described: Dict[str, Dict[str, object]] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().cpu()
        entry: Dict[str, object] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape)}
        if _should_compact(name, tensor, forced, min_zero_fraction):
            bits = _bits_view(tensor)
            assert bits is not None
            flat_bits = bits.reshape(-1)
            keep = flat_bits != 0
            # index the raw bits (not the values) so nothing is canonicalised on the way
            values = flat_bits[keep].view(tensor.dtype)
            new = {
                f"{name}.bitmask": pack_bits(keep),
                f"{name}.values": values,
                f"{name}.shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
            }
            entry.update(layout="bitmask", stored=int(values.numel()))
        else:
            new = {name: tensor.contiguous()}
            entry["layout"] = "dense"
        for key, value in new.items():
            if key in out:
                raise ExportError(f"tensor name collision on {key!r}: rename the tensors before saving compact")
            out[key] = value
        described[name] = entry

    file_metadata = {
        "format": "pt",
        _KEY_FORMAT: FORMAT_NAME,
        _KEY_VERSION: FORMAT_VERSION,
        _KEY_TENSORS: json.dumps(described, separators=(",", ":")),
        **user_metadata,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, str(path), metadata=file_metadata)
    return path


def _should_compact(name: str, tensor: torch.Tensor, forced: set, min_zero_fraction: float) -> bool:
    if name in forced:
        if tensor.dim() == 0 or _bits_view(tensor) is None:
            raise ExportError(
                f"{name}: a {tensor.dim()}-d {tensor.dtype} tensor cannot be stored compact: leave it out of sparse_names"
            )
        return True
    if tensor.dim() == 0 or tensor.numel() == 0 or _bits_view(tensor) is None:
        return False
    zeros = tensor.numel() - int(stored_mask(tensor).sum())
    return zeros >= min_zero_fraction * tensor.numel()


# ---------------------------------------------------------------------------- load
def read_compact_metadata(path: PathLike) -> Dict[str, str]:
    """The metadata of a compact file (format keys included), without reading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"compact checkpoint not found: {path} (re-run the export to write it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise CompactFormatError(
            f"{path}: not a readable safetensors file (corrupt or truncated): {describe_cause(e)}; re-download or re-export it"
        ) from e


def load_compact(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a file written by :func:`save_compact` back to dense tensors (bitwise identical).

    Raises :class:`CompactFormatError` (a ``ValueError``) for a corrupt or
    truncated file, a file of another format, or bitmask / values / shape
    entries that disagree with each other or with the metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"compact checkpoint not found: {path} (re-run the export to write it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        raise CompactFormatError(
            f"{path}: not a readable safetensors file (corrupt or truncated): {describe_cause(e)}; re-download or re-export it"
        ) from e

    if metadata.get(_KEY_FORMAT) != FORMAT_NAME:
        raise CompactFormatError(
            f"{path}: not an st3_hf compact file (metadata {_KEY_FORMAT!r} is {metadata.get(_KEY_FORMAT)!r}, "
            f"expected {FORMAT_NAME!r}): load it with safetensors.torch.load_file instead"
        )
    if metadata.get(_KEY_VERSION) != FORMAT_VERSION:
        raise CompactFormatError(
            f"{path}: unsupported compact format version {metadata.get(_KEY_VERSION)!r} (this st3_hf reads "
            f"{FORMAT_VERSION}): upgrade st3_hf or use the dense model.safetensors"
        )
    try:
        return _decode_all(path, metadata, raw)
    except CompactFormatError as e:
        # the checks below name what disagrees; the fix is the same for all of them
        raise CompactFormatError(f"{e}; the file is damaged: re-download it or re-export the model") from e


def _decode_all(path: Path, metadata: Mapping[str, str], raw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Dense tensors from the raw entries, every entry checked against the metadata's tensor table."""
    try:
        described = json.loads(metadata[_KEY_TENSORS])
    except (KeyError, json.JSONDecodeError) as e:
        raise CompactFormatError(f"{path}: missing or unreadable tensor table in the metadata ({describe_cause(e)})") from e
    if not isinstance(described, dict):
        raise CompactFormatError(f"{path}: the metadata's tensor table is not a JSON object")

    out: Dict[str, torch.Tensor] = {}
    used: set = set()
    for name, entry in described.items():
        try:
            dtype = getattr(torch, entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            layout = entry["layout"]
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise CompactFormatError(f"{path}: bad metadata entry for {name!r}: {entry!r}") from e
        if layout == "dense":
            tensor = _take(raw, name, path, used)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise CompactFormatError(
                    f"{path}: {name} is {tensor.dtype} {tuple(tensor.shape)} but the metadata says {dtype} {shape}"
                )
            out[name] = tensor
        elif layout == "bitmask":
            out[name] = _decode(name, entry, dtype, shape, raw, path, used)
        else:
            raise CompactFormatError(f"{path}: unknown layout {layout!r} for {name!r}")
    extra = set(raw) - used
    if extra:
        raise CompactFormatError(f"{path}: tensors not described by the metadata: {sorted(extra)[:5]}")
    return out


def _take(raw: Dict[str, torch.Tensor], key: str, path: Path, used: set) -> torch.Tensor:
    if key not in raw:
        raise CompactFormatError(f"{path}: entry {key!r} is missing")
    used.add(key)
    return raw[key]


def _decode(
    name: str, entry: Mapping[str, object], dtype: torch.dtype, shape: tuple, raw: Dict[str, torch.Tensor], path: Path, used: set
) -> torch.Tensor:
    bitmask = _take(raw, f"{name}.bitmask", path, used)
    values = _take(raw, f"{name}.values", path, used)
    stored_shape = _take(raw, f"{name}.shape", path, used)
    if stored_shape.dtype != torch.int64 or tuple(stored_shape.tolist()) != shape:
        raise CompactFormatError(f"{path}: {name}.shape is {stored_shape.tolist()} but the metadata says {list(shape)}")
    numel = math.prod(shape)
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != (numel + 7) // 8:
        raise CompactFormatError(
            f"{path}: {name}.bitmask must be {(numel + 7) // 8} uint8 bytes for {numel} elements, "
            f"got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    if values.dtype != dtype or values.dim() != 1:
        raise CompactFormatError(f"{path}: {name}.values is {values.dtype} {tuple(values.shape)}, expected 1-d {dtype}")
    full = unpack_bits(bitmask, 8 * bitmask.numel())
    if bool(full[numel:].any()):
        raise CompactFormatError(f"{path}: {name}.bitmask has bits set past the tensor's {numel} elements")
    keep = full[:numel]
    count = int(keep.sum())
    if count != values.numel() or count != int(entry.get("stored", count)):  # type: ignore[call-overload]
        raise CompactFormatError(
            f"{path}: inconsistent {name}: the bitmask marks {count} stored elements, "
            f"{name}.values holds {values.numel()}, the metadata says {entry.get('stored')}"
        )
    int_dtype = _BITS_VIEW.get(values.element_size())
    if int_dtype is None:
        raise CompactFormatError(f"{path}: {name}: dtype {dtype} cannot be stored compact")
    dense_bits = torch.zeros(numel, dtype=int_dtype)
    dense_bits[keep] = values.contiguous().view(int_dtype)
    return dense_bits.view(dtype).reshape(shape)
