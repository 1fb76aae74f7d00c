"""Checks run before any expensive work: a bad model name or an unusable output folder fails in seconds.

>>> from st3_hf.train.preflight import check_model_name
>>> check_model_name("resnet50")
>>> check_model_name("resnet5O")  # doctest: +ELLIPSIS
Traceback (most recent call last):
st3_hf.errors.ConfigError: model.name 'resnet5O' is not a timm model (did you mean ...
"""
from __future__ import annotations

import difflib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from st3_hf.errors import ConfigError
from st3_hf.train.recipe_schema import ModelConfig

# optimizer state slots per parameter (SGD momentum buffer; AdamW exp_avg + exp_avg_sq)
_OPTIMIZER_SLOTS = {"sgd": 1, "adamw": 2}


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` naming the closest timm models when ``name`` is not one."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(
        f"model.name {name!r} is not a timm model{hint}; list the valid names with "
        f"python -c \"import timm; print(timm.list_models('{name[:4]}*'))\""
    )


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the recipe's model, built on the meta device (no memory, no weights)."""
    import torch

    from st3_hf.train.modeling import create_model
    with torch.device("meta"):
        model = create_model(cfg)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@dataclass(frozen=True)
class SpaceEstimate:
    """Bytes one checkpoint and one export of a run take (fp32 weights, optimizer slots, one-byte masks)."""

    checkpoint_bytes: int
    export_bytes: int

    @classmethod
    def for_model(cls, num_params: int, optimizer: str) -> "SpaceEstimate":
        slots = _OPTIMIZER_SLOTS.get(optimizer, 2)
        checkpoint = num_params * (4 + 4 * slots + 1) + (1 << 20)
        export = num_params * 8 + (1 << 20)  # dense safetensors + compact file (at most as large)
        return cls(checkpoint_bytes=checkpoint, export_bytes=export)


def check_output_dir(path: os.PathLike | str, estimate: SpaceEstimate, keep_checkpoints: int) -> Optional[str]:
    """Create ``path`` and prove it can hold one checkpoint plus the export; return a warning or None.

    The proof is real: a probe file of that size is allocated (``posix_fallocate``, so quotas, full
    disks and file-size limits all answer) and removed again.  Raises :class:`ConfigError`.
    """
    folder, needed = Path(path), estimate.checkpoint_bytes + estimate.export_bytes
    where = f"output_dir {str(folder)!r}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{where} cannot be created ({err.strerror or err}); choose a writable output_dir"
                          ) from err
    probe = folder / f".st3_hf_space_probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as err:
        raise ConfigError(f"{where} is not writable ({err.strerror or err}); fix its permissions or choose "
                          f"another output_dir") from err
    try:
        free = shutil.disk_usage(folder).free
        if free >= needed:
            os.posix_fallocate(fd, 0, needed)  # glibc writes the blocks itself where the filesystem cannot
    except OSError as err:
        raise ConfigError(f"{where} cannot hold one checkpoint plus the export (about {needed / 1e6:.1f} MB): "
                          f"{err.strerror or err}; free space, raise the quota or choose another output_dir"
                          ) from err
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    if free < needed:
        raise ConfigError(f"{where} has {free / 1e6:.1f} MB free but one checkpoint plus the export need "
                          f"about {needed / 1e6:.1f} MB; free space or choose another output_dir")
    peak = (keep_checkpoints + 1) * estimate.checkpoint_bytes + estimate.export_bytes
    if free < peak:
        return (f"{where} has {free / 1e6:.1f} MB free; keeping {keep_checkpoints} checkpoints (+1 while writing) "
                f"and the export needs about {peak / 1e6:.1f} MB: lower training.keep_checkpoints")
    return None
