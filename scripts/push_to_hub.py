#!/usr/bin/env python
"""Upload an exported folder (scripts/export.py) to the Hugging Face Hub.

    python scripts/push_to_hub.py outputs/run/hub --repo-id my-org/resnet50-st3-90 [--private] [--revision BRANCH]

Needs a token: HF_TOKEN, or `hf auth login` once.  A problem (bad repo id, no
token, incomplete export) is one ``error: ...`` line on stderr and exit code 2
(1 for a failed upload); a traceback means a bug.
"""
import sys

from st3_hf.train.cli import push_main
if __name__ == "__main__":
    sys.exit(push_main())
