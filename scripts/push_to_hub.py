#!/usr/bin/env python
"""Upload an exported folder (scripts/export.py) to the Hugging Face Hub.

    python scripts/push_to_hub.py outputs/run/hub --repo-id my-org/resnet50-st3-90 [--private] [--revision BRANCH]

Needs a token: HF_TOKEN, or `hf auth login` once.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="exported folder (config.json, model.safetensors, README.md, ...)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit-message", default=None)
    args = parser.parse_args(argv)

    from st3_hf.hub.push import DEFAULT_COMMIT_MESSAGE, push_folder

    try:
        url = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
