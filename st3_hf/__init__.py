"""st3_hf: ST-3 sparse training for timm models, the Hugging Face way."""
from st3_hf.inference import SparseInferenceModel, sparse_inference
from st3_hf.sparse.config import SparsityConfig
from st3_hf.sparse.macs import MacsReport, count_macs
from st3_hf.sparse.layers import STConv2d, STLinear, SparseLayerMixin
from st3_hf.sparse.schedule import cubic_sparsity
from st3_hf.sparse.sparsifier import Sparsifier, sparsify
from st3_hf.sparse.threshold import exact_quantile
__version__ = "0.1.0"

__all__ = [
    "SparsityConfig",
    "Sparsifier",
    "sparsify",
    "STConv2d",
    "STLinear",
    "SparseLayerMixin",
    "cubic_sparsity",
    "exact_quantile",
    "count_macs",
    "MacsReport",
    "sparse_inference",
    "SparseInferenceModel",
    "__version__",
]


def __getattr__(name: str):
    # timm, huggingface_hub and the recipe modules load on first use (not an import cycle)
    if name == "from_pretrained":
        from st3_hf.hub import from_pretrained
        return from_pretrained
    if name == "load_sparse_inference":
        from st3_hf.hub.compact_inference import load_sparse_inference
        return load_sparse_inference
    raise AttributeError(f"module 'st3_hf' has no attribute {name!r}")
