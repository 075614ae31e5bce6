import importlib.util
import json
import os

import pytest

from conftest import BACKEND, REPO


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(REPO, "benchmarks", "gpu_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(BACKEND != "jax", reason="the GPU script runs under JAX, as on the GPU machine")
def test_gpu_script_runs_tiny_on_cpu_and_writes_its_table(tmp_path):
    script = load_script()
    output = tmp_path / "gpu.md"
    table = script.main(["--backbones", "small_cnn", "--image-size", "32", "--batch-size", "8", "--steps", "2",
                         "--latency-runs", "3", "--pipeline-images", "32", "-o", str(output),
                         "--json", str(tmp_path / "gpu_bench.json")])
    assert output.read_text().strip() == table.strip()
    record = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert record["table"] == table and record["command"].startswith("python benchmarks/gpu_bench.py --backbones")
    assert len(record["rows"]) == len(table.splitlines()) - 4  # header line, blank, column names, rule
    lines = table.splitlines()
    assert lines[0].startswith("Device: cpu")
    assert "| small_cnn | train images/s (in-memory) | float32 | 8 |" in table
    assert "| small_cnn | train images/s (pipeline) | float32 | 8 |" in table
    assert "refused on a CPU" in table
    assert "| small_cnn | onnxruntime-cuda p50 |  | 1 |" in table or "onnxruntime-cuda p50 | - | 1 |" in table


@pytest.mark.skipif(BACKEND != "jax", reason="the GPU script runs under JAX")
def test_gpu_script_rejects_bad_arguments():
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--steps", "0"])
