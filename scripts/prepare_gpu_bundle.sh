#!/usr/bin/env bash
# Build an offline bundle for a GPU machine without internet access (Python 3.12; torch, timm, accelerate,
# transformers already installed): a wheel folder with deepspeed, datasets, evaluate and their missing needs,
# and the Fashion-MNIST files. Writes .gpu_bundle/ (git-ignored); copy it into the checkout on the GPU machine
# by whatever means you use (scripts/gpu_acceptance.sh installs .gpu_bundle/wheels). Needs internet access to PyPI.
#   bash scripts/prepare_gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.gpu_bundle
mkdir -p "$DEST/wheels" "$DEST/fashion-mnist"
# pure-Python or cp312 manylinux wheels, no dependencies pulled: each missing need is named here
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/wheels" datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0  # pydantic needs >= 4.16; the machine's own may be older
# deepspeed is published as a source archive only: build its pure-Python wheel (ops are JIT-built at run time)
if ! compgen -G "$DEST/wheels/deepspeed-*.whl" >/dev/null; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST/wheels" deepspeed==0.19.8
fi
cp -u /usr/share/datasets/fashion-mnist/*-ubyte.gz "$DEST/fashion-mnist/"
du -b "$DEST/wheels"/* "$DEST/fashion-mnist"/* | sort -n
total=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "bundle: $total bytes; tracked tree: $tree bytes"
