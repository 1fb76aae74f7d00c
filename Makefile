# `make demo` and `make test` each do all of their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast venv data clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision come from the local disk (pip's find-links); pin them first so nothing pulls another build
	$(BIN)/pip install --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -e '.[dev]'
	# the deepspeed extra (DeepSpeed ZeRO-1/2 tests): DeepSpeed is an sdist whose build imports torch, so it is
	# built against the torch above (an isolated build env would download another torch) and without its
	# compiled ops (the CPU accelerator JIT-builds the one it needs on first use)
	$(BIN)/pip install --disable-pip-version-check 'setuptools>=64' wheel
	DS_BUILD_OPS=0 $(BIN)/pip install --disable-pip-version-check --no-build-isolation -e '.[dev,deepspeed]'
	touch $@

data: $(FMNIST_DIR)/train-images-idx3-ubyte.gz

$(FMNIST_DIR)/train-images-idx3-ubyte.gz:
	apt-get update -q && apt-get install -y -q dataset-fashion-mnist

# the demo's folder is its own: a second `make demo` starts it over (training.overwrite_output_dir)
demo: venv data
	$(BIN)/accelerate launch --config_file recipes/accelerate_configs/cpu.yaml scripts/train.py recipes/quickstart.yaml training.overwrite_output_dir=true

# two workers, whole files each (a file's module fixtures are built once): most tests compute on one thread
test: venv data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# the edit-test loop: unit tests and in-process CLI checks, without the end-to-end runs (pytest's slow marker)
test-fast: venv data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

clean:
	rm -rf $(VENV) outputs
