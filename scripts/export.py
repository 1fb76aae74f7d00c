#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face Hub folder (timm format + compact sparse copy + card).

    python scripts/export.py outputs/run/checkpoints/step_00001000 --output-dir outputs/run/hub \
        --metrics-file outputs/run/metrics.jsonl --repo-id my-org/resnet50-st3-90

The checkpoint folder is one written by accelerate's ``save_state`` with the
resolved ``recipe.yaml`` next to it (see ``st3_hf.from_pretrained``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="training checkpoint folder (model.safetensors, sparsifier.json/.safetensors, recipe.yaml)")
    parser.add_argument("--output-dir", required=True, help="folder to write the Hub export into")
    parser.add_argument("--metrics-file", default=None, help="metrics.jsonl of the run (top-1/top-5 as fractions); copied and used in the card")
    parser.add_argument("--metrics", default=None, help='measured metrics as JSON, e.g. \'{"top1": 0.761, "top5": 0.929}\' (fractions) (wins over --metrics-file)')
    parser.add_argument("--repo-id", default=None, help="ORG/NAME for the card's usage snippets (default: the recipe's hub.repo_id)")
    parser.add_argument("--base-model", default=None, help="Hub id of the model this one was fine-tuned from")
    parser.add_argument("--dataset-name", default=None, help="Hub dataset id for the card metadata")
    args = parser.parse_args(argv)

    from st3_hf.hub.export import export_checkpoint

    folder = export_checkpoint(
        args.checkpoint_dir,
        args.output_dir,
        metrics=json.loads(args.metrics) if args.metrics else None,
        metrics_file=args.metrics_file,
        repo_id=args.repo_id,
        base_model=args.base_model,
        dataset_name=args.dataset_name,
    )
    print(f"exported to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
