#!/usr/bin/env bash
# The GPU benchmark in one call, within 8 minutes: on your GPU machine, after `make install` (which
# installs the CUDA builds when nvidia-smi lists a GPU), run
#   bash benchmarks/gpu.sh [gpu_bench.py options]        # or: make bench-gpu
# It uses the repository's .venv when there is one, else python3. It writes gpu.md (the tables for
# benchmarks/README.md, headed by the card's name) and gpu.json to ${OUT:-reports/gpu}/.
#
# On a machine where nothing can be installed, carry the missing packages as wheels in .whl/ at the
# repository's root (e.g. keras, onnx, tf2onnx, onnxruntime-gpu, opencv-python-headless, click, and
# their own dependencies): the wheels of packages that python3 doesn't already have are installed
# into a temporary folder put first on PYTHONPATH, and removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
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
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi lists no GPU" >&2
# The script keeps to a 420 s budget and writes after every measure; the limit is the safety net.
timeout 480 "$PYTHON" benchmarks/gpu_bench.py --output-dir "${OUT:-reports/gpu}" "$@"
