"""The compact bitmask format: exact round trips, the documented bit layout, size, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from st3_hf.errors import ModelError, St3Error
from st3_hf.hub.compact import (
    load_compact,
    pack_bits,
    read_compact_metadata,
    save_compact,
    unpack_bits,
)

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: equality of these is bitwise equality (NaN, -0.0 included)."""
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(raw_bits(a), raw_bits(b))


def sparse_tensor(shape, zero_fraction, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    drop = torch.rand(shape, generator=g) < zero_fraction
    return t.masked_fill(drop, 0)


@pytest.mark.parametrize("n", list(range(0, 18)) + [64, 1001])
def test_pack_bits_matches_numpy_little_bit_order(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    packed = pack_bits(mask)
    expected = np.packbits(mask.numpy().astype(np.uint8), bitorder="little")
    assert packed.dtype == torch.uint8
    assert packed.numpy().tolist() == expected.tolist()
    assert torch.equal(unpack_bits(packed, n), mask)


def test_bit_layout_and_entries_are_as_documented(tmp_path):
    # 2x3x2 tensor, non-zeros at flat positions 1, 2, 8, 11 (row-major)
    t = torch.zeros(2, 3, 2)
    flat = t.view(-1)
    flat[1], flat[2], flat[8], flat[11] = 1.5, -2.0, 3.25, 4.0
    path = save_compact({"conv.weight": t}, tmp_path / "m.safetensors")
    raw = safetensors.torch.load_file(str(path))
    assert set(raw) == {"conv.weight.bitmask", "conv.weight.values", "conv.weight.shape"}
    # byte 0: bits 1 and 2 -> 0b00000110 = 6; byte 1: bits 8-8=0 and 11-8=3 -> 0b00001001 = 9
    assert raw["conv.weight.bitmask"].tolist() == [6, 9]
    assert raw["conv.weight.bitmask"].dtype == torch.uint8
    assert raw["conv.weight.values"].tolist() == [1.5, -2.0, 3.25, 4.0]
    assert raw["conv.weight.values"].dtype == torch.float32
    assert raw["conv.weight.shape"].tolist() == [2, 3, 2]
    assert raw["conv.weight.shape"].dtype == torch.int64
    meta = read_compact_metadata(path)
    assert meta["st3_hf.format"] == "st3-sparse-bitmask" and meta["st3_hf.format_version"] == "1"
    table = json.loads(meta["st3_hf.tensors"])
    assert table["conv.weight"] == {"dtype": "float32", "shape": [2, 3, 2], "layout": "bitmask", "stored": 4}
    assert torch.equal(load_compact(path)["conv.weight"], t)


def test_round_trip_is_bitwise_exact_for_many_dtypes(tmp_path):
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 0.0, 0.0, 0.0, 0.0, 1e-45])
    tensors = {
        "conv.weight": sparse_tensor((16, 8, 3, 3), 0.9),
        "special": special,
        "half": sparse_tensor((33,), 0.7, torch.float16, seed=1),
        "bf16": sparse_tensor((7, 5), 0.8, torch.bfloat16, seed=2),
        "f64": sparse_tensor((9,), 0.6, torch.float64, seed=3),
        "ints": torch.tensor([0, 0, 5, 0, -3, 0, 0, 0], dtype=torch.int64),
        "flags": torch.tensor([True, False, False, False]),
        "bytes": torch.tensor([0, 0, 0, 255], dtype=torch.uint8),
        "dense": torch.randn(4, 4),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "all_zero": torch.zeros(3, 3),
        "empty": torch.zeros(0, 4),
    }
    path = save_compact(tensors, tmp_path / "m.safetensors", {"note": "kept"})
    loaded = load_compact(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor)
    meta = read_compact_metadata(path)
    assert meta["note"] == "kept"
    table = json.loads(meta["st3_hf.tensors"])
    assert table["conv.weight"]["layout"] == "bitmask"
    assert table["dense"]["layout"] == "dense"  # no zeros: stored as is
    assert table["scalar"]["layout"] == "dense"  # 0-d tensors are never packed


def test_negative_zero_keeps_its_sign(tmp_path):
    t = torch.tensor([0.0, -0.0, 0.0, 0.0, 2.0, 0.0])
    loaded = load_compact(save_compact({"w": t}, tmp_path / "m.safetensors"))["w"]
    assert torch.signbit(loaded).tolist() == [False, True, False, False, False, False]
    # -0.0 has a non-zero byte (the sign bit), so it is a stored element: 2 values
    raw = safetensors.torch.load_file(str(tmp_path / "m.safetensors"))
    assert raw["w.values"].numel() == 2


