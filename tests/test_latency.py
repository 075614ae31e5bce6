import csv
import io
import json
import shutil

import numpy as np
import pytest

from kbench.backbones import build_classifier, get_backbone
from kbench.latency import LatencyConfig, iter_latency, measure, time_runs
from kbench.metrics import latency_stats
from kbench.tables import LATENCY_COLUMNS

from conftest import BACKEND, onnxruntime_cuda, run_cli


def test_latency_statistics_from_known_timings():
    stats = latency_stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert stats["min_ms"] == 1.0 and stats["p50_ms"] == 3.0 and stats["mean_ms"] == 22.0
    assert stats["p90_ms"] == pytest.approx(61.6) and stats["p99_ms"] == pytest.approx(96.16)
    assert stats["std_ms"] == pytest.approx(np.std([4, 1, 3, 2, 100]))


def test_time_runs_excludes_warmup_and_times_each_run():
    calls = []
    timings = time_runs(lambda pixels: calls.append(1), None, runs=5, warmup=3)
    assert len(calls) == 8 and len(timings) == 5 and all(t >= 0 for t in timings)


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
        for runtime in ("keras-predict", "keras-compiled", "onnxruntime-cpu", "onnxruntime-cuda")
        for batch in (1, 2)
    ]
    for row in rows:
        if row["runtime"] == "onnxruntime-cuda" and not onnxruntime_cuda():
            assert row["status"].startswith("unavailable: ") and "p50_ms" not in row  # never a quiet CPU run
            continue
        if row["runtime"] == "onnxruntime-cuda":
            assert row["device"].startswith("cuda")
        assert row["status"] == "ok" and row["runs"] == 3 and 0 < row["min_ms"] <= row["p50_ms"] <= row["p99_ms"]
        assert row["images_per_second"] == pytest.approx(1000 * row["batch_size"] / row["p50_ms"])
    assert {r["backend"] for r in rows if r["runtime"].startswith("keras")} == {BACKEND}
    assert (tmp_path / "tiny.onnx").exists()  # exported once for the ONNX runtimes


def test_two_models_of_one_name_get_rows_told_apart(tiny_model, tmp_path):
    """`kbench latency runs/a/m runs/b/m`: each row is labelled with its path, as `kbench compare` does."""
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(shutil.copy(tiny_model, str(tmp_path / folder / "m.keras")))
    rows = list(iter_latency(LatencyConfig([*paths, tiny_model], ["keras-predict"], [1], 1, 0)))
    assert [row["model"] for row in rows] == [*paths, "tiny"] and {row["status"] for row in rows} == {"ok"}


def test_measure_reports_progress_and_rewrites_the_output_after_each_row(tiny_model, tmp_path):
    calls, output = [], str(tmp_path / "rows.csv")
    config = LatencyConfig([tiny_model], ["keras-predict"], [1, 2], 1, 0)
    rows, interrupted = measure(config, output, "csv", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)] and not interrupted  # the CLI draws its bar from these
    with open(output) as handle:
        assert [row["batch_size"] for row in csv.DictReader(handle)] == ["1", "2"]


def test_onnx_file_gets_onnx_rows_and_says_why_not_keras(tiny_model, tmp_path):
    list(iter_latency(LatencyConfig([tiny_model], ["onnxruntime-cpu"], [1], 2, 0, export_dir=str(tmp_path))))
    rows = list(
        iter_latency(LatencyConfig([str(tmp_path / "tiny.onnx")], ["keras-predict", "onnxruntime-cpu"], [1], 2, 0))
    )
    assert rows[0]["status"] == "unavailable: MODEL is an ONNX file" and rows[1]["status"] == "ok"


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
    assert table.fieldnames == LATENCY_COLUMNS and len(list(table)) == 2
    text = run_cli("latency", *common, "--format", "markdown", cwd=tmp_path).stdout
    assert text.startswith("machine: ") and "| onnxruntime-cpu |" in text
    # the settings each runtime used, under the table: the spinning probe's choice and timings
    assert "\n- tiny onnxruntime-cpu: intra-op threads " in text and "(chosen by measuring at batch 1: " in text
    bad = run_cli("latency", "no_such_backbone", "--backend", BACKEND)
    assert bad.returncode == 2 and "unknown backbone" in bad.stderr
