import csv
import io
import json

import pytest

from kbench.backbones import build_classifier, get_backbone
from kbench.latency import COLUMNS, LatencyConfig, ModelSource, Reference, iter_latency
from kbench.machine import has_native_bf16
from kbench.ovruntime import TOLERANCES

from conftest import BACKEND, onnxruntime_cuda, run_cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("latency") / "tiny.keras")
    build_classifier(get_backbone("small_cnn"), 2, 24).save(path)
    return path


def test_rows_for_every_runtime_and_cuda_only_where_it_runs(tiny_model, tmp_path):
    config = LatencyConfig([tiny_model], batch_sizes=[1, 2], runs=3, warmup=1, export_dir=str(tmp_path))
    rows = list(iter_latency(config))
    assert [(r["runtime"], r["batch_size"]) for r in rows] == [
        (runtime, batch)
        for runtime in (
            "keras-predict",
            "keras-compiled",
            "onnxruntime-cpu",
            "openvino-cpu",
            "openvino-cpu-bf16",
            "onnxruntime-cuda",
        )
        for batch in (1, 2)
    ]
    for row in rows:
        missing = {"onnxruntime-cuda": not onnxruntime_cuda(), "openvino-cpu-bf16": not has_native_bf16()}
        if missing.get(row["runtime"]):
            assert row["status"].startswith("unavailable: ") and "p50_ms" not in row  # never a quiet fallback
            continue
        if row["runtime"].startswith("openvino"):  # checked against Keras on the timed pixels
            tolerance = TOLERANCES["bf16" if row["runtime"].endswith("bf16") else "f32"]
            assert 0 <= row["parity"] <= tolerance and row["backend"] == "openvino"
            assert row["detail"].endswith(f"; checked against Keras within {tolerance:.0e}")
        if row["runtime"] == "onnxruntime-cuda":
            assert row["device"].startswith("cuda")
        assert row["status"] == "ok" and row["runs"] == 3 and 0 < row["min_ms"] <= row["p50_ms"] <= row["p99_ms"]
        assert row["images_per_second"] == pytest.approx(1000 * row["batch_size"] / row["p50_ms"])
    assert {r["backend"] for r in rows if r["runtime"].startswith("keras")} == {BACKEND}
    assert (tmp_path / "tiny.onnx").exists()  # exported once for the ONNX runtimes


def test_onnx_file_gets_onnx_rows_and_says_why_not_keras(tiny_model, tmp_path):
    list(iter_latency(LatencyConfig([tiny_model], ["onnxruntime-cpu"], [1], 2, 0, export_dir=str(tmp_path))))
    rows = list(
        iter_latency(LatencyConfig([str(tmp_path / "tiny.onnx")], ["keras-predict", "onnxruntime-cpu"], [1], 2, 0))
    )
    assert rows[0]["status"] == "unavailable: MODEL is an ONNX file" and rows[1]["status"] == "ok"


def test_openvino_rows_on_an_onnx_file_are_checked_against_onnx_runtime(tiny_model, tmp_path):
    list(iter_latency(LatencyConfig([tiny_model], ["onnxruntime-cpu"], [1], 2, 0, export_dir=str(tmp_path))))
    (row,) = iter_latency(LatencyConfig([str(tmp_path / "tiny.onnx")], ["openvino-cpu"], [3], 2, 0))
    assert row["status"] == "ok" and row["parity"] <= 1e-4 and row["batch_size"] == 3
    assert row["detail"].endswith("; checked against ONNX Runtime within 1e-04")


class Disagreeing:
    """A runtime whose outputs are 0.5 off the reference's."""

    detail, tolerance = "fake", 2e-2

    def __init__(self, reference):
        self.reference = reference

    def run(self, pixels):
        return [output + 0.5 for output in self.reference(pixels)]


def test_a_row_over_its_tolerance_fails_and_says_by_how_much(tiny_model):
    import numpy as np

    reference = Reference(ModelSource("tiny", tiny_model, None, (24, 24)))
    fields = reference.check(Disagreeing(reference), np.zeros((2, 24, 24, 3), np.float32))
    assert fields["status"] == "failed: differs from Keras by 5.0e-01 > 2e-02" and fields["parity"] == 0.5


def test_cli_formats_round_trip(tiny_model, tmp_path):
    common = [
        tiny_model,
        "--runtime",
        "onnxruntime-cpu,onnxruntime-cuda",
        "--batch-size",
        "1",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--backend",
        BACKEND,
    ]
    done = run_cli("latency", *common, "--format", "json", "-o", str(tmp_path / "rows.json"), cwd=tmp_path)
    assert (tmp_path / "exports" / "tiny.onnx").exists()  # the default export folder, reused below
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["runtime"] for r in rows] == ["onnxruntime-cpu", "onnxruntime-cuda"]
    table = csv.DictReader(io.StringIO(run_cli("latency", *common, "--format", "csv", cwd=tmp_path).stdout))
    assert table.fieldnames == COLUMNS and len(list(table)) == 2
    text = run_cli("latency", *common, "--format", "markdown", cwd=tmp_path).stdout
    assert text.startswith("machine: ") and "| onnxruntime-cpu |" in text
    # the settings each runtime used, under the table: the spinning probe's choice and timings
    assert "\n- tiny onnxruntime-cpu: intra-op threads " in text and "(chosen by measuring at batch 1: " in text
    bad = run_cli("latency", "no_such_backbone", "--backend", BACKEND)
    assert bad.returncode == 2 and "unknown backbone" in bad.stderr