def test_which_tensors_are_packed(tmp_path):
    tensors = {
        "forty": sparse_tensor((1000,), 0.4, seed=4),
        "sixty": sparse_tensor((1000,), 0.6, seed=5),
        "forced": sparse_tensor((1000,), 0.1, seed=6),
    }
    path = save_compact(tensors, tmp_path / "m.safetensors", sparse_names=["forced"])
    table = json.loads(read_compact_metadata(path)["st3_hf.tensors"])
    assert table["forty"]["layout"] == "dense"
    assert table["sixty"]["layout"] == "bitmask"
    assert table["forced"]["layout"] == "bitmask"
    for name, tensor in tensors.items():
        assert_bitwise_equal(load_compact(path)[name], tensor)


def test_compact_is_much_smaller_at_high_sparsity(tmp_path):
    w = sparse_tensor((128, 128, 3, 3), 0.9, seed=7)
    dense = tmp_path / "dense.safetensors"
    safetensors.torch.save_file({"w": w}, str(dense))
    compact = save_compact({"w": w}, tmp_path / "compact.safetensors")
    nnz = int((w != 0).sum())
    payload = w.numel() // 8 + 4 * nnz  # bitmask bytes + float32 values
    assert compact.stat().st_size <= payload + 1024  # plus a small header
    assert compact.stat().st_size < 0.15 * dense.stat().st_size


def test_reserved_metadata_and_name_collisions_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_compact({"w": torch.zeros(8)}, tmp_path / "a.safetensors", {"st3_hf.format": "x"})
    with pytest.raises(ValueError, match="collision"):
        save_compact({"w": torch.zeros(8), "w.values": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(KeyError):
        save_compact({"w": torch.zeros(8)}, tmp_path / "c.safetensors", sparse_names=["nope"])


def _valid_file(tmp_path):
    w = sparse_tensor((8, 8), 0.75, seed=8)
    path = save_compact({"w": w, "b": torch.randn(8)}, tmp_path / "m.safetensors")
    return path, safetensors.torch.load_file(str(path)), read_compact_metadata(path)


def test_truncated_file_gives_a_clear_error(tmp_path):
    path, _, _ = _valid_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(ModelError, match="corrupt or truncated") as info:
        load_compact(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ModelError) and isinstance(info.value, St3Error)
    assert "\n" not in str(info.value) and "re-export" in str(info.value)


def test_corrupt_header_gives_a_clear_error(tmp_path):
    path, _, _ = _valid_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[0:8] = b"\xff" * 8  # header length
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        load_compact(path)
    assert isinstance(info.value, ModelError) and "\n" not in str(info.value)
    with pytest.raises(ModelError, match="corrupt or truncated"):
        read_compact_metadata(path)


def test_inconsistent_values_count_is_rejected(tmp_path):
    path, raw, meta = _valid_file(tmp_path)
    raw["w.values"] = raw["w.values"][:-1].clone()
    safetensors.torch.save_file(raw, str(path), metadata=meta)
    with pytest.raises(ModelError, match="inconsistent w") as info:
        load_compact(path)
    assert "\n" not in str(info.value) and "re-download it or re-export" in str(info.value)


def test_wrong_bitmask_length_and_padding_bits_are_rejected(tmp_path):
    path, raw, meta = _valid_file(tmp_path)
    bad = dict(raw, **{"w.bitmask": torch.cat([raw["w.bitmask"], torch.zeros(1, dtype=torch.uint8)])})
    safetensors.torch.save_file(bad, str(path), metadata=meta)
    with pytest.raises(ModelError, match="bitmask must be 8 uint8 bytes"):
        load_compact(path)
    # a 10-element tensor has 6 padding bits in its last byte: setting one is corruption
    t = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0])
    p2 = save_compact({"t": t}, tmp_path / "p.safetensors")
    raw2, meta2 = safetensors.torch.load_file(str(p2)), read_compact_metadata(p2)
    raw2["t.bitmask"] = raw2["t.bitmask"].clone()
    raw2["t.bitmask"][1] |= 1 << 5
    safetensors.torch.save_file(raw2, str(p2), metadata=meta2)
    with pytest.raises(ModelError, match="past the tensor"):
        load_compact(p2)


def test_shape_disagreeing_with_metadata_is_rejected(tmp_path):
    path, raw, meta = _valid_file(tmp_path)
    raw["w.shape"] = torch.tensor([4, 16], dtype=torch.int64)
    safetensors.torch.save_file(raw, str(path), metadata=meta)
    with pytest.raises(ModelError, match="w.shape"):
        load_compact(path)


def test_plain_safetensors_file_is_not_a_compact_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, str(path))
    with pytest.raises(ModelError, match="not an st3_hf compact file"):
        load_compact(path)
    with pytest.raises(ModelError, match="compact checkpoint not found") as info:
        load_compact(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(info.value)
