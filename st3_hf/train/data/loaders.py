"""DataLoaders for the training loop (Accelerate ``prepare``s them for sharding)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader

from st3_hf.train.recipe_schema import DataConfig
from st3_hf.train.data.seeded import EpochSeededDataset
from st3_hf.train.data.sources import build_datasets
from st3_hf.errors import DataError


def build_dataloaders(cfg: DataConfig, seed: int) -> Tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by a generator seeded with ``seed``, ``drop_last``) and eval loader (in order).

    Batch sizes are per device: ``cfg.batch_size`` and ``cfg.eval_batch_size or cfg.batch_size``.

    Example:
        >>> train_loader, eval_loader = build_dataloaders(cfg, seed=0)
        >>> images, labels = next(iter(train_loader))
    """
    train_ds, eval_ds = build_datasets(cfg)
    eval_batch_size = cfg.eval_batch_size or cfg.batch_size
    if len(train_ds) < cfg.batch_size:
        raise DataError(
            f"training set has {len(train_ds)} examples, fewer than one batch of {cfg.batch_size} (drop_last)"
        )
    common = dict(
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    # augmentation seeded per (seed, epoch, example): resumed runs see the same images. The
    # epoch reaches the workers because train workers are re-created every epoch (not persistent).
    train_loader = DataLoader(
        EpochSeededDataset(train_ds, seed),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        **{**common, "persistent_workers": False},
    )
    eval_loader = DataLoader(eval_ds, batch_size=eval_batch_size, shuffle=False, drop_last=False, **common)
    return train_loader, eval_loader
