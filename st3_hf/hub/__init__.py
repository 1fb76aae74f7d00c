"""Sparse models on the Hugging Face Hub: export, compact format, model card, push, load.

Files and models only, no training runs (those are ``st3_hf/train/run_export.py``'s):

* :func:`export_pretrained` writes a Hub folder in timm's own format (plus a compact sparse copy, a
  model card and a per-layer plot);
* :func:`from_pretrained` loads such a folder or a Hub repo back as ``(model, sparsifier)`` with frozen masks;
* :func:`push_folder` uploads an exported folder;
* :func:`save_compact` / :func:`load_compact` read and write the bitmask format of ``docs/compact_format.md``.
"""
from st3_hf.hub.card import build_model_card
from st3_hf.hub.compact import load_compact, save_compact
from st3_hf.hub.export import export_pretrained
from st3_hf.hub.pretrained import from_pretrained
from st3_hf.hub.push import push_folder

__all__ = ["build_model_card", "export_pretrained", "from_pretrained", "load_compact", "push_folder", "save_compact"]
