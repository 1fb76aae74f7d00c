#!/usr/bin/env python
"""Size of model.sparse.safetensors vs the dense file and the entropy bound, for a sparsified timm model.

    python scripts/compact_size.py --model resnet50 --sparsity 0.98 --method st3
    python scripts/compact_size.py --folder outputs/quickstart        # an exported model
Prints one JSON object.
"""
import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Set

import timm
import torch
from safetensors.torch import save_file

import st3_hf
from st3_hf.hub.compact import save_compact


def entropy_bound_bytes(tensors: Mapping[str, torch.Tensor], sparse_names: Set[str]) -> float:
    """Lossless lower bound: an i.i.d. mask's entropy + the raw non-zeros (sparse tensors), else the raw bytes."""
    bits = 0.0
    for name, t in tensors.items():
        n, k = t.numel(), int((t != 0).sum()) if name in sparse_names else t.numel()
        p = k / max(n, 1)
        bits += (-n * (p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0) + k * t.element_size() * 8
    return bits / 8


def compact_size_report(tensors: Mapping[str, torch.Tensor], sparse_names: Set[str]) -> Dict[str, float]:
    """Sizes (bytes) of the dense safetensors file, the compact file and the entropy bound, and their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        dense, compact = Path(tmp) / "model.safetensors", Path(tmp) / "model.sparse.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dense))
        save_compact(tensors, compact, sparse_names=sparse_names)
        dense_bytes, compact_bytes = dense.stat().st_size, compact.stat().st_size
    bound = entropy_bound_bytes(tensors, sparse_names)
    return {"dense_bytes": dense_bytes, "compact_bytes": compact_bytes, "entropy_bound_bytes": bound,
            "dense_over_compact": dense_bytes / compact_bytes, "compact_over_bound": compact_bytes / bound}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--method", default="st3")
    p.add_argument("--folder", help="an exported folder instead of a freshly pruned model")
    args = p.parse_args()
    if args.folder:
        (model, sp), source = st3_hf.from_pretrained(args.folder), {"folder": args.folder}
    else:
        torch.manual_seed(0)
        sp = st3_hf.sparsify(model := timm.create_model(args.model),
                             st3_hf.SparsityConfig(method=args.method, target=args.sparsity))
        sp.apply(args.sparsity)
        sp.freeze()
        source = {"model": args.model, "method": args.method, "weights": "random init, pruned with sp.apply"}
    names = {f"{n}.weight" for n, _ in sp.named_layers()}
    print(json.dumps({**source, "sparsity": sp.sparsity(), **compact_size_report(model.state_dict(), names)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
