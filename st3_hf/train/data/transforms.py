"""Image transforms for training / evaluation, built with timm, and the matching timm ``pretrained_cfg``."""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from st3_hf.train.recipe_schema import DataConfig


def image_mode_of(cfg: DataConfig) -> str:
    """PIL mode the images are converted to before the transforms: "L" for 1 channel, else "RGB"."""
    if int(cfg.input_size[0]) not in (1, 3):
        raise ValueError(f"data.input_size[0] must be 1 (grayscale) or 3 (RGB), got {int(cfg.input_size[0])}")
    return "L" if int(cfg.input_size[0]) == 1 else "RGB"


def norm_stats(cfg: DataConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` with one value per input channel (a single value is repeated, as timm does)."""
    chans = int(cfg.input_size[0])
    return tuple(tuple(float(v) for v in values) * (chans if len(values) == 1 else 1) for values in (cfg.mean, cfg.std))


def pretrained_cfg_for(cfg: DataConfig) -> Dict[str, Any]:
    """timm ``pretrained_cfg`` fields (no ``num_classes``) with which ``resolve_data_config`` +
    ``create_transform`` reproduce :func:`build_eval_transform`.

    >>> pretrained_cfg_for(DataConfig(input_size=[1, 28, 28], mean=[0.286], std=[0.353], crop_pct=1.0))
    {'input_size': (1, 28, 28), 'mean': (0.286,), 'std': (0.353,), 'interpolation': 'bilinear', 'crop_pct': 1.0, 'crop_mode': 'center'}
    """
    mean, std = norm_stats(cfg)
    return {"input_size": tuple(int(v) for v in cfg.input_size), "mean": mean, "std": std,
            "interpolation": cfg.interpolation, "crop_pct": float(cfg.crop_pct), "crop_mode": "center"}


def build_eval_transform(cfg: DataConfig, normalize: bool = True) -> Callable:
    """timm's eval transform of :func:`pretrained_cfg_for`: resize to ``size / crop_pct``, center crop, to tensor,
    normalise (``normalize=False``: stop at a uint8 CHW tensor, as timm's ``use_prefetcher`` does)."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg_for(cfg)), use_prefetcher=not normalize)


def build_train_transform(cfg: DataConfig) -> Callable:
    """Random-resized-crop + horizontal flip (timm), no colour jitter / auto-augment; or, when ``cfg.random_crop_padding
    > 0``, zero-pad + random crop + flip (tiny images such as Fashion-MNIST's, which a crop down to 8% destroys; timm
    has no such mode) after the eval transform's resize and center crop: train and eval see the same geometry."""
    from timm.data import create_transform
    from torchvision import transforms

    if cfg.random_crop_padding == 0:
        mean, std = norm_stats(cfg)
        return create_transform(input_size=tuple(cfg.input_size), is_training=True, scale=tuple(cfg.scale),
                                ratio=tuple(cfg.ratio), hflip=cfg.hflip, vflip=0.0, color_jitter=None,
                                auto_augment=None, re_prob=0.0, interpolation=cfg.interpolation, mean=mean, std=std)
    # timm's own eval steps (resize, center crop | to tensor, normalise) around the pad-and-crop and flip
    steps = build_eval_transform(cfg).transforms
    augment = [transforms.RandomCrop(tuple(cfg.input_size[1:]), padding=cfg.random_crop_padding, fill=0)]
    augment += [transforms.RandomHorizontalFlip(p=cfg.hflip)] if cfg.hflip > 0 else []
    return transforms.Compose(steps[:2] + augment + steps[2:])
