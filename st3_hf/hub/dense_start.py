"""Dense pretrained timm weights as the start of a sparse run (``model.pretrained`` in a recipe).

A folder in timm's Hub format: ``True`` for timm's Hub weights of ``model.name`` (``resnet50.a1_in1k`` ->
``timm/resnet50.a1_in1k``), a Hub id (``ORG/NAME``, ``hf-hub:ORG/NAME``) or a folder (``PATH``, ``local-dir:PATH``),
with the refusals of :func:`st3_hf.from_pretrained` (safetensors only, no remote code); nothing is frozen.

    >>> start = locate_dense_start("timm/resnet50.a1_in1k", model_name="resnet50")  # doctest: +SKIP
    >>> model = build_dense_model(start, num_classes=102)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch.nn as nn
from timm.models._hub import load_model_config_from_path

from st3_hf.errors import ConfigError, ModelError, describe_cause
from st3_hf.hub.export import WEIGHTS_FILENAME
from st3_hf.hub.pretrained import (HUB_PREFIX, LOCAL_PREFIX, ModelSource, build_timm_model, locate,
                                   pickle_hint, read_timm_config)


@dataclasses.dataclass(frozen=True)
class DenseStart:
    """A located dense checkpoint: where it is, what to call it, and its ``pretrained_cfg`` as timm parses it."""

    source: ModelSource
    name: str  # as the user knows it: a Hub id or a folder path
    pretrained_cfg: Mapping[str, Any]
    repo_id: Optional[str]  # for the card's base_model; None for a local folder
    num_classes: int


def describe_spec(spec: Union[bool, str], model_name: str) -> str:
    """The name of the starting checkpoint without touching disk or network (for cards and messages)."""
    if spec is not True:
        return str(spec).split(":", 1)[1] if str(spec).startswith((HUB_PREFIX, LOCAL_PREFIX)) else str(spec)
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as e:  # a tag the architecture does not have
        raise ConfigError(f"model.pretrained: true, but {describe_cause(e)}") from e
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"model.pretrained: true, but timm has no Hugging Face Hub weights for {model_name!r}: "
                          "name a tagged model (e.g. resnet50.a1_in1k), a Hub id or a local folder instead")
    return str(cfg.hf_hub_id)


def locate_dense_start(spec: Union[bool, str], model_name: str, *, revision: Optional[str] = None,
                       cache_dir: Optional[Union[str, Path]] = None) -> DenseStart:
    """Find the checkpoint ``spec`` names (download config.json + model.safetensors if it is a Hub id) and check it:
    :class:`~st3_hf.errors.ModelError` if missing, unsafe or foreign, ``ConfigError`` if not ``model_name``."""
    if spec is False or spec is None:
        raise ConfigError("model.pretrained is false: there is no dense start to locate")
    text = describe_spec(spec, model_name)
    source = locate(HUB_PREFIX + text if spec is True else str(spec), revision=revision, cache_dir=cache_dir)
    architecture = read_timm_config(source)["architecture"]
    if architecture.split(".", 1)[0] != model_name.split(".", 1)[0]:
        raise ConfigError(f"model.pretrained {text!r} holds a {architecture}, but model.name is {model_name!r}: "
                          f"set model.name: {architecture}")
    if not (source.folder / WEIGHTS_FILENAME).is_file():
        raise ModelError(f"{source.name(WEIGHTS_FILENAME)} not found{pickle_hint(source.folder)}: st3_hf starts only "
                         "from safetensors weights (timm's Hub format, timm.models.save_for_hf(..., "
                         "safe_serialization=True))")
    pretrained_cfg = load_model_config_from_path(source.folder)[0]
    return DenseStart(source, text, pretrained_cfg, source.repo_id, int(pretrained_cfg["num_classes"]))


def check_in_chans(start: DenseStart, in_chans: int) -> None:
    """Refuse a recipe whose ``model.in_chans`` is not what the checkpoint's first conv takes."""
    if int(in_chans) != (saved := int(start.pretrained_cfg.get("input_size", (3,))[0])):
        raise ConfigError(f"model.in_chans is {in_chans} but {start.name!r} takes {saved}-channel input: "
                          f"set model.in_chans: {saved} (and data.input_size / mean / std to match)")


def build_dense_model(start: DenseStart, num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                      drop_rate: float = 0.0, kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The timm model of ``start`` with its weights (strict load), a fresh head if ``num_classes`` differs;
    ``kwargs``: the recipe's other ``timm.create_model`` arguments that keep the shapes (e.g. ``output_stride``)."""
    if in_chans is not None:
        check_in_chans(start, in_chans)
    return build_timm_model(start.source, num_classes, dict(kwargs or {}, drop_rate=drop_rate))


def data_defaults(start: DenseStart) -> Dict[str, Any]:
    """The recipe ``data`` values the checkpoint's preprocessing implies (keys it records only)."""
    cfg = start.pretrained_cfg
    kinds = {"input_size": lambda v: [int(x) for x in v], "mean": lambda v: [float(x) for x in v],
             "std": lambda v: [float(x) for x in v], "interpolation": str, "crop_pct": float}
    return {key: convert(cfg[key]) for key, convert in kinds.items() if cfg.get(key) is not None}


def label_names(start: DenseStart, num_classes: int) -> Optional[List[str]]:
    """The checkpoint's class names if its head is kept (same ``num_classes``), else None."""
    names = start.pretrained_cfg.get("label_names")
    keep = num_classes == start.num_classes and isinstance(names, (list, tuple)) and len(names) == num_classes
    return [str(n) for n in names] if keep else None
