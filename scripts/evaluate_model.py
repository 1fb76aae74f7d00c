#!/usr/bin/env python
"""Evaluate a sparse model on a recipe's evaluation data (prints JSON).

    python scripts/evaluate_model.py outputs/quickstart                      # uses outputs/quickstart/recipe.yaml
    python scripts/evaluate_model.py ORG/resnet50-st3-98 --recipe recipes/r50_st3_98.yaml data.root=/data/imagenet
    accelerate launch scripts/evaluate_model.py outputs/r50_st3_98 data.root=/data/imagenet   # several GPUs

A problem with the inputs (missing or corrupt model, bad recipe) is one
``error: ...`` line on stderr and exit code 2; a traceback means a bug.
"""
import sys

# named evaluate_model.py: a scripts/evaluate.py would shadow the `evaluate` library on sys.path

from st3_hf.train.cli import evaluate_main
if __name__ == "__main__":
    sys.exit(evaluate_main())
