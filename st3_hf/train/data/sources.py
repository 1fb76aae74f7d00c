"""Training / evaluation datasets from a :class:`~st3_hf.train.recipe_schema.DataConfig`, each yielding
``(image_tensor, int_label)`` with ``classes`` (class names, index order). An image that cannot be read is named
once on stderr and yields a black placeholder with :data:`UNREADABLE_LABEL` (timm's reader silently substitutes
the next image)."""
from __future__ import annotations

import functools
import gzip
import io
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from st3_hf.errors import DataError, describe_cause
from st3_hf.train.recipe_schema import CHOICES, DataConfig
from st3_hf.train.data.transforms import build_eval_transform, build_train_transform, image_mode_of

VALID_SOURCES = CHOICES["data.source"]
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# Fashion-MNIST has no validation split: every eval split name means the 10k test set ("t10k" files)
_FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k", "validation": "t10k", "val": "t10k"}
_EVAL_FOLDER_SYNONYMS = ("validation", "val", "valid", "eval")
UNREADABLE_LABEL = -100  # CrossEntropyLoss ignores it (its default ignore_index) and evaluation leaves it out
# IDX type code -> big-endian numpy dtype
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    print(message, file=sys.stderr)


class ImageDataset(Dataset):
    """``(transform(image), label)`` of ``items``: ``(path or uint8 array, label)`` pairs, or the rows of a
    ``datasets.Dataset`` (``columns``: its image and label columns; an image undecoded, or decoded)."""

    def __init__(self, cfg: DataConfig, items: Sequence[Any], transform: Callable, classes: Sequence[str],
                 columns: Optional[Tuple[str, str]] = None, split: str = ""):
        self.items, self.transform, self.mode, self.classes = items, transform, image_mode_of(cfg), list(classes)
        self.columns, self.split = columns, split
        self.placeholder = transform(Image.new(self.mode, (int(cfg.input_size[2]), int(cfg.input_size[1]))))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        item = self.items[int(index)]
        image, label = (item[self.columns[0]], item[self.columns[1]]) if self.columns else item
        name = image
        if isinstance(image, dict):  # an undecoded datasets.Image: {"bytes": ..., "path": ...}
            name = image.get("path") or f"row {index} of split {self.split!r}"
            image = image.get("path") if image.get("bytes") is None else io.BytesIO(image["bytes"])
        elif not isinstance(image, (str, Image.Image)):
            image = Image.fromarray(np.asarray(image))
        try:
            if not isinstance(image, Image.Image):
                with Image.open(image) as opened:
                    image = opened.convert(self.mode)  # decodes the pixels: truncated files fail here
        # PIL: not an image, truncated, or a decompression bomb (a small file that decodes to gigapixels)
        except (OSError, ValueError, SyntaxError, TypeError, AttributeError, Image.DecompressionBombError) as err:
            _say_once(f"warning: skipping unreadable image {name} ({describe_cause(err)}); it is counted in "
                      f"metrics.jsonl (train_skipped_images / eval_skipped_images)")
            return self.placeholder, UNREADABLE_LABEL
        return self.transform(image if image.mode == self.mode else image.convert(self.mode)), int(label)


