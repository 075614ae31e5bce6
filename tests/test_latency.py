import csv
import io
import json
import shutil

import pytest

from kbench.core.machine import has_native_bf16
from kbench.core.tables import LATENCY_COLUMNS, latency_text
from kbench.core.timing import BUSY_CORES
from kbench.models.backbones import build_classifier, get_backbone
from kbench.report.report import markdown_report
from kbench.serving.latency import LatencyConfig, ModelSource, Reference, iter_latency, measure, resolve_model
from kbench.serving.openvino import TOLERANCES

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
            assert row["device"] == "gpu:0" and "host to host" in row["detail"]
        assert row["status"] == "ok" and row["runs"] == 3 and 0 < row["min_ms"] <= row["p50_ms"] <= row["p99_ms"]
        assert row["images_per_second"] == pytest.approx(1000 * row["batch_size"] / row["p50_ms"])
        assert row["busy"] is (row["other_cpu_cores"] > BUSY_CORES)  # the machine's load, read around the timing
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


def test_two_models_of_one_name_get_rows_told_apart(tiny_model, tmp_path):
    """`kbench latency runs/a/m runs/b/m`: each row is labelled with its path, as `kbench compare` does."""
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(shutil.copy(tiny_model, str(tmp_path / folder / "m.keras")))
    rows = list(iter_latency(LatencyConfig([*paths, tiny_model], ["keras-predict"], [1], 1, 0)))
    assert [row["model"] for row in rows] == [*paths, "tiny"] and {row["status"] for row in rows} == {"ok"}


def test_a_backbone_name_is_the_same_random_model_every_time(tmp_path):
    """`kbench latency small_cnn` twice times the same weights: its rows (parity too) repeat and its
    ONNX file is reused, not made again."""
    import numpy as np

    from kbench.export.onnx import load_model

    weights = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        source = resolve_model("small_cnn", "none", str(tmp_path / folder))
        weights.append(load_model(source.keras_path).get_weights())
    assert len(weights[0]) == len(weights[1]) > 0
    assert all(np.array_equal(a, b) for a, b in zip(*weights))


def test_measure_reports_progress_and_rewrites_the_output_after_each_row(tiny_model, tmp_path):
    calls, output = [], str(tmp_path / "rows.csv")
    config = LatencyConfig([tiny_model], ["keras-predict"], [1, 2], 1, 0)
    rows, interrupted = measure(config, output, "csv", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)] and not interrupted  # the CLI draws its bar from these
    with open(output) as handle:
        assert [row["batch_size"] for row in csv.DictReader(handle)] == ["1", "2"]


@pytest.mark.once
def test_the_progress_total_counts_an_ensembles_parallel_rows(tiny_model, tmp_path):
    """An ensemble's onnxruntime-cpu rows are followed by onnxruntime-cpu-parallel's: the progress bar's
    total counts them, and ends where the rows do."""
    ensemble = tmp_path / "pair"
    ensemble.mkdir()
    shutil.copy(tiny_model, ensemble / "model.keras")
    (ensemble / "metrics.json").write_text(json.dumps({"members": [{"backbone": "small_cnn"}] * 2, "classes": 2}))
    calls = []
    config = LatencyConfig([str(ensemble), tiny_model], ["keras-predict", "onnxruntime-cpu"], [1, 2], 1, 0)
    config.export_dir = str(tmp_path / "exports")
    rows, _ = measure(config, progress=lambda done, total: calls.append((done, total)))
    assert [row["runtime"] for row in rows if row["model"] == "pair"] == [
        "keras-predict",
        "keras-predict",
        "onnxruntime-cpu",
        "onnxruntime-cpu",
        "onnxruntime-cpu-parallel",
        "onnxruntime-cpu-parallel",
    ]
    assert len(rows) == 10 and calls == [(done, 10) for done in range(11)]


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_onnx_file_gets_onnx_rows_and_says_why_not_keras(tiny_model, tmp_path):
    list(iter_latency(LatencyConfig([tiny_model], ["onnxruntime-cpu"], [1], 2, 0, export_dir=str(tmp_path))))
    rows = list(
        iter_latency(LatencyConfig([str(tmp_path / "tiny.onnx")], ["keras-predict", "onnxruntime-cpu"], [1], 2, 0))
    )
    assert rows[0]["status"] == "unavailable: MODEL is an ONNX file" and rows[1]["status"] == "ok"


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
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


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
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
    assert isinstance(rows[0]["busy"], bool) and rows[0]["other_cpu_cores"] >= 0
    table = csv.DictReader(io.StringIO(run_cli("latency", *common, "--format", "csv", cwd=tmp_path).stdout))
    assert table.fieldnames == LATENCY_COLUMNS and len(list(table)) == 2
    text = run_cli("latency", *common, "--format", "markdown", cwd=tmp_path).stdout
    assert text.startswith("machine: ") and "| onnxruntime-cpu |" in text
    # the settings each runtime used, under the table: by default the fixed ones, nothing measured
    assert "\n- tiny onnxruntime-cpu: intra-op threads ONNX Runtime's default, spinning on, " in text
    assert "(fixed; --tune measures spinning per model)" in text and "chosen by measuring" not in text
    bad = run_cli("latency", "no_such_backbone", "--backend", BACKEND)
    assert bad.returncode == 2 and "unknown backbone" in bad.stderr


