#!/usr/bin/env bash
# The GPU check in one call of about 7 minutes, JAX only (benchmarks/docs/gpu.md): each measure prints a
# RESULT line, and results.json lands in ${OUT:-reports/gpu}/. Run from anywhere:
#   bash benchmarks/gpu.sh [gpu_bench.py options]        # or: make bench-gpu
# It uses $PYTHON, else the repository's .venv when there is one, else python3 (a lent machine's, which has JAX but
# no Keras). Carry what python3 lacks as wheels in .whl/ at the repository's root (for a lent machine:
# keras, namex, optree; see benchmarks/docs/gpu.md): the wheels of packages python3 doesn't already
# have are installed into a temporary folder put first on PYTHONPATH, and removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # PYTHON=... chooses the interpreter
  PYTHON=python3
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  trap 'rm -rf "$SITE"' EXIT
  missing=()
  for wheel in .whl/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1)  # the distribution's name, as wheel file names spell it
    if ! "$PYTHON" -c 'import importlib.metadata, sys; importlib.metadata.version(sys.argv[1])' "$name" 2>/dev/null; then
      missing+=("$wheel")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${#missing[@]} carried wheel(s) into $SITE: ${missing[*]##*/}" >&2
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi lists no GPU" >&2
# The script keeps to a 420 s budget (each measure skipped when it would not fit); the limit is the net.
timeout 480 "$PYTHON" benchmarks/gpu_bench.py --output-dir "${OUT:-reports/gpu}" "$@"
