"""Sparse checkpoints on the Hugging Face Hub: export, compact format, model card, push, load.

* :func:`export_pretrained` writes a Hub folder in timm's own format (plus a
  compact sparse copy, a model card and a per-layer plot);
* :func:`from_pretrained` loads such a folder, a Hub repo id or a training
  checkpoint back as ``(model, sparsifier)`` with frozen masks;
* :func:`push_folder` uploads an exported folder;
* :func:`save_compact` / :func:`load_compact` read and write the bitmask format
  described in ``docs/compact_format.md``.

Submodules are imported on first use, so ``import st3_hf.hub`` stays cheap.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "save_compact": "compact",
    "load_compact": "compact",
    "export_pretrained": "export",
    "export_checkpoint": "export",
    "build_model_card": "card",
    "from_pretrained": "pretrained",
    "load_training_checkpoint": "pretrained",
    "push_folder": "push",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
