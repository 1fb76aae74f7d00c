#!/usr/bin/env bash
# The GPU machine's entry point: install the carried wheels (deepspeed, datasets, evaluate and their needs,
# from .gpu_bundle/wheels, made by scripts/prepare_gpu_bundle.sh), then run the acceptance driver.
#   bash scripts/gpu_acceptance.sh --device cuda --parts ... --budget-s 500
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=/tmp/st3_site
WHEELS=${ST3_WHEELS:-.gpu_bundle/wheels}  # Python 3.12 wheels: only for the GPU machine's python3
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "error: installing $WHEELS failed" >&2; exit 3; }
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PY" scripts/gpu_acceptance.py "$@"
