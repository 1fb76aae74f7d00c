"""Helpers that write tiny real-image datasets into temporary folders (shared by the test modules)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SHAPE_CLASSES = ("circle", "square", "triangle")
# one colour per split so an eval image can never be confused with a train image
_SPLIT_COLOURS = {"train": (220, 40, 40), "val": (40, 160, 60), "validation": (40, 160, 60), "test": (40, 60, 200)}


def shape_image(kind: str, index: int, size: int = 40, colour: Tuple[int, int, int] = (220, 40, 40)) -> Image.Image:
    """An RGB image of one filled shape on a grey background; ``index`` shifts and shades it (distinct images)."""
    image = Image.new("RGB", (size, size), (128 + 10 * (index % 5), 128, 128))
    draw = ImageDraw.Draw(image)
    shift = index % 6
    lo, hi = size // 5 + shift, size - size // 5 - 1 + shift // 2
    shade = tuple(min(255, c + 7 * index) for c in colour)
    if kind == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=shade)
    elif kind == "square":
        draw.rectangle((lo, lo, hi, hi), fill=shade)
    elif kind == "triangle":
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=shade)
    else:
        raise ValueError(kind)
    return image


def make_image_folder(
    root: Union[str, Path],
    classes: Sequence[str] = SHAPE_CLASSES,
    per_class: Union[int, Dict[str, int]] = 4,
    size: int = 40,
    splits: Sequence[str] = ("train", "val"),
    ext: str = ".JPEG",
) -> Path:
    """Write ``root/<split>/<class>/<class>_<i><ext>`` images (ImageNet layout); returns ``root``.

    ``per_class`` may be a dict ``{split: count}``.
    """
    root = Path(root)
    for split in splits:
        count = per_class[split] if isinstance(per_class, dict) else per_class
        for kind in classes:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            shape = kind if kind in SHAPE_CLASSES else SHAPE_CLASSES[hash(kind) % 3]
            for i in range(count):
                image = shape_image(shape, i, size, _SPLIT_COLOURS.get(split, (200, 200, 40)))
                image.save(folder / f"{kind}_{i}{ext}", quality=95)
    return root


def image_folder_records(root: Union[str, Path], split: str) -> Tuple[list, list, list]:
    """``(pil_images_rgb, labels, class_names)`` of a split written by :func:`make_image_folder`, in sorted
    class / file order (labels index the sorted class folder names)."""
    split_dir = Path(root) / split
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((split_dir / name).iterdir()):
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            labels.append(label)
    return images, labels, classes


def make_hf_saved_dataset(path: Union[str, Path], image_root: Union[str, Path],
                          splits: Dict[str, str] = None) -> Path:
    """``datasets.DatasetDict`` (``Dataset.from_dict``, ClassLabel labels) of the images of an image folder,
    written with ``save_to_disk`` to ``path``. ``splits`` maps dataset split -> folder split."""
    import datasets

    splits = splits or {"train": "train", "validation": "val"}
    parts = {}
    for split, folder_split in splits.items():
        images, labels, classes = image_folder_records(image_root, folder_split)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        parts[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return Path(path)


def write_idx(path: Union[str, Path], array: np.ndarray, type_code: int = 0x08, magic: bytes = None) -> Path:
    """Write ``array`` (uint8 unless ``type_code`` says otherwise) as an IDX file, gzipped if ``path`` ends with .gz.

    ``magic`` replaces the 4 magic bytes (to make corrupt files)."""
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = magic if magic is not None else bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtypes[type_code]).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def make_tiny_fashion_mnist(root: Union[str, Path], n_train: int = 20, n_test: int = 10, gz: bool = True,
                            seed: int = 0) -> Tuple[Path, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Fashion-MNIST-layout IDX files holding random 28x28 images; returns ``(root, {split: (images, labels)})``."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(Path(root) / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(Path(root) / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels.astype(np.int64))
    return Path(root), arrays


def fashion_mnist_available() -> bool:
    return os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
