# Set-up and everyday commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-jax test-tensorflow test-heavy bench-pipeline clean

install: $(STAMP)

# Re-runs only when the dependencies change; `make install` is idempotent.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/kbench demo

# The suite runs once per backend.
test: test-jax test-tensorflow

test-jax: install
	KERAS_BACKEND=jax $(PY) -m pytest -q tests

test-tensorflow: install
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q tests

# Real keras.applications backbones at reduced size (slow).
test-heavy: install
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q -m heavy tests
	KERAS_BACKEND=jax $(PY) -m pytest -q -m heavy tests

bench-pipeline: install
	$(PY) benchmarks/pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache
