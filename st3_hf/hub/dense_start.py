"""Dense pretrained timm weights as the start of a sparse run (``model.pretrained`` in a recipe).

The start is a folder in timm's own Hub format (``config.json`` +
``model.safetensors``, as ``timm.models.save_for_hf`` writes it and as timm's
Hub repos hold it), named in one of three ways:

* ``True`` — timm's own Hub weights for the recipe's ``model.name``
  (``resnet50.a1_in1k`` -> ``timm/resnet50.a1_in1k``);
* a Hub id, ``"ORG/NAME"`` or ``"hf-hub:ORG/NAME"`` — fetched through the
  normal Hugging Face cache (only those two files), so ``HF_HUB_OFFLINE=1``
  with a populated cache works;
* a folder, ``"local-dir:PATH"`` or ``"PATH"``.

The same refusals as :func:`st3_hf.from_pretrained`: safetensors only (pickled
weights are never opened), no remote code, no ``model_args`` that make timm
read other files, only architectures timm itself defines.  Unlike
``from_pretrained`` nothing is frozen: the caller sparsifies the dense model
and the schedule prunes it.

    >>> from st3_hf.hub.dense_start import locate_dense_start, build_dense_model
    >>> start = locate_dense_start("timm/resnet50.a1_in1k", model_name="resnet50")  # doctest: +SKIP
    >>> model = build_dense_model(start, num_classes=102)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch.nn as nn
from timm.models._hub import load_model_config_from_path

from st3_hf.errors import ConfigError, ModelNotFoundError
from st3_hf.hub.errors import NotAModelFolderError
from st3_hf.errors import describe_cause
from st3_hf.hub.export import WEIGHTS_FILENAME
from st3_hf.hub.pretrained import LOCAL_PREFIX, HUB_PREFIX, ModelSource, pickle_hint, build_timm_model, download, load_safetensors, read_timm_config

Spec = Union[bool, str]


@dataclasses.dataclass(frozen=True)
class DenseStart:
    """A located dense checkpoint: where it is, what to call it, and its config as timm parses it."""

    source: ModelSource
    name: str  # as the user knows it: a Hub id or a folder path
    config: Mapping[str, Any]  # config.json as written

    @property
    def repo_id(self) -> Optional[str]:
        """The Hub repo id (for the card's ``base_model``), or None for a local folder."""
        return self.source.repo_id

    @property
    def architecture(self) -> str:
        return str(self.config["architecture"])

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """The checkpoint's ``pretrained_cfg`` as timm reads it (top-level label names and num_classes folded in)."""
        return load_model_config_from_path(self.source.folder)[0]

    @property
    def num_classes(self) -> int:
        return int(self.pretrained_cfg["num_classes"])


def describe_spec(spec: Spec, model_name: str) -> str:
    """The name of the starting checkpoint without touching disk or network (for cards and messages)."""
    if spec is True:
        return _timm_hub_id(model_name)
    text = str(spec)
    for prefix in (HUB_PREFIX, LOCAL_PREFIX):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def locate_dense_start(
    spec: Spec, model_name: str, *, revision: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None
) -> DenseStart:
    """Find the checkpoint ``spec`` names (download config.json + model.safetensors if it is a Hub id) and check it.

    Raises :class:`~st3_hf.errors.ModelNotFoundError` / :class:`~st3_hf.errors.ModelLoadError` (one line)
    for a missing, unsafe or foreign checkpoint, and :class:`~st3_hf.errors.ConfigError` when it holds
    another architecture than ``model_name``.
    """
    if spec is False or spec is None:
        raise ConfigError("model.pretrained is false: there is no dense start to locate")
    text = describe_spec(spec, model_name)
    path = Path(text).expanduser()
    local = spec is not True and not str(spec).startswith(HUB_PREFIX) and (
        path.exists() or str(spec).startswith(LOCAL_PREFIX) or text.startswith((".", "/", "~")))
    if local:
        source = ModelSource(_existing_folder(path))
    else:
        source = ModelSource(download(text, revision, cache_dir), text, revision)
    start = DenseStart(source, text, read_timm_config(source))
    if start.architecture.split(".", 1)[0] != model_name.split(".", 1)[0]:
        raise ConfigError(
            f"model.pretrained {start.name!r} holds a {start.architecture}, but model.name is {model_name!r}: "
            f"set model.name: {start.architecture}"
        )
    if not (source.folder / WEIGHTS_FILENAME).is_file():
        raise ModelNotFoundError(
            f"{source.name(WEIGHTS_FILENAME)} not found{pickle_hint(source.folder)}: st3_hf starts only from "
            "safetensors weights (timm's Hub format, timm.models.save_for_hf(..., safe_serialization=True))"
        )
    return start


def _existing_folder(path: Path) -> Path:
    if not path.exists():
        raise ModelNotFoundError(
            f"model.pretrained folder {path} does not exist: pass a folder with config.json + model.safetensors "
            "(timm's Hub format), a Hub id (ORG/NAME) or true for timm's weights of model.name"
        )
    if not path.is_dir():
        raise NotAModelFolderError(f"model.pretrained {path} is a file; pass the folder holding config.json and model.safetensors")
    return path


def _timm_hub_id(model_name: str) -> str:
    """timm's Hub repo for ``model_name`` (its default pretrained tag when none is given)."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"model.pretrained: true, but timm knows no pretrained weights for {model_name!r} ({describe_cause(e)})") from e
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise ConfigError(
            f"model.pretrained: true, but timm has no Hugging Face Hub weights for {model_name!r}: name a tagged model "
            "(e.g. resnet50.a1_in1k), a Hub id or a local folder instead"
        )
    return str(hub_id)


def check_in_chans(start: DenseStart, in_chans: int) -> None:
    """Refuse a recipe whose ``model.in_chans`` is not what the checkpoint's first conv takes."""
    saved = int(start.pretrained_cfg.get("input_size", (3,))[0])
    if int(in_chans) != saved:
        raise ConfigError(
            f"model.in_chans is {in_chans} but {start.name!r} takes {saved}-channel input: "
            f"set model.in_chans: {saved} (and data.input_size / mean / std to match)"
        )


def build_dense_model(
    start: DenseStart,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    drop_rate: float = 0.0,
    kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """The timm model of ``start`` with its weights (strict load), and a fresh head if ``num_classes`` differs.

    ``kwargs`` are extra ``timm.create_model`` arguments of the recipe (e.g. ``output_stride``); they
    must not change the weights' shapes.  The model's ``pretrained_cfg`` is the checkpoint's own
    (label names dropped with a new head).
    """
    if in_chans is not None:
        check_in_chans(start, in_chans)
    state_dict = load_safetensors(start.source.folder / WEIGHTS_FILENAME, start.source)
    return build_timm_model(start.source, state_dict, num_classes, dict(kwargs or {}, drop_rate=drop_rate))


def data_defaults(start: DenseStart) -> Dict[str, Any]:
    """The recipe ``data`` values the checkpoint's preprocessing implies (keys it records only)."""
    cfg = start.pretrained_cfg
    out: Dict[str, Any] = {}
    if cfg.get("input_size") is not None:
        out["input_size"] = [int(v) for v in cfg["input_size"]]
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = [float(v) for v in cfg[key]]
    if cfg.get("interpolation") is not None:
        out["interpolation"] = str(cfg["interpolation"])
    if cfg.get("crop_pct") is not None:
        out["crop_pct"] = float(cfg["crop_pct"])
    return out


def label_names(start: DenseStart, num_classes: int) -> Optional[List[str]]:
    """The checkpoint's class names if its head is kept (same ``num_classes``), else None."""
    names = start.pretrained_cfg.get("label_names")
    if num_classes != start.num_classes or not isinstance(names, (list, tuple)) or len(names) != num_classes:
        return None
    return [str(n) for n in names]
