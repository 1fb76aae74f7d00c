"""Training / evaluation datasets from a :class:`~st3_hf.train.recipe_schema.DataConfig`.

Every dataset yields ``(image_tensor, int_label)`` and exposes ``classes`` (class names, index order).
"""
from __future__ import annotations

import io
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from st3_hf.errors import DataError, DataNotFoundError, describe_cause
from st3_hf.train.recipe_schema import CHOICES, DataConfig
from st3_hf.train.data.idx import read_idx
from st3_hf.train.data.transforms import build_eval_transform, build_train_transform, image_mode_of

VALID_SOURCES = CHOICES["data.source"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Fashion-MNIST has no validation split: every eval split name means the 10k test set ("t10k" files)
_FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k", "validation": "t10k", "val": "t10k"}
_EVAL_FOLDER_SYNONYMS = ("validation", "val", "valid", "eval", "test")


class SubsetDataset(torch.utils.data.Subset):
    """``torch.utils.data.Subset`` that keeps the base dataset's ``classes``."""

    @property
    def classes(self) -> List[str]:
        return list(getattr(self.dataset, "classes", []))


# the label of an image that could not be read: CrossEntropyLoss ignores it (its default ignore_index)
# and evaluation leaves it out, so a bad file is never replaced by another image counted twice
UNREADABLE_LABEL = -100
_UNREADABLE_REPORTED: set = set()


def report_unreadable(name: str, err: BaseException) -> None:
    """Name an unreadable image on stderr, once per process (path and reason)."""
    if name in _UNREADABLE_REPORTED:
        return
    _UNREADABLE_REPORTED.add(name)
    print(f"warning: skipping unreadable image {name} ({describe_cause(err)}); it is counted in metrics.jsonl "
          f"(train_skipped_images / eval_skipped_images)", file=sys.stderr)


def _placeholder(cfg: DataConfig, transform: Optional[Callable]) -> Any:
    """What an unreadable image becomes: a black image through the split's own transform (right shape, dtype)."""
    chans, height, width = (int(v) for v in cfg.input_size)
    image = Image.new(image_mode_of(cfg), (width, height))
    return transform(image) if transform is not None else image


def _first_n(dataset: Dataset, n: Optional[int]) -> Dataset:
    if n is None:
        return dataset
    return SubsetDataset(dataset, range(min(n, len(dataset))))


# ---------------------------------------------------------------- Fashion-MNIST


class ArrayImageDataset(Dataset):
    """In-memory uint8 images ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` with integer labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Optional[Callable] = None,
        mode: str = "L",
        classes: Sequence[str] = (),
    ):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.mode = mode
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _find_idx_file(root: str, stem: str) -> str:
    # accept the files directly in root or in the torchvision layout root/FashionMNIST/raw
    for folder in (root, os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw")):
        for name in (stem + ".gz", stem):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise DataNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root} (nor in FashionMNIST/raw, raw)")


def load_fashion_mnist_arrays(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of a Fashion-MNIST split read from IDX files.

    ``split`` is "train", or "test"/"t10k"/"validation"/"val" for the 10k test set.
    """
    if not root:
        raise DataError("data.root must name the folder holding the Fashion-MNIST IDX files")
    if split not in _FASHION_MNIST_SPLITS:
        raise DataError(f"unknown Fashion-MNIST split {split!r} (data.train_split / data.eval_split); "
                        f"valid: {sorted(_FASHION_MNIST_SPLITS)}")
    prefix = _FASHION_MNIST_SPLITS[split]
    images = read_idx(_find_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"Fashion-MNIST {split} images: expected uint8 (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but labels of shape {labels.shape}")
    return images, labels.astype(np.int64)


def _fashion_mnist(cfg: DataConfig, split: str, transform: Callable, subset: Optional[int]) -> Dataset:
    images, labels = load_fashion_mnist_arrays(cfg.root, split)
    if subset is not None:  # slice before wrapping: no need to keep the rest in memory
        images, labels = images[:subset], labels[:subset]
    return ArrayImageDataset(images, labels, transform, mode=image_mode_of(cfg), classes=FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- image folders (timm reader)


_HIDDEN_REPORTED: set = set()


def _subfolders(path: str) -> List[str]:
    """Sorted visible subfolders of ``path``. Hidden ones (``.ipynb_checkpoints``, ``.cache``...) are
    never classes: as class 0 they would shift every label by one. Skipping is said once per folder."""
    if not os.path.isdir(path):
        return []
    names = sorted(e.name for e in os.scandir(path) if e.is_dir())
    hidden = [n for n in names if n.startswith(".")]
    if hidden and path not in _HIDDEN_REPORTED:
        _HIDDEN_REPORTED.add(path)
        print(f"note: {path}: hidden folders {hidden[:5]} are not classes, skipped", file=sys.stderr)
    return [n for n in names if not n.startswith(".")]


def resolve_split_folder(root: str, split: str, eval_split: bool) -> str:
    """``root/split``; for an eval split, a missing folder falls back to its synonyms (validation -> val, ...)."""
    candidates = [split]
    if eval_split and split in _EVAL_FOLDER_SYNONYMS:
        candidates += [s for s in _EVAL_FOLDER_SYNONYMS if s != split and s != "test"]
    for name in candidates:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    key = "data.eval_split" if eval_split else "data.train_split"
    raise DataNotFoundError(
        f"no split folder {' / '.join(candidates)} in {root} ({key}); available: {_subfolders(root) or 'none'}"
    )


def _imagefolder(cfg: DataConfig, train_transform: Callable, eval_transform: Callable) -> Tuple[Dataset, Dataset]:
    from timm.data import create_dataset

    if not cfg.root or not os.path.isdir(cfg.root):
        raise DataNotFoundError(
            f"data.root {cfg.root!r} is not a folder; set data.root to a folder laid out as "
            f"train/<class>/<image> and val/<class>/<image> (the ImageNet layout)"
        )
    train_dir = resolve_split_folder(cfg.root, cfg.train_split, eval_split=False)
    eval_dir = resolve_split_folder(cfg.root, cfg.eval_split, eval_split=True)
    # one class -> index map for both splits: sorted class-folder names of train (as torchvision / HF do);
    # timm would otherwise build one per split and silently drop eval images of unknown classes
    classes = _subfolders(train_dir)
    if not classes:
        raise DataNotFoundError(
            f"{train_dir} has no class subfolders; put each class's images in {train_dir}/<class>/"
        )
    unknown = sorted(set(_subfolders(eval_dir)) - set(classes))
    if unknown:
        raise DataError(f"eval folder {eval_dir} (data.eval_split) has classes missing from {train_dir}: {unknown[:10]}")
    class_map = {name: index for index, name in enumerate(classes)}
    mode = image_mode_of(cfg)

    def make(folder: str, transform: Callable) -> Dataset:
        # search_split=False: the folder is already resolved; timm's reader lists (path, class) pairs
        try:
            ds = create_dataset("", root=folder, search_split=False, class_map=class_map,
                                input_img_mode=mode, transform=transform)
        except RuntimeError as err:  # timm: "Found 0 images in subfolders of ..."
            raise DataNotFoundError(f"no images found under {folder} ({err})") from err
        samples = [(path, target) for path, target in ds.reader.samples
                   if not any(part.startswith(".") for part in os.path.relpath(path, folder).split(os.sep))]
        if not samples:
            raise DataNotFoundError(f"no images found under {folder} (looked for image files in its class folders)")
        return ImageFileDataset(samples, transform, mode, classes, _placeholder(cfg, transform))

    return (
        _first_n(make(train_dir, train_transform), cfg.train_subset),
        _first_n(make(eval_dir, eval_transform), cfg.eval_subset),
    )


class ImageFileDataset(Dataset):
    """``(path, label)`` samples read with PIL; an unreadable file (truncated, empty, not an image) is named
    once and yields ``placeholder`` with :data:`UNREADABLE_LABEL` (unlike timm's reader, which silently
    substitutes the next image)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable], mode: str,
                 classes: Sequence[str], placeholder: Any):
        self.samples = list(samples)
        self.transform = transform
        self.mode = mode
        self.classes = list(classes)
        self.placeholder = placeholder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert(self.mode)  # decodes the pixels: truncated files fail here
        except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated data
            report_unreadable(path, err)
            return self.placeholder, UNREADABLE_LABEL
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)


# ---------------------------------------------------------------- Hugging Face datasets


class HFImageDataset(Dataset):
    """Wrap a ``datasets.Dataset`` with an image column and an integer label column as ``(tensor, label)``."""

    def __init__(self, hf_dataset: Any, image_column: str, label_column: str, transform: Optional[Callable],
                 mode: str, classes: Sequence[str] = (), placeholder: Any = None, split: str = ""):
        import datasets

        hf_dataset = hf_dataset.select_columns([image_column, label_column])
        if isinstance(hf_dataset.features[image_column], datasets.Image):
            # decoded here, not inside datasets: a broken image is then named and skipped, not a traceback
            hf_dataset = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
        self.hf_dataset = hf_dataset
        self.placeholder = placeholder
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.mode = mode
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        row = self.hf_dataset[int(index)]
        image = row[self.image_column]
        if isinstance(image, dict):  # an undecoded datasets.Image: {"bytes": ..., "path": ...}
            name = image.get("path") or f"row {int(index)} of split {self.split!r}"
            try:
                data = image.get("bytes")
                with Image.open(io.BytesIO(data) if data is not None else image["path"]) as opened:
                    image = opened.convert(self.mode)
            except (OSError, ValueError, SyntaxError, KeyError, TypeError) as err:
                report_unreadable(name, err)
                return self.placeholder, UNREADABLE_LABEL
        elif not isinstance(image, Image.Image):  # e.g. an array column
            image = Image.fromarray(np.asarray(image))
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(row[self.label_column])


def _is_saved_dataset(path: str) -> bool:
    names = ("dataset_dict.json", "state.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def load_hf_dataset_dict(cfg: DataConfig) -> Any:
    """The ``datasets.DatasetDict`` a recipe names: ``save_to_disk`` folder, image folder, or cached hub dataset."""
    import datasets

    # an explicit data.hf_name wins: `data.source=hf data.hf_name=imagenet-1k` on top of an image-folder
    # recipe must not read the recipe's data.root (which names the folder copy of the data)
    if cfg.root and not cfg.hf_name:
        if not os.path.isdir(cfg.root):
            raise DataNotFoundError(f"data.root {cfg.root!r} does not exist")
        if _is_saved_dataset(cfg.root):
            loaded = datasets.load_from_disk(cfg.root)
            if isinstance(loaded, datasets.Dataset):
                raise DataError(
                    f"{cfg.root} holds a single datasets.Dataset; save a DatasetDict with "
                    f"{cfg.train_split!r} and {cfg.eval_split!r} splits instead"
                )
            return loaded
        # a folder of images (train/<class>/..., validation|val/<class>/...): the packaged builder, offline
        return datasets.load_dataset("imagefolder", data_dir=cfg.root)
    if cfg.hf_name:
        if cfg.root:
            print(f"note: data.source 'hf' with data.hf_name {cfg.hf_name!r}: data.root {cfg.root!r} is not used",
                  file=sys.stderr)
        # from the local cache when HF_DATASETS_OFFLINE=1 and the dataset was prepared before
        try:
            return datasets.load_dataset(cfg.hf_name)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            # offline: the dataset was never downloaded/prepared into the local cache
            raise DataNotFoundError(
                f"data.hf_name {cfg.hf_name!r} cannot be loaded ({describe_cause(err)}); "
                f"prepare it once with network access, or point data.root at a save_to_disk folder"
            ) from err
    raise DataError("data.source 'hf' needs data.root (save_to_disk folder or image folder) or data.hf_name")


def _hf_split(dataset_dict: Any, cfg: DataConfig, split: str) -> Any:
    if split not in dataset_dict:
        key = "data.train_split" if split == cfg.train_split else "data.eval_split"
        raise DataError(f"split {split!r} ({key}) not in the dataset; available splits: {sorted(dataset_dict.keys())}")
    ds = dataset_dict[split]
    for key, column in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if column not in ds.column_names:
            raise DataError(f"column {column!r} ({key}) not in split {split!r}; available columns: {ds.column_names}")
    return ds


def _hf_class_names(ds: Any, label_column: str) -> List[str]:
    feature = ds.features[label_column]
    names = getattr(feature, "names", None)
    if names is None:
        dtype = getattr(feature, "dtype", "")
        if not str(dtype).startswith(("int", "uint")):
            raise DataError(
                f"label column {label_column!r} (data.label_column) has type {feature}; integer labels are needed "
                f"(convert it with dataset.class_encode_column({label_column!r}) before saving)"
            )
        return []
    return list(names)


def _hf(cfg: DataConfig, train_transform: Callable, eval_transform: Callable) -> Tuple[Dataset, Dataset]:
    dataset_dict = load_hf_dataset_dict(cfg)
    mode = image_mode_of(cfg)
    out = []
    for split, transform, subset in ((cfg.train_split, train_transform, cfg.train_subset),
                                     (cfg.eval_split, eval_transform, cfg.eval_subset)):
        ds = _hf_split(dataset_dict, cfg, split)
        classes = _hf_class_names(ds, cfg.label_column)
        if subset is not None:
            ds = ds.select(range(min(subset, len(ds))))
        out.append(HFImageDataset(ds, cfg.image_column, cfg.label_column, transform, mode, classes,
                                  _placeholder(cfg, transform), split))
    return out[0], out[1]


# ---------------------------------------------------------------- entry point


def _build(cfg: DataConfig, train_transform: Callable, eval_transform: Callable) -> Tuple[Dataset, Dataset]:
    if cfg.source == "fashion_mnist":
        return (
            _fashion_mnist(cfg, cfg.train_split, train_transform, cfg.train_subset),
            _fashion_mnist(cfg, cfg.eval_split, eval_transform, cfg.eval_subset),
        )
    if cfg.source == "imagefolder":
        return _imagefolder(cfg, train_transform, eval_transform)
    if cfg.source == "hf":
        return _hf(cfg, train_transform, eval_transform)
    raise DataError(f"unknown data.source {cfg.source!r}; valid sources: {', '.join(VALID_SOURCES)}")


def build_datasets(cfg: DataConfig) -> Tuple[Dataset, Dataset]:
    """Train and eval datasets yielding ``(float CHW normalised tensor, int label)``.

    Train: :func:`~st3_hf.train.data.transforms.build_train_transform`; eval: timm's eval transform
    (see :func:`~st3_hf.train.data.transforms.pretrained_cfg_for`). ``train_subset`` / ``eval_subset`` keep the
    first N examples.

    Example:
        >>> cfg = DataConfig(source="fashion_mnist", root="/usr/share/datasets/fashion-mnist",
        ...                  input_size=[1, 28, 28], mean=[0.286], std=[0.353], crop_pct=1.0,
        ...                  random_crop_padding=4, eval_split="test")
        >>> train_ds, eval_ds = build_datasets(cfg)
        >>> image, label = eval_ds[0]; image.shape
        torch.Size([1, 28, 28])
    """
    return _build(cfg, build_train_transform(cfg), build_eval_transform(cfg))


def build_raw_datasets(cfg: DataConfig) -> Tuple[Dataset, Dataset]:
    """Like :func:`build_datasets` but both splits yield the eval geometry as uint8 CHW tensors, un-normalised
    (resized / center-cropped to ``input_size``; used to decode data once for device-resident loading)."""
    raw = build_eval_transform(cfg, normalize=False)
    return _build(cfg, raw, raw)


def class_names_of(cfg: DataConfig) -> List[str]:
    """The class names of the training data in label order, read without decoding any image:
    the visible class folders (image folders), the ``datasets`` ClassLabel names, or Fashion-MNIST's ten.

    Empty when the data has no names (an integer label column).

    Example:
        >>> class_names_of(DataConfig(source="fashion_mnist"))[:2]
        ['T-shirt/top', 'Trouser']
    """
    if cfg.source == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if cfg.source == "imagefolder":
        if not cfg.root or not os.path.isdir(cfg.root):
            raise DataNotFoundError(
                f"data.root {cfg.root!r} is not a folder; set data.root to a folder laid out as "
                f"train/<class>/<image> and val/<class>/<image> (the ImageNet layout)"
            )
        return _subfolders(resolve_split_folder(cfg.root, cfg.train_split, eval_split=False))
    if cfg.source == "hf":
        ds = _hf_split(load_hf_dataset_dict(cfg), cfg, cfg.train_split)
        return _hf_class_names(ds, cfg.label_column)
    raise DataError(f"unknown data.source {cfg.source!r}; valid sources: {', '.join(VALID_SOURCES)}")


def check_num_classes(cfg: DataConfig, num_classes: int) -> List[str]:
    """The class names (:func:`class_names_of`); a :class:`DataError` naming ``model.num_classes`` when
    their number differs from ``num_classes`` (else the first out-of-range label fails mid-training)."""
    names = class_names_of(cfg)
    if names and len(names) != int(num_classes):
        where = f"{cfg.root}" if cfg.source == "imagefolder" else (cfg.hf_name or cfg.root or cfg.source)
        raise DataError(
            f"model.num_classes is {num_classes} but the training data {where} has {len(names)} classes "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): set model.num_classes={len(names)}"
        )
    return names
