"""Reader for the IDX format of MNIST / Fashion-MNIST (``*-idx3-ubyte[.gz]``): big-endian, two zero
bytes, a type code, the number of dimensions ``ndim``, ``ndim`` uint32 sizes, the values in C order."""
from __future__ import annotations

import gzip
import os
from typing import Union

import numpy as np

from st3_hf.errors import DataError

# IDX type code -> big-endian numpy dtype
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """An IDX file (gzip-compressed when named ``.gz``) as a numpy array; a bad header or a payload that
    does not match it is a :class:`~st3_hf.errors.DataError` naming the file.

    Example:
        >>> images = read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
        >>> images.shape, images.dtype
        ((60000, 28, 28), dtype('uint8'))
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except gzip.BadGzipFile as e:  # a renamed / truncated archive
        raise DataError(f"{path}: not a valid gzip file ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or type_code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{int.from_bytes(raw[:4], 'big'):08x} (expected "
                        f"0x0000TTNN with type TT in {sorted(hex(k) for k in IDX_DTYPES)} and NN >= 1 dims)")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header (declares {ndim} dims, file has {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected, actual = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, len(raw) - header_len
    if actual != expected:
        raise DataError(f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes of data) "
                        f"but the file holds {actual} bytes of data")
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # native byte order, writable copy (torch.from_numpy warns on read-only buffers)
    return data.astype(dtype.newbyteorder("="), copy=True)
