#!/usr/bin/env python
"""GPU acceptance: every GPU claim measured in one prepared run, one JSON line per part under $OUT.

    python scripts/gpu_acceptance.py --device cpu --out /tmp/acc          # the tiny CPU dry run
    bash scripts/gpu_acceptance.sh --device cuda --parts cuda_tests,benchmark_eager,benchmark_compile,train_loop \
        --budget-s 500                                                    # on the GPU machine (docs/gpu_acceptance.md)
"""
import sys

from acceptance.driver import main
if __name__ == "__main__":
    sys.exit(main())