def busy_rows(busy: bool) -> list[dict]:
    row = {"model": "m", "runtime": "onnxruntime-cpu", "batch_size": 1, "p50_ms": 1.0, "status": "ok"}
    return [
        {**row, "other_cpu_cores": 1.37 if busy else 0.02, "busy": busy},
        {**row, "batch_size": 8, "other_cpu_cores": 0.1, "busy": False},
        {**row, "batch_size": 32, "status": "unavailable: no"},
    ]


@pytest.mark.parametrize("output_format", ["table", "markdown"])
def test_a_busy_machine_is_said_under_the_table_and_in_the_rows(output_format):
    machine = {"cpu": "c", "cores": 2, "gpu": "none", "threads": 2, "versions": {}}
    text = latency_text(busy_rows(True), output_format, machine)
    assert "\n\nwarning: the machine was busy while 1 of 2 rows were timed (other processes used up to 1.37 " in text
    assert "busy" not in latency_text(busy_rows(False), output_format, machine)
    rows = json.loads(latency_text(busy_rows(True), "json", machine))
    assert [row.get("busy") for row in rows] == [True, False, None]
    table = csv.DictReader(io.StringIO(latency_text(busy_rows(True), "csv", machine)))
    assert [row["busy"] for row in table] == ["True", "False", ""]


def test_the_study_report_says_which_timings_a_busy_machine_made():
    results = {"name": "s", "backend": "jax", "rows": []}
    for name, busy in (("quiet", False), ("loaded", True)):
        timings = [{**row, "model": name} for row in busy_rows(busy)]
        results["rows"].append({"name": name, "kind": "backbone", "status": "ok", "latency": timings})
    from kbench.report.report import flat_rows

    report = markdown_report(results, flat_rows(results))
    assert "**The machine was busy while timing** loaded onnxruntime-cpu b1 (other processes used more " in report
    assert "quiet onnxruntime-cpu" not in report.split("busy while timing")[1].split("\n")[0]
    results["rows"].pop()
    assert "busy while timing" not in markdown_report(results, flat_rows(results))


def test_tune_is_part_of_the_study_latency_cache_key(tmp_path, monkeypatch):
    """A study's timings are reused only under the same settings: --tune times again."""
    from kbench.serving import latency
    from kbench.study import stages

    (tmp_path / "model.keras").write_bytes(b"a model")
    timed = []
    monkeypatch.setattr(latency, "iter_latency", lambda config: timed.append(config.tune) or iter([{"row": 1}]))
    settings = LatencyConfig(models=[])
    for tune in (False, False, True, True):
        settings.tune = tune
        assert stages._latency_rows(str(tmp_path), str(tmp_path / "onnx"), settings) == [{"row": 1}]
    assert timed == [False, True]


def test_keras_compiled_measures_xla_only_when_tuned(tiny_model):
    import keras
    import numpy as np

    from kbench.serving.runtimes import KerasCompiled

    model = keras.models.load_model(tiny_model)
    pixels = np.zeros((1, 24, 24, 3), np.float32)
    for tune in (False, True):
        runtime = KerasCompiled(tune)
        runtime.prepare(model, (24, 24))
        output = runtime.run(pixels)
        assert output.shape == (1, 1) and isinstance(output, np.ndarray)  # timed host to host, as every row
        if BACKEND == "jax":  # one way to compile: nothing to choose
            assert runtime.detail == "jax.jit(stateless_call)"
        elif tune:
            assert runtime.detail.startswith("tf.function") and "(chosen by measuring: tf.function " in runtime.detail
        else:
            assert runtime.detail == "tf.function without XLA (fixed; --tune also measures tf.function+XLA)"


def test_openvino_parity_compares_logits_where_the_probabilities_saturate(tmp_path):
    """A confident model's sigmoid gives 1.0 whatever small error its logits carry: the check compares
    the head's logits too, as the export's does (here: OpenVINO's own against Keras', then a runtime
    whose logits are 1% off while its probabilities agree)."""
    import numpy as np

    from kbench.data.synthetic import sample_pixels
    from kbench.serving.openvino import OpenVinoCPU

    model = build_classifier(get_backbone("small_cnn"), 2, 24, "none")
    head = model.get_layer("probability")
    head.bias.assign(np.full(head.bias.shape, 60.0, np.float32))  # P = 1.0 in float32 on any pixels
    model.save(str(tmp_path / "sure.keras"))
    (row,) = iter_latency(
        LatencyConfig([str(tmp_path / "sure.keras")], ["openvino-cpu"], [1], 2, 0, export_dir=str(tmp_path))
    )
    assert row["status"] == "ok" and row["parity"] <= TOLERANCES["f32"]

    source = resolve_model(str(tmp_path / "sure.keras"), "imagenet", str(tmp_path))
    reference, pixels = Reference(source), sample_pixels(1, source.image_size)
    runtime = OpenVinoCPU()
    runtime.prepare(str(tmp_path / "sure.onnx"), source.image_size)
    assert np.all(reference(pixels)[0] == 1.0)
    assert np.allclose(runtime.logits(pixels), reference.logits(pixels), rtol=1e-4) and runtime.logits(pixels) > 50

    class OffLogits:
        detail, tolerance = "fake", 1e-4

        def run(self, pixels):
            return reference(pixels)  # the same saturated probabilities

        def logits(self, pixels):
            return reference.logits(pixels) * 1.01

    checked = reference.check(OffLogits(), pixels)
    assert checked["status"].startswith("failed: differs from Keras by 1.0e-02")
