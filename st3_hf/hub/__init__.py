"""Sparse models on the Hugging Face Hub: export, load, push, model card, compact format, and the compact file
straight into the CPU sparse kernels (files and models only; training runs are ``st3_hf/train/run_export.py``'s)."""
from st3_hf.hub.card import build_model_card
from st3_hf.hub.compact import load_compact, read_compact, save_compact
from st3_hf.hub.compact_inference import load_sparse_inference
from st3_hf.hub.export import export_pretrained
from st3_hf.hub.pretrained import from_pretrained
from st3_hf.hub.push import push_folder

__all__ = ["build_model_card", "export_pretrained", "from_pretrained", "load_compact", "load_sparse_inference",
           "push_folder", "read_compact", "save_compact"]
