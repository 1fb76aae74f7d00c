#!/usr/bin/env python
"""Run recipes x seeds and collect one results table + plot.

    python scripts/sweep.py --recipes recipes/fmnist_*.yaml --seeds 0 1 2 --output results/fmnist
    python scripts/sweep.py --recipes recipes/fmnist_st3_90.yaml --seeds 0 --output /tmp/s \
        --override data.train_subset=2048 training.epochs=1     # CPU plumbing check
"""
import argparse
import shlex
import sys

from st3_hf.sweep import run_sweep, write_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output", required=True)
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--launcher", default=sys.executable, help='e.g. "accelerate launch --num_processes 1"')
    p.add_argument("--title", default="")
    args = p.parse_args()
    rows = run_sweep(args.recipes, args.seeds, args.output, args.override, shlex.split(args.launcher))
    paths = write_report(rows, args.output, args.title)
    print(paths["table"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
