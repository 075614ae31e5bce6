import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

MEASURES = ["train_images_per_second", "step_sync", "loader_images_per_second", "keras_compiled_ms", "tf32_gap"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(REPO, "benchmarks", "gpu_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_tiny_through_gpu_sh_prints_a_result_line_per_measure(tmp_path):
    """gpu.sh --tiny, as a lent machine runs it at full size: JAX only (in its own process, whatever the
    suite's backend), every measure a RESULT line and a row of results.json, TensorFlow never imported."""
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "PYTHONPATH": REPO}
    environment.pop("KERAS_BACKEND", None)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), "--tiny"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert [line[1] for line in lines] == [
        "train_images_per_second",
        "step_sync",
        "loader_images_per_second",
        "loader_images_per_second",
        "keras_compiled_ms",
        "keras_compiled_ms",
        "tf32_gap",
        "imported_tensorflow",
    ]
    record = json.loads((tmp_path / "results.json").read_text())
    results = {(row["name"], row.get("threads", row.get("batch"))): row for row in record["results"]}
    assert [row["threads"] for row in record["results"] if row["name"] == "loader_images_per_second"] == [8, 16]
    assert [row["batch"] for row in record["results"] if row["name"] == "keras_compiled_ms"] == [1, 32]
    for row in record["results"]:
        if row["name"] in MEASURES:
            assert isinstance(row["value"], float) and row["value"] > 0, row
    assert results["train_images_per_second", 8]["model"] == "small_cnn" and record["sizes"]["batch_size"] == 8
    # as kbench trains under JAX (no host sync per step), against a callback on the training thread
    assert results["train_images_per_second", 8]["asynchronous"] is True
    assert results["step_sync", 8]["asynchronous"] is False
    assert float(results["tf32_gap", 32]["relative_difference"]) < 1e-4  # a CPU computes float32 either way
    assert results["imported_tensorflow", None]["value"] is False
    assert record["command"] == "python benchmarks/gpu_bench.py --output-dir " + str(tmp_path) + " --tiny"


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--budget-seconds", "0"], {}, "argument --budget-seconds: must be at least 1"),
        (["--tiny", "--steps", "3"], {}, "unrecognized arguments: --steps 3"),
        (["--tiny"], {"KERAS_BACKEND": "tensorflow"}, "this check runs under JAX only; KERAS_BACKEND is 'tensorflow'"),
    ],
)
def test_gpu_script_refuses_bad_arguments_with_the_reason(capsys, monkeypatch, argv, environ, message):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        load_script().main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_gpu_script_refuses_a_process_whose_keras_runs_another_backend(capsys, monkeypatch):
    import keras

    if keras.backend.backend() == "jax":
        pytest.skip("keras runs JAX in this process")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(SystemExit) as stopped:
        load_script().main(["--tiny"])
    assert stopped.value.code == 2 and "keras is already loaded with another backend" in capsys.readouterr().err
