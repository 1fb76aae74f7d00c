"""Augmentation randomness as a pure function of (seed, epoch, example index).

Random crops and flips normally draw from the global RNGs, whose state depends on
how far a DataLoader has prefetched; a resumed run would then augment differently
from an uninterrupted one.  Seeding each example from (seed, epoch, index) makes a
resumed run, or one with a different number of workers, see the same images.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import torch
from torch.utils.data import Dataset


def example_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[i]`` is reproducible for a given epoch.

    >>> ds = EpochSeededDataset(base, seed=0); ds.set_epoch(3)  # doctest: +SKIP
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

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
        s = example_seed(self.seed, self.epoch, int(index))
        random.seed(s)
        torch.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