# ---------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """An IDX file (``*-idx3-ubyte[.gz]``: big-endian, two zero bytes, a type code, ``ndim``, ``ndim`` uint32
    sizes, the values in C order) as a numpy array; a bad header or payload is a :class:`DataError` naming the file.

    >>> read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").shape
    (60000, 28, 28)
    """
    path = os.fspath(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except gzip.BadGzipFile as e:  # a renamed / truncated archive
        raise DataError(f"{path}: not a valid gzip file ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{int.from_bytes(raw[:4], 'big'):08x} (expected "
                        f"0x0000TTNN with type TT in {sorted(hex(k) for k in IDX_DTYPES)} and NN >= 1 dims)")
    ndim, dtype, header_len = raw[3], IDX_DTYPES[raw[2]], 4 + 4 * raw[3]
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header (declares {ndim} dims, file has {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected, actual = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, len(raw) - header_len
    if actual != expected:
        raise DataError(f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes of data) "
                        f"but the file holds {actual} bytes of data")
    # native byte order, writable copy (torch.from_numpy warns on read-only buffers)
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(root: str, stem: str) -> str:
    # the files directly in root, or in the torchvision layout root/FashionMNIST/raw
    for folder in (root, os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "raw")):
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} (nor in FashionMNIST/raw, raw)")


def load_fashion_mnist_arrays(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of a split ("train", or "test"/"validation"... for t10k)."""
    if not root:
        raise DataError("data.root must name the folder holding the Fashion-MNIST IDX files")
    if split not in _FASHION_MNIST_SPLITS:
        raise DataError(f"unknown Fashion-MNIST split {split!r} (data.train_split / data.eval_split); "
                        f"valid: {sorted(_FASHION_MNIST_SPLITS)}")
    images, labels = (read_idx(_find_idx_file(root, f"{_FASHION_MNIST_SPLITS[split]}-{kind}"))
                      for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"Fashion-MNIST {split}: images of shape {images.shape} but labels of shape {labels.shape}")
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------- image folders (timm reader)
def _subfolders(path: str) -> List[str]:
    """Sorted visible subfolders of ``path``. Hidden ones (``.ipynb_checkpoints``, ``.cache``...) are
    never classes: as class 0 they would shift every label by one. Skipping is said once per folder."""
    names = sorted(e.name for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else []
    if hidden := [n for n in names if n.startswith(".")]:
        _say_once(f"note: {path}: hidden folders {hidden[:5]} are not classes, skipped")
    return [n for n in names if not n.startswith(".")]


def _split_folder(cfg: DataConfig, eval_split: bool) -> str:
    """``root/split``; for an eval split, a missing folder falls back to its synonyms (validation -> val, ...)."""
    if not cfg.root or not os.path.isdir(cfg.root):
        raise DataError(f"data.root {cfg.root!r} is not a folder; set data.root to a folder laid out as "
                        f"train/<class>/<image> and val/<class>/<image> (the ImageNet layout)")
    split = cfg.eval_split if eval_split else cfg.train_split
    synonyms = _EVAL_FOLDER_SYNONYMS if eval_split and split in _EVAL_FOLDER_SYNONYMS + ("test",) else ()
    candidates = [split] + [s for s in synonyms if s != split]
    for name in candidates:
        if os.path.isdir(os.path.join(cfg.root, name)):
            _check_folder_links(os.path.join(cfg.root, name), cfg.root)
            return os.path.join(cfg.root, name)
    raise DataError(f"no split folder {' / '.join(candidates)} in {cfg.root} (data."
                    f"{'eval' if eval_split else 'train'}_split); available: {_subfolders(cfg.root) or 'none'}")


@functools.lru_cache(maxsize=None)
def _check_folder_links(split_dir: str, root: str) -> None:
    """Refuse folder links inside a split that loop (to the split or one of its parents) or lead into another
    split of ``root``: timm's reader follows links, so they would add classes and the other split's images."""
    real_split, real_root = os.path.realpath(split_dir), os.path.realpath(root)
    for folder, subfolders, _ in os.walk(split_dir):
        for link in (os.path.join(folder, name) for name in subfolders if os.path.islink(os.path.join(folder, name))):
            target = os.path.realpath(link)
            loops = os.path.commonpath([target, os.path.realpath(folder)]) == target
            if loops or target == real_root or (target.startswith(real_root + os.sep)
                                                and not target.startswith(real_split + os.sep)):
                where = "a folder that contains it" if loops else f"outside the split folder {split_dir}"
                raise DataError(f"{link} is a link to {target}, {where}: remove the link (images of one split must "
                                f"not enter another, and a loop would repeat them)")


def _imagefolder(cfg: DataConfig, transforms: Sequence[Callable]) -> List[Dataset]:
    from timm.data import create_dataset

    train_dir, eval_dir = _split_folder(cfg, eval_split=False), _split_folder(cfg, eval_split=True)
    # one class -> index map for both splits: sorted class-folder names of train (as torchvision / HF do);
    # timm would otherwise build one per split and silently drop eval images of unknown classes
    classes = _subfolders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class subfolders; put each class's images in {train_dir}/<class>/")
    if unknown := sorted(set(_subfolders(eval_dir)) - set(classes)):
        raise DataError(f"eval folder {eval_dir} (data.eval_split) has classes missing from {train_dir}: "
                        f"{unknown[:10]}")
    out = []
    for folder, transform, subset in zip((train_dir, eval_dir), transforms, (cfg.train_subset, cfg.eval_subset)):
        # timm's reader lists the (path, class) pairs; search_split=False: the folder is already resolved
        try:
            reader = create_dataset("", root=folder, search_split=False,
                                    class_map={name: index for index, name in enumerate(classes)}).reader
        except RuntimeError as err:  # timm: "Found 0 images in subfolders of ..."
            raise DataError(f"no images found under {folder} ({err})") from err
        samples = [(path, target) for path, target in reader.samples
                   if not any(part.startswith(".") for part in os.path.relpath(path, folder).split(os.sep))]
        if not samples:
            raise DataError(f"no images found under {folder} (looked for image files in its class folders)")
        out.append(ImageDataset(cfg, samples[:subset], transform, classes))
    return out


# ---------------------------------------------------------------- Hugging Face datasets
def load_hf_dataset_dict(cfg: DataConfig) -> Any:
    """The ``datasets.DatasetDict`` a recipe names: ``save_to_disk`` folder, image folder, or cached hub dataset."""
    import datasets

    # an explicit data.hf_name wins: `data.source=hf data.hf_name=imagenet-1k` on top of an image-folder
    # recipe must not read the recipe's data.root (which names the folder copy of the data)
    if cfg.root and not cfg.hf_name:
        if not os.path.isdir(cfg.root):
            raise DataError(f"data.root {cfg.root!r} does not exist")
        if not any(os.path.isfile(os.path.join(cfg.root, n)) for n in ("dataset_dict.json", "state.json")):
            # a folder of images (train/<class>/..., validation|val/<class>/...): the packaged builder, offline
            return datasets.load_dataset("imagefolder", data_dir=cfg.root)
        loaded = datasets.load_from_disk(cfg.root)
        if isinstance(loaded, datasets.Dataset):
            raise DataError(f"{cfg.root} holds a single datasets.Dataset; save a DatasetDict with "
                            f"{cfg.train_split!r} and {cfg.eval_split!r} splits instead")
        return loaded
    if not cfg.hf_name:
        raise DataError("data.source 'hf' needs data.root (save_to_disk folder or image folder) or data.hf_name")
    if cfg.root:
        print(f"note: data.source 'hf' with data.hf_name {cfg.hf_name!r}: data.root {cfg.root!r} is not used",
              file=sys.stderr)
    try:  # from the local cache when HF_DATASETS_OFFLINE=1 and the dataset was prepared before
        return datasets.load_dataset(cfg.hf_name)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(f"data.hf_name {cfg.hf_name!r} cannot be loaded ({describe_cause(err)}); "
                        f"prepare it once with network access, or point data.root at a save_to_disk folder") from err


def _hf_split(dataset_dict: Any, cfg: DataConfig, split: str, subset: Optional[int] = None) -> Tuple[Any, List[str]]:
    """The split (its first ``subset`` rows) and its class names (empty for an integer label column)."""
    if split not in dataset_dict:
        key = "data.train_split" if split == cfg.train_split else "data.eval_split"
        raise DataError(f"split {split!r} ({key}) not in the dataset; available splits: {sorted(dataset_dict.keys())}")
    ds = dataset_dict[split]
    for key, column in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if column not in ds.column_names:
            raise DataError(f"column {column!r} ({key}) not in split {split!r}; available columns: {ds.column_names}")
    names = getattr(ds.features[cfg.label_column], "names", None)
    if names is None and not str(getattr(ds.features[cfg.label_column], "dtype", "")).startswith(("int", "uint")):
        raise DataError(f"label column {cfg.label_column!r} (data.label_column) has type "
                        f"{ds.features[cfg.label_column]}; integer labels are needed (convert it with "
                        f"dataset.class_encode_column({cfg.label_column!r}) before saving)")
    return (ds if subset is None else ds.select(range(min(subset, len(ds))))), list(names or [])


# ---------------------------------------------------------------- entry points
def _check_source(cfg: DataConfig) -> None:
    if cfg.source not in VALID_SOURCES:
        raise DataError(f"unknown data.source {cfg.source!r}; valid sources: {', '.join(VALID_SOURCES)}")


def _build(cfg: DataConfig, *transforms: Callable) -> List[Dataset]:
    """The train and eval datasets, with ``transforms`` (train, eval)."""
    _check_source(cfg)
    if cfg.source == "imagefolder":
        return _imagefolder(cfg, transforms)
    dataset_dict, out = load_hf_dataset_dict(cfg) if cfg.source == "hf" else None, []
    for split, transform, subset in zip((cfg.train_split, cfg.eval_split), transforms,
                                        (cfg.train_subset, cfg.eval_subset)):
        if dataset_dict is None:  # fashion_mnist
            images, labels = load_fashion_mnist_arrays(cfg.root, split)
            out.append(ImageDataset(cfg, list(zip(images[:subset], labels[:subset])), transform, FASHION_MNIST_CLASSES))
            continue
        import datasets
        ds, classes = _hf_split(dataset_dict, cfg, split, subset)
        ds = ds.select_columns([cfg.image_column, cfg.label_column])
        if isinstance(ds.features[cfg.image_column], datasets.Image):
            # decoded here, not inside datasets: a broken image is then named and skipped, not a traceback
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        out.append(ImageDataset(cfg, ds, transform, classes, (cfg.image_column, cfg.label_column), split))
    return out


def build_datasets(cfg: DataConfig) -> Tuple[Dataset, Dataset]:
    """Train and eval datasets yielding ``(float CHW normalised tensor, int label)`` (the transforms of
    :mod:`~st3_hf.train.data.transforms`); ``train_subset`` / ``eval_subset`` keep the first N examples.

    >>> cfg = DataConfig(source="fashion_mnist", root="/usr/share/datasets/fashion-mnist", input_size=[1, 28, 28],
    ...                  mean=[0.286], std=[0.353], crop_pct=1.0, random_crop_padding=4, eval_split="test")
    >>> build_datasets(cfg)[1][0][0].shape
    torch.Size([1, 28, 28])
    """
    return tuple(_build(cfg, build_train_transform(cfg), build_eval_transform(cfg)))


def load_uint8_splits(cfg: DataConfig) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[(train_images, train_labels), (eval_images, eval_labels)]``, images uint8 NCHW at ``cfg.input_size``,
    un-normalised (to decode data once for device-resident loading)."""
    if cfg.source == "fashion_mnist" and tuple(cfg.input_size[1:]) == (28, 28):
        image_mode_of(cfg)  # validates the channel count (1 or 3)
        splits = [load_fashion_mnist_arrays(cfg.root, split) for split in (cfg.train_split, cfg.eval_split)]
        chans = int(cfg.input_size[0])  # 3 channels: like PIL convert("RGB")
        return [(torch.from_numpy(images[:n]).unsqueeze(1).expand(-1, chans, -1, -1).contiguous(),
                 torch.from_numpy(labels[:n])) for (images, labels), n in zip(splits, (cfg.train_subset, cfg.eval_subset))]
    raw = build_eval_transform(cfg, normalize=False)  # decode once with the eval geometry (resize, crop), keep uint8
    return [tuple(map(torch.cat, zip(*torch.utils.data.DataLoader(ds, batch_size=256, num_workers=cfg.num_workers))))
            for ds in _build(cfg, raw, raw)]


def class_names_of(cfg: DataConfig) -> List[str]:
    """The class names of the training data in label order, read without decoding any image (empty
    for an integer label column).

    >>> class_names_of(DataConfig(source="fashion_mnist"))[:2]
    ['T-shirt/top', 'Trouser']
    """
    _check_source(cfg)
    if cfg.source == "hf":
        return _hf_split(load_hf_dataset_dict(cfg), cfg, cfg.train_split)[1]
    return list(FASHION_MNIST_CLASSES) if cfg.source == "fashion_mnist" else _subfolders(_split_folder(cfg, False))


def check_num_classes(cfg: DataConfig, num_classes: int) -> List[str]:
    """The class names (:func:`class_names_of`); a :class:`DataError` naming ``model.num_classes`` when
    their number differs from ``num_classes`` (else the first out-of-range label fails mid-training), or when a
    label of the rows a run reads (an integer column is not bounded by anything else) is outside it."""
    hf = cfg.source == "hf"
    names, dataset_dict = (None, load_hf_dataset_dict(cfg)) if hf else (class_names_of(cfg), None)  # one load
    for split, subset in ((cfg.train_split, cfg.train_subset), (cfg.eval_split, cfg.eval_subset)) if hf else ():
        ds, classes = _hf_split(dataset_dict, cfg, split, subset)
        names = classes if names is None else names
        labels = ds.select_columns([cfg.label_column]).with_format("numpy")[:][cfg.label_column]
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"label column {cfg.label_column!r} (data.label_column) of split {split!r} holds labels "
                            f"{labels.min()}..{labels.max()}, but model.num_classes is {num_classes}: labels must lie "
                            f"in 0..{num_classes - 1} (set model.num_classes, or fix the labels)")
    if names and len(names) != int(num_classes):
        where = f"{cfg.root}" if cfg.source == "imagefolder" else (cfg.hf_name or cfg.root or cfg.source)
        raise DataError(f"model.num_classes is {num_classes} but the training data {where} has {len(names)} "
                        f"classes ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): set "
                        f"model.num_classes={len(names)}")
    return names
