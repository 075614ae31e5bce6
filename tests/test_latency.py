import csv
import io
import json

import pytest

from kbench.backbones import build_classifier, get_backbone
from kbench.latency import COLUMNS, LatencyConfig, iter_latency

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
    # by default each runtime runs with fixed settings, named in the detail; nothing measured per model
    details = {row["runtime"]: row["detail"] for row in rows if row["status"] == "ok"}
    assert details["onnxruntime-cpu"] == (
        "intra-op threads ONNX Runtime's default, spinning on, denormals as zero off, NHWC transformer on "
        "(fixed; --tune measures spinning per model)"
    )
    fixed = {"jax": "jax.jit(stateless_call)", "tensorflow": "tf.function without XLA (fixed; --tune also "}
    assert details["keras-compiled"].startswith(fixed[BACKEND])
    assert {r["backend"] for r in rows if r["runtime"].startswith("keras")} == {BACKEND}
    assert (tmp_path / "tiny.onnx").exists()  # exported once for the ONNX runtimes


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
    json_file = str(tmp_path / "rows.json")
    done = run_cli("latency", *common, "--tune", "--format", "json", "-o", json_file, cwd=tmp_path)
    assert (tmp_path / "exports" / "tiny.onnx").exists()  # the default export folder, reused below
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["runtime"] for r in rows] == ["onnxruntime-cpu", "onnxruntime-cuda"]
    # --tune: the spinning probe measured this model, and the detail names its choice and timings
    assert "(chosen by measuring at batch 1: spinning on " in rows[0]["detail"]
    table = csv.DictReader(io.StringIO(run_cli("latency", *common, "--format", "csv", cwd=tmp_path).stdout))
    assert table.fieldnames == COLUMNS and len(list(table)) == 2
    text = run_cli("latency", *common, "--format", "markdown", cwd=tmp_path).stdout
    assert text.startswith("machine: ") and "| onnxruntime-cpu |" in text
    # the settings each runtime used, under the table: by default the fixed ones, nothing measured
    assert "\n- tiny onnxruntime-cpu: intra-op threads ONNX Runtime's default, spinning on, " in text
    assert "(fixed; --tune measures spinning per model)" in text and "chosen by measuring" not in text
    bad = run_cli("latency", "no_such_backbone", "--backend", BACKEND)
    assert bad.returncode == 2 and "unknown backbone" in bad.stderr


def test_tune_is_part_of_the_study_latency_cache_key(tmp_path, monkeypatch):
    """A study's timings are reused only under the same settings: --tune times again."""
    from kbench import latency, study

    (tmp_path / "model.keras").write_bytes(b"a model")
    timed = []
    monkeypatch.setattr(latency, "iter_latency", lambda config: timed.append(config.tune) or iter([{"row": 1}]))
    settings = LatencyConfig(models=[])
    for tune in (False, False, True, True):
        settings.tune = tune
        assert study._latency_rows(str(tmp_path), str(tmp_path / "onnx"), settings) == [{"row": 1}]
    assert timed == [False, True]


def test_keras_compiled_measures_xla_only_when_tuned(tiny_model):
    import keras
    import numpy as np

    from kbench.runtimes import KerasCompiled

    model = keras.models.load_model(tiny_model)
    pixels = np.zeros((1, 24, 24, 3), np.float32)
    for tune in (False, True):
        runtime = KerasCompiled(tune)
        runtime.prepare(model, (24, 24))
        assert runtime.run(pixels).shape == (1, 1)
        if BACKEND == "jax":  # one way to compile: nothing to choose
            assert runtime.detail == "jax.jit(stateless_call)"
        elif tune:
            assert runtime.detail.startswith("tf.function") and "(chosen by measuring: tf.function " in runtime.detail
        else:
            assert runtime.detail == "tf.function without XLA (fixed; --tune also measures tf.function+XLA)"
