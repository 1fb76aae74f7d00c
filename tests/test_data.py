"""Data pipeline: IDX reader, dataset sources, transforms, loaders, device-resident loader, pretrained_cfg."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import data_utils as du  # noqa: E402

from st3_hf.errors import DataError  # noqa: E402
from st3_hf.train.data import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    DeviceResidentLoader,
    build_dataloaders,
    build_datasets,
    build_device_resident_loaders,
    build_train_transform,
    pretrained_cfg_for,
    read_idx,
)
from st3_hf.train.recipe_schema import DataConfig  # noqa: E402

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
needs_fmnist = pytest.mark.skipif(not du.fashion_mnist_available(), reason="Fashion-MNIST files not installed")


def fmnist_cfg(root, **overrides) -> DataConfig:
    values = dict(source="fashion_mnist", root=str(root), input_size=[1, 28, 28], mean=[FMNIST_MEAN],
                  std=[FMNIST_STD], crop_pct=1.0, random_crop_padding=4, eval_split="test", num_workers=0)
    values.update(overrides)
    return DataConfig(**values)


def folder_cfg(root, **overrides) -> DataConfig:
    values = dict(source="imagefolder", root=str(root), input_size=[3, 32, 32], interpolation="bilinear",
                  crop_pct=0.875, num_workers=0, batch_size=4)
    values.update(overrides)
    return DataConfig(**values)


def normalise(array_hwc_or_hw: np.ndarray, mean, std) -> torch.Tensor:
    """Independent reference: uint8 HWC (or HW) -> float CHW, x/255, (x - mean) / std."""
    x = np.asarray(array_hwc_or_hw, dtype=np.float64) / 255.0
    if x.ndim == 2:
        x = x[:, :, None]
    x = (x - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).float()


def reference_eval(image: Image.Image, size: int, crop_pct: float, resample, mean, std) -> torch.Tensor:
    """Independent eval preprocessing: shorter side -> floor(size / crop_pct), centre crop ``size``."""
    scale = math.floor(size / crop_pct)
    w, h = image.size
    new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    resized = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return normalise(np.asarray(resized)[top:top + size, left:left + size], mean, std)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Offline datasets with a private cache folder."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path / "hf_cache"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return du.make_image_folder(tmp_path_factory.mktemp("shapes"))


# ------------------------------------------------------------------ IDX / Fashion-MNIST


@needs_fmnist
def test_real_fashion_mnist_files():
    root = Path(du.FASHION_MNIST_DIR)
    train_x = read_idx(root / "train-images-idx3-ubyte.gz")
    train_y = read_idx(root / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(root / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert train_y.min() == 0 and train_y.max() == 9
    # Fashion-MNIST is exactly balanced
    assert np.bincount(train_y, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [1000] * 10
    # published facts: first training labels, and the usual normalisation statistics
    assert train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert abs(train_x.mean() / 255 - 0.2860) < 1e-4 and abs(train_x.std() / 255 - 0.3530) < 1e-4


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("type_code,dtype", [(0x08, np.uint8), (0x0B, np.int16), (0x0D, np.float32)])
def test_read_idx_roundtrip(tmp_path, gz, type_code, dtype):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * 7 - 20).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
    path = du.write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), array, type_code=type_code)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == dtype
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_corrupt_files(tmp_path):
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    bad_magic = du.write_idx(tmp_path / "magic", images, magic=b"\x01\x00\x08\x03")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    bad_type = du.write_idx(tmp_path / "type", images, magic=b"\x00\x00\x07\x03")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_type)
    # header claims 4 images but the payload holds 3
    wrong_size = du.write_idx(tmp_path / "size", images, magic=b"\x00\x00\x08\x03")
    raw = bytearray(wrong_size.read_bytes())
    raw[4:8] = (4).to_bytes(4, "big")
    wrong_size.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shape \(4, 4, 4\)"):
        read_idx(wrong_size)
    truncated = tmp_path / "short"
    truncated.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(truncated)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="gzip"):
        read_idx(not_gzip)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_source_tensors_and_subsets(tmp_path, gz):
    root, arrays = du.make_tiny_fashion_mnist(tmp_path, n_train=20, n_test=10, gz=gz)
    cfg = fmnist_cfg(root, train_subset=7, eval_subset=50)  # eval subset larger than the split: all of it
    train_ds, eval_ds = build_datasets(cfg)
    assert len(train_ds) == 7 and len(eval_ds) == 10
    assert list(eval_ds.classes) == list(FASHION_MNIST_CLASSES)
    test_x, test_y = arrays["t10k"]
    for i in (0, 9):
        image, label = eval_ds[i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert label == test_y[i] and isinstance(label, int)
        torch.testing.assert_close(image, normalise(test_x[i], [FMNIST_MEAN], [FMNIST_STD]))
    train_x, train_y = arrays["train"]
    assert [train_ds[i][1] for i in range(7)] == train_y[:7].tolist()

    # three input channels: the grey image replicated, normalised per channel
    rgb_cfg = fmnist_cfg(root, input_size=[3, 28, 28], mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])
    image, _ = build_datasets(rgb_cfg)[1][3]
    expected = normalise(np.repeat(test_x[3][:, :, None], 3, axis=2), [0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    torch.testing.assert_close(image, expected)


def test_fashion_mnist_missing_files_and_bad_split(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not found"):
        build_datasets(fmnist_cfg(tmp_path))
    root, _ = du.make_tiny_fashion_mnist(tmp_path / "fm")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split"):
        build_datasets(fmnist_cfg(root, eval_split="holdout"))


def shifts_of(image: np.ndarray, padding: int):
    """All pad-and-crop results of a HW uint8 image (independent of the code under test)."""
    padded = np.pad(image, padding)
    h, w = image.shape
    return [padded[dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]


@needs_fmnist
def test_real_fashion_mnist_pad_crop_train_transform():
    cfg = fmnist_cfg(du.FASHION_MNIST_DIR, hflip=0.0, train_subset=16, eval_subset=8)
    train_ds, eval_ds = build_datasets(cfg)
    assert len(train_ds) == 16 and len(eval_ds) == 8
    raw = read_idx(Path(du.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz")[:16]
    offsets = set()
    torch.manual_seed(0)
    for i in range(16):
        image, label = train_ds[i]
        assert image.shape == (1, 28, 28)
        candidates = [normalise(s, [FMNIST_MEAN], [FMNIST_STD]) for s in shifts_of(raw[i], 4)]
        matches = [k for k, c in enumerate(candidates) if torch.allclose(image, c, atol=1e-6)]
        assert matches, f"train image {i} is not a 4-pixel pad-and-crop of the raw image"
        offsets.add(matches[0])
    assert len(offsets) > 3  # random offsets, not always the same crop
    names = [type(t).__name__ for t in build_train_transform(cfg).transforms]
    assert "RandomCrop" in names and "RandomResizedCropAndInterpolation" not in names
    assert "ColorJitter" not in names


# ------------------------------------------------------------------ image folders


def test_imagefolder_class_mapping_and_eval_tensors(shapes_root):
    cfg = folder_cfg(shapes_root)
    train_ds, eval_ds = build_datasets(cfg)
    assert len(train_ds) == 12 and len(eval_ds) == 12
    assert train_ds.classes == ["circle", "square", "triangle"]
    images, labels, classes = du.image_folder_records(shapes_root, "val")
    assert classes == ["circle", "square", "triangle"]
    for i in range(12):
        tensor, label = eval_ds[i]
        assert label == labels[i]
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        expected = reference_eval(images[i], 32, 0.875, Image.BILINEAR, cfg.mean, cfg.std)
        torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


def test_imagefolder_same_class_indices_when_val_lacks_a_class(tmp_path):
    root = du.make_image_folder(tmp_path, splits=("train",), per_class=2)
    du.make_image_folder(tmp_path, classes=("square", "triangle"), splits=("validation",), per_class=2)
    train_ds, eval_ds = build_datasets(folder_cfg(root, eval_split="validation"))
    assert sorted(train_ds[i][1] for i in range(len(train_ds))) == [0, 0, 1, 1, 2, 2]
    # val has no "circle": square and triangle must keep train's indices 1 and 2
    assert sorted(eval_ds[i][1] for i in range(len(eval_ds))) == [1, 1, 2, 2]

    du.make_image_folder(tmp_path, classes=("hexagon",), splits=("validation",), per_class=1)
    with pytest.raises(ValueError, match="hexagon"):
        build_datasets(folder_cfg(root, eval_split="validation"))


def test_imagefolder_eval_split_fallback_and_errors(shapes_root, tmp_path):
    # the default eval_split "validation" falls back to the ImageNet-style "val" folder
    _, eval_ds = build_datasets(folder_cfg(shapes_root, eval_split="validation"))
    assert len(eval_ds) == 12
    with pytest.raises(DataError, match="available: .*train"):
        build_datasets(folder_cfg(shapes_root, eval_split="holdout"))
    with pytest.raises(DataError, match="is not a folder"):
        build_datasets(folder_cfg(tmp_path / "missing"))


def test_imagefolder_train_transform_options(shapes_root):
    images, _, _ = du.image_folder_records(shapes_root, "train")
    # full-image crop (scale = ratio = 1) and a certain flip: deterministic, checkable against PIL
    cfg = folder_cfg(shapes_root, scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=1.0, mean=[0.5] * 3, std=[0.25] * 3)
    train_ds, _ = build_datasets(cfg)
    tensor, label = train_ds[0]
    flipped = np.asarray(images[0].resize((32, 32), Image.BILINEAR))[:, ::-1]
    torch.testing.assert_close(tensor, normalise(flipped, [0.5] * 3, [0.25] * 3), atol=1e-5, rtol=0)
    names = [type(t).__name__ for t in build_train_transform(folder_cfg(shapes_root)).transforms]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]

    # default recipe: random-resized-crop, output at the input size
    train_ds, _ = build_datasets(folder_cfg(shapes_root, train_subset=5))
    assert len(train_ds) == 5
    assert train_ds[4][0].shape == (3, 32, 32)


def test_grayscale_imagefolder(shapes_root):
    cfg = folder_cfg(shapes_root, input_size=[1, 32, 32], mean=[0.5], std=[0.5], eval_subset=3)
    _, eval_ds = build_datasets(cfg)
    images, _, _ = du.image_folder_records(shapes_root, "val")
    tensor, _ = eval_ds[2]
    expected = reference_eval(images[2].convert("L"), 32, 0.875, Image.BILINEAR, [0.5], [0.5])
    assert tensor.shape == (1, 32, 32) and len(eval_ds) == 3
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


def test_unknown_source():
    with pytest.raises(ValueError, match="valid sources: imagefolder, hf, fashion_mnist"):
        build_datasets(DataConfig(source="tfds"))


# ------------------------------------------------------------------ Hugging Face datasets


def test_hf_save_to_disk_matches_imagefolder(shapes_root, tmp_path, hf_cache):
    saved = du.make_hf_saved_dataset(tmp_path / "saved", shapes_root)
    cfg = folder_cfg(saved, source="hf", interpolation="bicubic")
    train_ds, eval_ds = build_datasets(cfg)
    assert len(train_ds) == 12 and len(eval_ds) == 12
    assert eval_ds.classes == ["circle", "square", "triangle"]
    _, folder_eval = build_datasets(folder_cfg(shapes_root, interpolation="bicubic"))
    for i in range(12):
        hf_tensor, hf_label = eval_ds[i]
        folder_tensor, folder_label = folder_eval[i]
        assert hf_label == folder_label
        torch.testing.assert_close(hf_tensor, folder_tensor, atol=0, rtol=0)  # lossless copy of the same pixels
    assert train_ds[0][0].shape == (3, 32, 32)

    train_ds, eval_ds = build_datasets(folder_cfg(saved, source="hf", train_subset=4, eval_subset=2))
    assert (len(train_ds), len(eval_ds)) == (4, 2)
    assert [eval_ds[i][1] for i in range(2)] == [0, 0]


def test_hf_imagefolder_builder_offline(shapes_root, hf_cache):
    cfg = folder_cfg(shapes_root, source="hf", input_size=[1, 24, 24], mean=[0.4], std=[0.2], crop_pct=1.0)
    train_ds, eval_ds = build_datasets(cfg)
    assert len(train_ds) == 12 and len(eval_ds) == 12
    assert hf_cache.exists()  # prepared in the private cache, no network
    _, folder_eval = build_datasets(folder_cfg(shapes_root, input_size=[1, 24, 24], mean=[0.4], std=[0.2],
                                               crop_pct=1.0))
    got = sorted((eval_ds[i][1], eval_ds[i][0].sum().item()) for i in range(12))
    want = sorted((folder_eval[i][1], folder_eval[i][0].sum().item()) for i in range(12))
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-3)
    assert eval_ds[0][0].shape == (1, 24, 24)


def test_hf_errors_list_splits_and_columns(shapes_root, tmp_path, hf_cache):
    saved = du.make_hf_saved_dataset(tmp_path / "saved", shapes_root)
    with pytest.raises(ValueError, match=r"available splits: \['train', 'validation'\]"):
        build_datasets(folder_cfg(saved, source="hf", eval_split="test"))
    with pytest.raises(ValueError, match=r"available columns: \['image', 'label'\]"):
        build_datasets(folder_cfg(saved, source="hf", label_column="fine_label"))
    with pytest.raises(ValueError, match="root .* or data.hf_name"):
        build_datasets(DataConfig(source="hf"))


# ------------------------------------------------------------------ DataLoaders


def test_build_dataloaders_seeded_shuffle_and_batches(tmp_path):
    root, arrays = du.make_tiny_fashion_mnist(tmp_path, n_train=30, n_test=11)
    cfg = fmnist_cfg(root, batch_size=8, eval_batch_size=5)

    def train_label_order(seed):
        train_loader, _ = build_dataloaders(cfg, seed=seed)
        return torch.cat([labels for _, labels in train_loader]).tolist()

    order = train_label_order(0)
    assert len(order) == 24  # 3 full batches of 8, the last 6 examples dropped
    assert order == train_label_order(0)
    orders = {tuple(train_label_order(s)) for s in range(1, 5)} | {tuple(order)}
    assert len(orders) > 1
    train_loader, eval_loader = build_dataloaders(cfg, seed=0)
    assert train_loader.drop_last and not eval_loader.drop_last
    assert [len(y) for _, y in eval_loader] == [5, 5, 1]
    assert torch.cat([y for _, y in eval_loader]).tolist() == arrays["t10k"][1].tolist()  # eval in order
    images, _ = next(iter(eval_loader))
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.float32
    assert train_loader.pin_memory == torch.cuda.is_available()


def test_build_dataloaders_with_workers(shapes_root):
    train_loader, eval_loader = build_dataloaders(folder_cfg(shapes_root, num_workers=1), seed=0)
    # train workers are re-created each epoch so that the per-epoch augmentation seed reaches them
    assert not train_loader.persistent_workers and eval_loader.persistent_workers and eval_loader.num_workers == 1
    images, labels = next(iter(eval_loader))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 0, 0]


def test_augmentation_is_a_function_of_seed_epoch_and_index(shapes_root):
    from st3_hf.train.data.loaders import EpochSeededDataset
    train_ds, _ = build_datasets(folder_cfg(shapes_root))
    seeded = EpochSeededDataset(train_ds, seed=7)
    seeded.set_epoch(2)
    torch.manual_seed(0)
    first = [seeded[i][0] for i in range(len(seeded))]
    torch.manual_seed(123)  # whatever the global RNG state (prefetching, resumes, workers) ...
    random_state = torch.get_rng_state()
    again = [seeded[i][0] for i in reversed(range(len(seeded)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # ... the same images come back
    assert torch.equal(torch.get_rng_state(), random_state)  # and the global RNG is left untouched
    seeded.set_epoch(3)
    other_epoch = [seeded[i][0] for i in range(len(seeded))]
    assert any(not torch.equal(a, b) for a, b in zip(first, other_epoch))


# ------------------------------------------------------------------ device-resident loader


def make_loader(images, batch_size, **kw):
    defaults = dict(train=True, mean=(0.0,), std=(1.0,), device="cpu", seed=0)
    defaults.update(kw)
    return DeviceResidentLoader(images, torch.arange(len(images)), batch_size, **defaults)


def collect(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), [y.tolist() for _, y in batches]


def test_device_loader_deterministic_per_seed_and_epoch():
    images = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    a = make_loader(images, 8, padding=2, hflip=0.5, seed=3)
    b = make_loader(images, 8, padding=2, hflip=0.5, seed=3)
    xa, ya = collect(a, 1)
    xb, yb = collect(b, 1)
    assert ya == yb and torch.equal(xa, xb)
    xa2, ya2 = collect(a, 1)  # re-iterating the same epoch repeats it
    assert ya2 == ya and torch.equal(xa2, xa)
    _, y_next_epoch = collect(a, 2)
    _, y_other_seed = collect(make_loader(images, 8, padding=2, hflip=0.5, seed=4), 1)
    assert y_next_epoch != ya and y_other_seed != ya
    flat = sorted(sum(ya, []))
    assert flat == list(range(40))  # a permutation (40 is a multiple of 8)


@pytest.mark.parametrize("n,batch_size", [(13, 3), (13, 6), (20, 4)])
@pytest.mark.parametrize("train", [True, False])
def test_device_loader_two_ranks_cover_every_example_once(n, batch_size, train):
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8)
    per_rank = []
    for rank in range(2):
        loader = make_loader(images, batch_size, train=train, rank=rank, world_size=2, drop_last=False)
        _, labels = collect(loader, 5)
        assert len(labels) == len(loader)
        per_rank.append(labels)
    assert len(per_rank[0]) == len(per_rank[1])  # ranks stay in step
    seen = sum(per_rank[0], []) + sum(per_rank[1], [])
    assert sorted(seen) == list(range(n))
    for labels in per_rank:  # all batches full except the last
        assert all(len(b) == batch_size for b in labels[:-1]) and len(labels[-1]) <= batch_size
    if not train:  # eval: rank r reads examples r, r + 2, r + 4, ... in order
        assert sum(per_rank[1], []) == list(range(1, n, 2))


def test_device_loader_drop_last_equal_full_batches():
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8)
    per_rank = []
    for rank in range(3):
        loader = make_loader(images, 3, rank=rank, world_size=3, drop_last=True)
        assert len(loader) == 2  # 23 // 3 = 7 examples per rank, 2 full batches
        _, labels = collect(loader, 0)
        assert [len(b) for b in labels] == [3, 3]
        per_rank.append(set(sum(labels, [])))
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[0] & per_rank[2]) and not (per_rank[1] & per_rank[2])


@pytest.mark.parametrize("chans", [1, 3])
def test_device_loader_crop_and_flip_match_per_image_reference(chans):
    torch.manual_seed(0)
    n, size, padding = 64, 7, 2
    images = torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8)
    mean, std = [0.2, 0.5, 0.7][:chans], [0.3, 0.25, 0.4][:chans]
    loader = make_loader(images, 16, padding=padding, hflip=0.5, mean=mean, std=std, seed=1)
    offsets, flips = set(), set()
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch, labels in loader:
            assert batch.shape == (16, chans, size, size) and batch.dtype == torch.float32
            for out, index in zip(batch, labels.tolist()):
                source = images[index].numpy()
                found = []
                for flip in (False, True):
                    for dy in range(2 * padding + 1):
                        for dx in range(2 * padding + 1):
                            padded = np.pad(source, ((0, 0), (padding, padding), (padding, padding)))
                            crop = padded[:, dy:dy + size, dx:dx + size]
                            if flip:
                                crop = crop[:, :, ::-1]
                            ref = normalise(crop.transpose(1, 2, 0), mean, std)
                            if torch.allclose(out, ref, atol=1e-5):
                                found.append((dy, dx, flip))
                assert len(found) == 1, f"example {index}: {found}"
                offsets.add(found[0][:2])
                flips.add(found[0][2])
    assert flips == {False, True}
    assert len(offsets) >= 10  # of 25 possible offsets, over 128 draws
    # offsets span the whole range [0, 2 * padding] in both directions (seeded, so not flaky)
    assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == set(range(2 * padding + 1))


def test_device_loader_normalisation_without_augmentation():
    images = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for train in (False, True):  # train without padding / flip: only the order changes
        loader = make_loader(images, 4, train=train, mean=mean, std=std, padding=0, hflip=0.0, drop_last=False)
        for batch, labels in loader:
            for out, index in zip(batch, labels.tolist()):
                ref = normalise(images[index].numpy().transpose(1, 2, 0), mean, std)
                torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_device_loader_validates_inputs():
    with pytest.raises(ValueError, match="uint8"):
        make_loader(torch.zeros(4, 1, 2, 2), 2)
    with pytest.raises(ValueError, match="rank"):
        make_loader(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), 2, rank=2, world_size=2)


def test_build_device_resident_loaders_match_dataset_path(tmp_path, shapes_root):
    root, arrays = du.make_tiny_fashion_mnist(tmp_path, n_train=30, n_test=11)
    cfg = fmnist_cfg(root, batch_size=8, eval_batch_size=4, train_subset=24)
    train_loader, eval_loader = build_device_resident_loaders(cfg, "cpu", seed=0)
    assert len(train_loader) == 3 and len(eval_loader) == 3
    _, eval_ds = build_datasets(cfg)
    device_eval = torch.cat([x for x, _ in eval_loader])
    dataset_eval = torch.stack([eval_ds[i][0] for i in range(len(eval_ds))])
    torch.testing.assert_close(device_eval, dataset_eval, atol=1e-6, rtol=0)
    train_loader.set_epoch(0)
    seen = torch.cat([y for _, y in train_loader])
    assert sorted(seen.tolist()) == sorted(arrays["train"][1][:24].tolist())

    # image folders are decoded once with the eval geometry; train is sharded, eval is not
    cfg = folder_cfg(shapes_root, batch_size=4, random_crop_padding=2)
    train_loader, eval_loader = build_device_resident_loaders(cfg, "cpu", seed=0, rank=1, world_size=2)
    assert len(train_loader) == 1 and len(eval_loader) == 3
    train_loader.set_epoch(0)
    assert [len(y) for _, y in train_loader] == [4]  # 12 examples / 2 ranks = 6 -> one full batch of 4
    _, eval_ds = build_datasets(cfg)
    device_eval = torch.cat([x for x, _ in eval_loader])
    dataset_eval = torch.stack([eval_ds[i][0] for i in range(len(eval_ds))])
    torch.testing.assert_close(device_eval, dataset_eval, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ pretrained_cfg


@pytest.mark.parametrize("kind", ["fashion_mnist", "imagefolder"])
def test_pretrained_cfg_reproduces_eval_transform(kind, tmp_path, shapes_root):
    import timm
    from timm.data import create_transform, resolve_data_config

    if kind == "fashion_mnist":
        root, arrays = du.make_tiny_fashion_mnist(tmp_path, n_train=4, n_test=3)
        cfg = fmnist_cfg(root)
        image = Image.fromarray(arrays["t10k"][0][1])
    else:
        cfg = folder_cfg(shapes_root, interpolation="bicubic", crop_pct=0.9, mean=[0.5, 0.4, 0.3])
        image = du.image_folder_records(shapes_root, "val")[0][1]
    pretrained_cfg = pretrained_cfg_for(cfg)
    assert "num_classes" not in pretrained_cfg and pretrained_cfg["crop_mode"] == "center"
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=cfg.input_size[0])
    model.pretrained_cfg = pretrained_cfg
    transform = create_transform(**resolve_data_config({}, model=model))
    _, eval_ds = build_datasets(cfg)
    torch.testing.assert_close(transform(image), eval_ds[1][0], atol=0, rtol=0)
