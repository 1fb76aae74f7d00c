#!/usr/bin/env python
"""Train a sparse timm model from a recipe.

    accelerate launch scripts/train.py recipes/r50_st3_98.yaml
    accelerate launch --config_file recipes/accelerate_configs/multinode.yaml scripts/train.py recipes/r50_st3_98.yaml
    python scripts/train.py recipes/quickstart.yaml training.max_steps=20 output_dir=/tmp/x
    python scripts/train.py recipes/r50_st3_98.yaml --print-config
"""
import sys

from st3_hf.train.cli import train_main
if __name__ == "__main__":
    sys.exit(train_main())
