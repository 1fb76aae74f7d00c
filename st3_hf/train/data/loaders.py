"""Loaders for the training loop, augmentation randomness a pure function of (seed, epoch, example) (the global
RNGs' state depends on how far a DataLoader has prefetched: a resumed run, or one with another number of workers,
would augment differently): DataLoaders (Accelerate ``prepare``s them for sharding), and a device-resident loader
for datasets that fit in accelerator memory (Fashion-MNIST: 47 MB as uint8), each batch gathered, augmented
(pad-and-crop, flip: vectorised) and normalised on the device, with no workers and no copies."""
from __future__ import annotations

import hashlib
import logging
import math
import random
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from st3_hf.errors import DataError
from st3_hf.train.data.sources import build_datasets, load_uint8_splits
from st3_hf.train.data.transforms import norm_stats
from st3_hf.train.recipe_schema import DataConfig

logger = logging.getLogger(__name__)

Device = Union[str, torch.device]


class EpochSeededDataset(Dataset):
    """``dataset[i]`` drawn with the global RNGs seeded from ``(seed, epoch, i)``, their state restored after.

    >>> ds = EpochSeededDataset(base, seed=0); ds.set_epoch(3)  # doctest: +SKIP
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{int(index)}".encode(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little") & ((1 << 63) - 1)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


def build_dataloaders(cfg: DataConfig, seed: int) -> Tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by a generator seeded with ``seed``, ``drop_last``) and eval loader (in order);
    batch sizes per device: ``cfg.batch_size`` and ``cfg.eval_batch_size or cfg.batch_size``.

    >>> train_loader, eval_loader = build_dataloaders(cfg, seed=0)  # doctest: +SKIP
    """
    train_ds, eval_ds = build_datasets(cfg)
    if len(train_ds) < cfg.batch_size:
        raise DataError(f"training set has {len(train_ds)} examples, fewer than one batch of {cfg.batch_size} "
                        f"(drop_last)")
    common = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
    # train workers are re-created every epoch (not persistent): that is how the epoch reaches them
    return (DataLoader(EpochSeededDataset(train_ds, seed), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common),
            DataLoader(eval_ds, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False, drop_last=False,
                       persistent_workers=cfg.num_workers > 0, **common))


def _seed_from(*parts: int) -> int:
    # independent, non-colliding streams for (seed, epoch, purpose, rank) tuples
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def random_pad_crop_flip(images: torch.Tensor, padding: int, hflip: float, generator: torch.Generator) -> torch.Tensor:
    """Image by image, torchvision's ``RandomCrop(size, padding=padding, fill=0)`` then
    ``RandomHorizontalFlip(hflip)``, as one gather; random numbers from ``generator`` (CPU: device-independent)."""
    batch, chans, height, width = images.shape
    device = images.device
    offset_y, offset_x = (torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device)
                          if padding > 0 else 0 for _ in "yx")
    cols = torch.arange(width, device=device).expand(batch, width)
    if hflip > 0:
        flip = (torch.rand(batch, generator=generator) < hflip).to(device)
        cols = torch.where(flip[:, None], width - 1 - cols, cols)
    rows, cols = (offset_y + torch.arange(height, device=device)).expand(batch, height), offset_x + cols
    return F.pad(images, [padding] * 4)[torch.arange(batch, device=device)[:, None, None, None],
                                        torch.arange(chans, device=device)[None, :, None, None],
                                        rows[:, None, :, None], cols[:, None, None, :]]


class DeviceResidentLoader:
    """Batches of a uint8 image tensor kept on ``device``, augmented and normalised there. Training shuffles with
    one permutation per ``(seed, epoch)`` (the same on all ranks), augments with random numbers from ``(seed, epoch,
    rank)``; rank ``r`` takes ``perm[r::world_size]``. Every rank yields as many batches (with ``drop_last``, full
    ones), so collectives stay in step. Call :meth:`set_epoch` first.

    >>> loader = DeviceResidentLoader(images_u8, labels, 256, train=True, mean=(0.286,), std=(0.353,),
    ...                               padding=4, hflip=0.5, device="cuda", seed=0)  # doctest: +SKIP
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, train: bool,
                 mean: Sequence[float], std: Sequence[float], padding: int = 0, hflip: float = 0.0,
                 device: Device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: Optional[bool] = None):
        # the recipe validated sizes, ranges and mean/std; these two are what a caller of the class can get wrong
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 NCHW tensor, got {images.dtype} {tuple(images.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), torch.as_tensor(labels).to(self.device, torch.long)
        self.mean, self.std = (torch.tensor([float(v) for v in values], device=self.device).view(-1, 1, 1)
                               for values in (mean, std))
        self.batch_size, self.train, self.padding, self.hflip = int(batch_size), train, int(padding), float(hflip)
        self.seed, self.rank, self.world_size, self.epoch = int(seed), int(rank), int(world_size), 0
        self.drop_last = train if drop_last is None else bool(drop_last)

    set_epoch = EpochSeededDataset.set_epoch

    def __len__(self) -> int:
        n, ranks, size = len(self.images), self.world_size, self.batch_size
        return n // ranks // size if self.drop_last else math.ceil(math.ceil(n / ranks) / size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        shuffle = torch.Generator().manual_seed(_seed_from(self.seed, self.epoch, 0))
        order = torch.randperm(n, generator=shuffle) if self.train else torch.arange(n)
        order = order[: n - n % self.world_size] if self.drop_last else order  # an equal share for every rank
        indices = order[self.rank :: self.world_size].to(self.device)
        generator = torch.Generator().manual_seed(_seed_from(self.seed, self.epoch, 1, self.rank))
        for b in range(len(self)):
            batch_idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[batch_idx]
            if self.train and (self.padding > 0 or self.hflip > 0):
                images = random_pad_crop_flip(images, self.padding, self.hflip, generator)
            # same arithmetic as ToTensor + Normalize: x / 255, then (x - mean) / std
            yield (images.float().div(255) - self.mean) / self.std, self.labels[batch_idx]


def build_device_resident_loaders(cfg: DataConfig, device: Device, seed: int, rank: int = 0, world_size: int = 1
                                  ) -> Tuple[DeviceResidentLoader, DeviceResidentLoader]:
    """Whole dataset on ``device`` as uint8: a train loader (shuffled, pad-and-crop by ``random_crop_padding``
    and flip, ``drop_last``, sharded) and an eval loader (in order, not augmented, not sharded)."""
    if cfg.random_crop_padding == 0:
        logger.warning("device-resident loading: random_crop_padding=0, training augmentation is flip only "
                       "(random-resized-crop is not supported on this path)")
    (train_images, train_labels), (eval_images, eval_labels) = load_uint8_splits(cfg)
    common = dict(zip(("mean", "std"), norm_stats(cfg)), device=device, seed=seed)  # train: drop_last, eval: not
    train_loader = DeviceResidentLoader(train_images, train_labels, cfg.batch_size, train=True, hflip=cfg.hflip,
                                        rank=rank, world_size=world_size, padding=cfg.random_crop_padding, **common)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_images)} training examples make no full batch of {cfg.batch_size} "
                         f"per rank with world_size={world_size}")
    # not sharded: every rank evaluates the whole (small) eval set, so its metrics are already global
    return train_loader, DeviceResidentLoader(eval_images, eval_labels, cfg.eval_batch_size or cfg.batch_size,
                                              train=False, **common)
