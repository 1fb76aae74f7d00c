#!/usr/bin/env python
"""Size of model.sparse.safetensors vs the dense file and the entropy bound, for a sparsified timm model.

    python scripts/compact_size.py --model resnet50 --sparsity 0.98 --method st3
    python scripts/compact_size.py --folder outputs/quickstart        # an exported model
Prints one JSON object.
"""
import argparse
import json
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--method", default="st3")
    p.add_argument("--folder", help="an exported folder instead of a freshly pruned model")
    args = p.parse_args()
    from size_report import compact_size_report
    if args.folder:
        from st3_hf import from_pretrained

        model, sp = from_pretrained(args.folder)
        source = {"folder": args.folder}
    else:
        import timm

        from st3_hf import SparsityConfig, sparsify

        torch.manual_seed(0)
        model = timm.create_model(args.model)
        sp = sparsify(model, SparsityConfig(method=args.method, target=args.sparsity))
        sp.apply(args.sparsity)
        sp.freeze()
        source = {"model": args.model, "method": args.method, "weights": "random init, pruned with sp.apply"}
    names = {f"{n}.weight" for n, _ in sp.named_layers()}
    state = {k: v for k, v in model.state_dict().items()}
    report = {**source, "sparsity": sp.sparsity(), **compact_size_report(state, names)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
