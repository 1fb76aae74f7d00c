#!/usr/bin/env python
"""GPU acceptance: every GPU claim measured in one prepared run, one JSON line per part (docs/gpu_acceptance.md).

    python scripts/gpu_acceptance.py --device cpu --out /tmp/acc          # the tiny CPU dry run
"""
import sys

from acceptance.driver import main

if __name__ == "__main__":
    sys.exit(main())
