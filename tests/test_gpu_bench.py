import importlib.util
import json
import os

import pytest

from kbench.core.machine import has_native_bf16, list_gpus

from conftest import BACKEND, REPO, accelerator, onnxruntime_cuda

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(REPO, "benchmarks", "gpu_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_runs_tiny_and_writes_markdown_and_json(tmp_path):
    """The whole script at tiny sizes (the suite's backend trains and times the latency)."""
    table = load_script().main(
        [
            "--backbones",
            "small_cnn",
            "--image-size",
            "32",
            "--batch-sizes",
            "8",
            "--steps",
            "3",
            "--latency-runs",
            "3",
            "--pipeline-images",
            "32",
            "--backends",
            BACKEND,
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "gpu.md").read_text().strip() == table.strip()
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["command"].startswith("python benchmarks/gpu_bench.py --backbones small_cnn --image-size 32")
    gpus = list_gpus()
    assert table.startswith(f"Device: {gpus[0]}" if gpus else "Device: CPU only")
    rows = {row["precision"]: row for row in result["train"]}
    assert set(rows) == {"float32", "bfloat16"}
    for precision, row in rows.items():
        if precision == "bfloat16" and not accelerator() and not has_native_bf16():
            assert row["status"].startswith("refused: --mixed-precision bfloat16 on a CPU needs AMX-BF16")
            continue
        assert row["status"] == "ok" and row["backend"] == BACKEND and row["batch_size"] == 8, row
        assert row["in_memory_images_per_second"] > 0 and row["pipeline_images_per_second"] > 0
        assert row["pipeline_share"] == pytest.approx(
            row["pipeline_images_per_second"] / row["in_memory_images_per_second"]
        )
    latency = {(row["runtime"], row["batch_size"]): row for row in result["latency"]}
    assert set(latency) == {(runtime, batch) for runtime in ("keras-compiled", "onnxruntime-cuda") for batch in (1, 32)}
    assert all(latency["keras-compiled", batch]["p50_ms"] > 0 for batch in (1, 32))
    cuda = latency["onnxruntime-cuda", 1]
    assert cuda["status"] == "ok" if onnxruntime_cuda() else cuda["status"].startswith("unavailable: ")
    assert [row["threads"] for row in result["pipeline"]][0] == os.cpu_count()
    assert all(row["images"] == 32 and row["images_per_second"] > 0 for row in result["pipeline"])


def test_gpu_script_rejects_bad_arguments(capsys):
    script = load_script()
    for bad in (
        ["--steps", "0"],
        ["--batch-sizes", "0"],
        ["--pipeline-images", "10", "--batch-sizes", "8"],
        ["--precisions", "int8"],
    ):
        with pytest.raises(SystemExit):
            script.main(bad)
