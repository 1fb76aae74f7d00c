#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face Hub folder (timm format + compact sparse copy + card).

    python scripts/export.py outputs/run/checkpoints/step_00001000 --output-dir outputs/run/hub \
        --metrics-file outputs/run/metrics.jsonl --repo-id my-org/resnet50-st3-90

The checkpoint folder is one written by accelerate's ``save_state`` with the
resolved ``recipe.yaml`` next to it (see ``st3_hf.from_pretrained``).  The
export is crash-safe: the output folder keeps its previous export until the new
one is complete.  A problem with the inputs is one ``error: ...`` line on
stderr and exit code 2; a traceback means a bug.
"""
import sys

from st3_hf.train.cli import export_main
if __name__ == "__main__":
    sys.exit(export_main())
