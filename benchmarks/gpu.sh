#!/usr/bin/env bash
# GPU benchmark in one call, for a machine with an NVIDIA GPU where JAX (with CUDA) is installed and
# the rest comes as wheels in .whl/ (keras, onnx, onnxruntime-gpu, opencv-python-headless, click, ...).
# ONNX files, exported beforehand on a machine with TensorFlow (`kbench export onnx`), go in
# exports/gpu/. Prints the markdown table for benchmarks/README.md and writes it to ${OUT:-.}/gpu.md, its
# rows (with the command and the machine) to ${OUT:-.}/gpu_bench.json for benchmarks/results/.
#   bash benchmarks/gpu.sh [gpu_bench.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python3 benchmarks/gpu_bench.py --onnx-dir exports/gpu -o "${OUT:-.}/gpu.md" --json "${OUT:-.}/gpu_bench.json" "$@"
