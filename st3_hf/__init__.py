"""st3_hf: ST-3 sparse training for timm models, the Hugging Face way."""
from .config import SparsityConfig
from .flops import MacsReport, count_macs
from .layers import STConv2d, STLinear, SparseLayerMixin
from .schedule import cubic_sparsity
from .sparsifier import Sparsifier, sparsify
from .threshold import exact_quantile

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
    "__version__",
]


def __getattr__(name: str):
    # timm, huggingface_hub and the recipe modules load on first use (not an import cycle)
    if name == "from_pretrained":
        from .run_export import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'st3_hf' has no attribute {name!r}")
