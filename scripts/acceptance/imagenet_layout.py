"""Generated ImageNet-layout JPEG folders (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) for loader speed runs.

The pixels are noise-textured colour gradients, so a JPEG costs about what a photo of the same size
costs to decode (flat images would decode unrealistically fast). Only ``distinct`` images are
encoded; the files reuse their bytes, which keeps generation to seconds even for 80k files
while every file is still read and decoded on its own.

>>> import tempfile
>>> root = write_imagenet_layout(tempfile.mkdtemp(), num_classes=2, train_per_class=3, val_per_class=1, size=(48, 32))
>>> sorted(p.name for p in (root / "train").iterdir())
['n00000000', 'n00000001']
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Tuple

import numpy as np


def _encoded_images(count: int, size: Tuple[int, int], seed: int, quality: int) -> List[bytes]:
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(count):
        colour = rng.uniform(0, 255, size=(3, 3)).astype(np.float32)  # per channel: offset, x slope, y slope
        base = colour[:, 0, None, None] + colour[:, 1, None, None] * xx / width - colour[:, 2, None, None] * yy / height
        noise = rng.normal(0, 25, size=(3, height, width)).astype(np.float32)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality)
        images.append(buf.getvalue())
    return images


def write_imagenet_layout(root: Path | str, num_classes: int = 1000, train_per_class: int = 80,
                          val_per_class: int = 1, size: Tuple[int, int] = (400, 300), distinct: int = 256,
                          seed: int = 0, quality: int = 90) -> Path:
    """Write ``num_classes`` class folders with the given number of JPEGs per split; returns ``root``.

    ``size`` is (width, height); ImageNet's training images average about 400x350.
    """
    if min(num_classes, train_per_class, val_per_class, distinct, *size) < 1:
        raise ValueError("num_classes, train_per_class, val_per_class, distinct and size must all be >= 1")
    root = Path(root)
    images = _encoded_images(min(distinct, num_classes * train_per_class), size, seed, quality)
    counter = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"n{c:08d}_{i}.JPEG").write_bytes(images[counter % len(images)])
                counter += 1
    return root
