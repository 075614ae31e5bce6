# Set-up and everyday commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# The CUDA builds (JAX's CUDA 12 plugin, TensorFlow's CUDA libraries, onnxruntime-gpu) when
# `nvidia-smi -L` lists a GPU, else the CPU builds; `make install CUDA=1` or `CUDA=0` forces the choice.
ifndef CUDA
CUDA := $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU'),1,0)
endif
ifeq ($(CUDA),1)
FLAVOUR := cuda
OTHER_SET := onnxruntime
else ifeq ($(CUDA),0)
FLAVOUR := cpu
OTHER_SET := onnxruntime-gpu
else
$(error CUDA must be 1 (the CUDA builds) or 0 (the CPU builds), not '$(CUDA)')
endif
# One stamp per set, so that switching between them re-installs.
STAMP := $(VENV)/.installed-$(FLAVOUR)

.PHONY: install demo lint test test-jax test-tensorflow test-heavy bench-pipeline bench-gpu peer-env bench-export-graph clean

install: $(STAMP)

# Re-runs only when the dependencies or the set change; `make install` is idempotent. Each set's extra
# holds its own ONNX Runtime (onnxruntime or onnxruntime-gpu, see pyproject.toml). The two install the
# same module folder, so removing one breaks the other: when switching sets, while the other set's
# ONNX Runtime is there, both go (with the CUDA set's JAX plugin and NVIDIA libraries, which would
# otherwise keep JAX and TensorFlow on the GPU under CUDA=0) and the install puts the chosen one back whole.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	if $(PY) -m pip show --quiet $(OTHER_SET) 2>/dev/null; then \
	  $(PY) -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu \
	    $(if $(filter cpu,$(FLAVOUR)),jax-cuda12-plugin jax-cuda12-pjrt $$($(PY) -m pip freeze | grep -o '^nvidia-[a-z0-9-]*-cu12')); \
	fi
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray,$(FLAVOUR)]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/kbench demo

# Lint and format check, the docstring examples, then the suite: all of it under TensorFlow, and what
# depends on the backend (not marked `once`) under JAX too. Two test processes (pytest-xdist, a test
# file each), and the 20 slowest tests printed so that the next slow one is seen. `make test` <= 15 min.
TEST_PROCESSES ?= 2
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile --durations=20
test: lint test-tensorflow test-jax

# ruff, then the pipeline's layering (import-linter's contracts in pyproject.toml: each stage imports
# only the stages below it, no import circles).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test-jax: install
	KERAS_BACKEND=jax $(PY) -m pytest -q -p no:cacheprovider --doctest-modules kbench
	KERAS_BACKEND=jax $(PYTEST) -m "not heavy and not once" tests

test-tensorflow: install
	KERAS_BACKEND=tensorflow $(PYTEST) tests

# The slow tier: real keras.applications backbones (one export per family at reduced size, every
# backbone's sizes, parameters and GFLOPs at full size, in-graph preprocessing of every backbone) and
# the demo end to end. Under JAX only what depends on the backend. Its tests share no module fixtures:
# spread one by one (--dist load), not a file per process.
test-heavy: install
	KERAS_BACKEND=tensorflow $(PYTEST) --dist load -m heavy tests
	KERAS_BACKEND=jax $(PYTEST) --dist load -m "heavy and not once" tests

bench-pipeline: install
	$(PY) benchmarks/pipeline.py

# On a GPU machine: training images/s and latency in one call (benchmarks/README.md).
bench-gpu: install
	bash benchmarks/gpu.sh

# The peer environment benchmarks/export_graph.py compares kbench's exports with: torch + timm, kept
# out of .venv. PyPI's Linux torch wheel is the CUDA build: with its NVIDIA libraries about 5.6 GB
# (measured), though only its CPU path is used.
PEER_VENV := .venv-peer
peer-env: $(PEER_VENV)/.installed

$(PEER_VENV)/.installed:
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --quiet torch timm onnx onnxscript
	touch $@

bench-export-graph: install
	$(PY) benchmarks/export_graph.py --session-options

clean:
	rm -rf $(VENV) $(PEER_VENV) runs .pytest_cache
