"""DataLoaders for the training loop (Accelerate ``prepare``s them for sharding), with augmentation
randomness a pure function of (seed, epoch, example index).

Random crops and flips normally draw from the global RNGs, whose state depends on how far a
DataLoader has prefetched: a resumed run, or one with another number of workers, would augment
differently from an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from st3_hf.errors import DataError
from st3_hf.train.data.sources import build_datasets
from st3_hf.train.recipe_schema import DataConfig


class EpochSeededDataset(Dataset):
    """``dataset[i]`` drawn with the global RNGs seeded from ``(seed, epoch, i)``, their state restored after.

    >>> ds = EpochSeededDataset(base, seed=0); ds.set_epoch(3)  # doctest: +SKIP
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # e.g. .classes of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

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

    Example:
        >>> train_loader, eval_loader = build_dataloaders(cfg, seed=0)
        >>> images, labels = next(iter(train_loader))
    """
    train_ds, eval_ds = build_datasets(cfg)
    if len(train_ds) < cfg.batch_size:
        raise DataError(f"training set has {len(train_ds)} examples, fewer than one batch of {cfg.batch_size} "
                        f"(drop_last)")
    # train workers are re-created every epoch (not persistent): that is how the epoch reaches them
    train_loader = DataLoader(EpochSeededDataset(train_ds, seed), batch_size=cfg.batch_size, shuffle=True,
                              drop_last=True, generator=torch.Generator().manual_seed(seed),
                              num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
    eval_loader = DataLoader(eval_ds, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
                             drop_last=False, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                             pin_memory=torch.cuda.is_available())
    return train_loader, eval_loader
