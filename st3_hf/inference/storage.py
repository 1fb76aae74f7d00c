"""How the kernels receive a pruned weight (:class:`SparseWeight`: its stored positions and values, never the
dense tensor unless asked) and what a built model holds (:func:`held_tensors`, :func:`tensor_bytes`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn


@dataclass(eq=False)
class SparseWeight:
    """A weight as its stored elements: ``positions`` (flat row-major indices, increasing, ``int64``) and their
    ``values``; every other element is zero.  The sparse kernels are built from this form alone, so a weight
    read from a compact file never exists as a dense tensor unless :meth:`dense` is called.

    >>> w = SparseWeight.from_dense(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    >>> w.positions.tolist(), w.values.tolist(), w.sparsity
    ([1, 2], [2.0, 3.0], 0.5)
    >>> torch.equal(SparseWeight((2, 2), w.positions, w.values).dense(), torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    True
    """

    shape: Tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor
    # the dense tensor this was read from, if any: dense() returns it instead of a new copy
    source: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.positions.dim() != 1 or self.values.dim() != 1 or self.positions.numel() != self.values.numel():
            raise ValueError(f"positions {tuple(self.positions.shape)} and values {tuple(self.values.shape)} must be "
                             "1-d and of the same length")
        self.positions = self.positions.to(torch.int64)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "SparseWeight":
        """The non-zero elements of ``weight`` (NaN counts as non-zero; ``-0.0`` as zero)."""
        weight = weight.detach()
        flat = weight.reshape(-1)
        positions = torch.nonzero(flat != 0).reshape(-1)
        return cls(tuple(weight.shape), positions, flat[positions], weight)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def sparsity(self) -> float:
        """Fraction of zero elements (a stored value that is zero counts as zero)."""
        return 1.0 - int(torch.count_nonzero(self.values)) / max(self.numel, 1)

    def coordinates(self) -> Tuple[torch.Tensor, ...]:
        """One index tensor per dimension of the stored elements (``torch.unravel_index`` of the positions)."""
        return torch.unravel_index(self.positions, self.shape)

    def dense(self) -> torch.Tensor:
        """The weight as a dense tensor: the source tensor when there is one, else a new one."""
        if self.source is not None:
            return self.source
        out = self.values.new_zeros(self.numel)
        out[self.positions] = self.values
        return out.view(self.shape)


def _tensors_in(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def held_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every tensor the modules of ``model`` hold: parameters, buffers and plain tensor attributes (a kernel's
    CSR matrices, index arrays), also inside lists, tuples and dicts; keyed ``module.attribute[#i]``."""
    found: Dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        attributes = [(k, v) for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")]
        for key, value in [*module._parameters.items(), *module._buffers.items(), *attributes]:
            for i, tensor in enumerate(_tensors_in(value)):
                found[f"{prefix}{key}" + ("" if isinstance(value, torch.Tensor) else f"[{i}]")] = tensor
    return found


def _storages(tensor: torch.Tensor) -> Iterator[Tuple[int, int]]:
    """``(data pointer, bytes)`` of each memory block behind ``tensor`` (a sparse tensor has several)."""
    if tensor.is_meta:
        return
    if tensor.layout == torch.sparse_csr:
        for part in (tensor.crow_indices(), tensor.col_indices(), tensor.values()):
            yield from _storages(part)
    elif tensor.layout == torch.sparse_coo:
        for part in (tensor._indices(), tensor._values()):
            yield from _storages(part)
    else:
        storage = tensor.untyped_storage()
        yield storage.data_ptr(), storage.nbytes()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of memory behind :func:`held_tensors` of ``model``, each block counted once (views and shared
    tensors are not counted twice; meta tensors hold nothing)."""
    blocks: Dict[int, int] = {}
    for tensor in held_tensors(model).values():
        for pointer, size in _storages(tensor):
            blocks[pointer] = max(blocks.get(pointer, 0), size)
    return sum(blocks.values())
