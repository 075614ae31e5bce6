"""What a user sees when an input is wrong: one line, exit 2 (or 1 for an unexpected error, with
the traceback only under --debug), and nothing half-written."""

import os
import signal

import pytest

from conftest import BACKEND, run_cli


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from kbench.models.backbones import build_classifier, get_backbone

    path = str(tmp_path_factory.mktemp("model") / "cnn.keras")
    build_classifier(get_backbone("small_cnn"), 2, 32, "none").save(path)
    return path


def test_latency_of_a_missing_file_or_a_folder_that_is_no_run_is_one_line(tmp_path):
    done = run_cli("latency", str(tmp_path / "nope.keras"), "--backend", BACKEND)
    assert done.returncode == 2 and "not found" in done.stderr and "unknown backbone" not in done.stderr
    (tmp_path / "photos").mkdir()
    done = run_cli("latency", "small_cnn", str(tmp_path / "photos"), "--backend", BACKEND)
    # refused before any work: no progress bar ("timing"), no row of the first model
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is it a finished kbench run?" in done.stderr and not done.stdout
    (tmp_path / "empty.keras").write_bytes(b"")
    done = run_cli("latency", "small_cnn", str(tmp_path / "empty.keras"), "--backend", BACKEND)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a zip archive" in done.stderr


@pytest.mark.parametrize("content", [b"", b"garbage, not a protobuf"])
def test_corrupt_or_empty_onnx_is_one_line(content, kaggle_data, tmp_path):
    model = tmp_path / "broken.onnx"
    model.write_bytes(content)
    for args in (
        ["latency", str(model), "--runtime", "onnxruntime-cpu", "--runs", "1"],
        ["predict", str(model), "--data", kaggle_data["test"], "-o", str(tmp_path / "s.csv")],
    ):
        done = run_cli(*args, "--backend", BACKEND)
        assert done.returncode == 2, done.stderr
        assert str(model) in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, nothing else
    assert not (tmp_path / "s.csv").exists()


def test_output_naming_a_folder_is_refused_before_work(model_file, kaggle_data, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for args in (
        ["export", "onnx", model_file, "-o", str(folder)],
        ["predict", model_file, "--data", kaggle_data["test"], "-o", str(folder)],
        ["latency", model_file, "--runtime", "keras-predict", "--runs", "1", "-o", str(folder)],
    ):
        done = run_cli(*args, "--backend", BACKEND)
        assert done.returncode == 2 and "is a folder" in done.stderr, (args, done.stderr)
    assert os.listdir(folder) == []


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_export_reuses_a_file_made_from_the_same_model_and_redoes_a_changed_one(model_file, tmp_path):
    from kbench.models.backbones import build_classifier, get_backbone

    output = str(tmp_path / "m.onnx")
    first = run_cli("export", "onnx", model_file, "-o", output, "--backend", BACKEND)
    assert first.returncode == 0 and "wrote" in first.stdout, first.stderr
    again = run_cli("export", "onnx", model_file, "-o", output, "--backend", BACKEND)
    assert again.returncode == 0 and "up to date" in again.stdout
    other = run_cli("export", "onnx", model_file, "-o", output, "--opset", "15", "--backend", BACKEND)
    assert "wrote" in other.stdout  # other options: exported again
    build_classifier(get_backbone("small_cnn"), 2, 32, "none").save(model_file)  # a new model, same name
    changed = run_cli("export", "onnx", model_file, "-o", output, "--opset", "15", "--backend", BACKEND)
    assert changed.returncode == 0 and "wrote" in changed.stdout


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_export_without_graph_passes_keeps_the_converted_graph_and_is_its_own_file(model_file, tmp_path):
    import json

    from kbench.export.onnx import read_metadata

    output = str(tmp_path / "m.onnx")
    raw = run_cli("export", "onnx", model_file, "-o", output, "--no-graph-passes", "--backend", BACKEND)
    assert raw.returncode == 0 and "--no-graph-passes" in raw.stdout, raw.stderr
    assert json.loads(read_metadata(output)["kbench_graph_passes"])["skipped"] is True
    cleaned = run_cli("export", "onnx", model_file, "-o", output, "--backend", BACKEND)
    assert cleaned.returncode == 0 and "wrote" in cleaned.stdout  # not "up to date": other options
    assert "skipped" not in json.loads(read_metadata(output)["kbench_graph_passes"])


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    # A bug kbench doesn't foresee, planted through sitecustomize in the child process only.
    (tmp_path / "sitecustomize.py").write_text(
        "import kbench.cli.summaries\n"
        "def broken(*args, **kwargs):\n    raise RuntimeError('planted bug')\n"
        "kbench.cli.summaries.backbone_text = broken\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    quiet = run_cli("backbones", env=env)
    assert quiet.returncode == 1
    assert quiet.stderr.strip() == (
        "kbench: error: unexpected RuntimeError: planted bug (run with --debug for the traceback)"
    )
    for loud in (run_cli("--debug", "backbones", env=env), run_cli("backbones", env={**env, "KBENCH_DEBUG": "1"})):
        assert loud.returncode == 1 and "Traceback" in loud.stderr and "planted bug" in loud.stderr


def test_ensemble_numbers_and_run_dir_equal_to_a_member_are_refused(tmp_path):
    for args, message in (
        (["--epochs", "0"], "--epochs must be a positive whole number"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--tta-passes", "-2"], "--tta-passes must be a whole number >= 0"),
    ):
        done = run_cli("ensemble", "--members", "a,b", "--run-dir", str(tmp_path / "e"), *args, "--backend", BACKEND)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_a_run_without_validation_split_quantizes_and_refuses_calibration(kaggle_data, tmp_path):
    run_dir = str(tmp_path / "run")
    done = run_cli(
        "train",
        "--backbone",
        "small_cnn",
        "--data",
        kaggle_data["train"],
        "--image-size",
        "24",
        "--epochs",
        "1",
        "--val-split",
        "0",
        "--run-dir",
        run_dir,
        "--quiet",
        "--backend",
        BACKEND,
    )
    assert done.returncode == 0 and "no validation split" in done.stdout, done.stderr
    onnx = str(tmp_path / "m.onnx")
    done = run_cli("export", "onnx", run_dir, "-o", onnx, "--quantize", "int8", "--backend", BACKEND)
    assert done.returncode == 0, done.stderr
    if os.path.exists(tmp_path / "m.int8.onnx"):  # kept only where int8 measured faster (tests/test_quantize.py)
        assert "calibrated on" in done.stdout and "no validation split to compare" in done.stdout
        assert sorted(os.listdir(tmp_path)) == ["m.int8.onnx", "m.onnx", "run"]
    else:
        assert "no int8 file written: no int8 configuration was faster" in done.stdout
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "run"]
    done = run_cli(
        "predict",
        run_dir,
        "--data",
        kaggle_data["test"],
        "--calibrate",
        "-o",
        str(tmp_path / "s.csv"),
        "--backend",
        BACKEND,
    )
    assert done.returncode == 2 and "--calibrate needs validation images" in done.stderr
    assert not (tmp_path / "s.csv").exists()


def test_a_training_set_or_a_stray_name_is_no_test_set(model_file, kaggle_data, tmp_path):
    done = run_cli(
        "predict", model_file, "--data", kaggle_data["train"], "-o", str(tmp_path / "s.csv"), "--backend", BACKEND
    )
    assert done.returncode == 2 and "holds labelled training images" in done.stderr
    folder = tmp_path / "test"
    folder.mkdir()
    import zipfile

    with zipfile.ZipFile(kaggle_data["test"]) as archive:
        for name in archive.namelist()[:3]:
            (folder / os.path.basename(name)).write_bytes(archive.read(name))
    (folder / "cat.jpg").write_bytes((folder / os.path.basename(archive.namelist()[0])).read_bytes())
    done = run_cli("predict", model_file, "--data", str(folder), "-o", str(tmp_path / "s.csv"), "--backend", BACKEND)
    assert done.returncode == 2 and "cat.jpg has no numeric id" in done.stderr
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_latency_of_a_fixed_batch_onnx_marks_other_batch_sizes_unavailable(model_file, tmp_path):
    import json

    onnx = str(tmp_path / "b1.onnx")
    assert run_cli("export", "onnx", model_file, "-o", onnx, "--batch-size", "1", "--backend", BACKEND).returncode == 0
    done = run_cli(
        "latency",
        onnx,
        "--runtime",
        "onnxruntime-cpu",
        "--batch-size",
        "1,3",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--format",
        "json",
        "--backend",
        BACKEND,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["batch_size"], r["status"]) for r in rows] == [
        (1, "ok"),
        (3, "unavailable: the ONNX file takes batches of 1 only"),
    ]


RUNTIME_FAMILIES = {"keras": "Keras", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


@pytest.mark.once
def test_the_help_texts_name_exactly_the_registered_runtimes_and_graph_passes():
    import re

    from kbench.export.graph import PASSES
    from kbench.serving.runtimes import RUNTIMES

    latency = run_cli("latency", "--help")
    summary = latency.stdout.split("\n\n")[1]
    named = re.search(r"Runtimes: ([^.]+)\.", latency.stdout).group(1).split(", ")
    assert named == list(RUNTIMES)
    families = {RUNTIME_FAMILIES[name.split("-")[0]] for name in RUNTIMES}
    assert {family for family in RUNTIME_FAMILIES.values() if family in summary} == families
    export = " ".join(run_cli("export", "onnx", "--help").stdout.split())
    passes = re.search(r"kbench\.export\.graph's passes \(([^)]+)\)", export).group(1).split(", ")
    assert passes == list(PASSES)
    assert "reshape" not in export.lower()


def test_an_output_that_would_overwrite_an_input_is_refused(tmp_path, kaggle_data):
    """predict -o the test set replaced it with the CSV; export -o RUN/model.keras replaced the model."""
    import shutil

    from kbench.models.backbones import build_classifier, get_backbone

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    build_classifier(get_backbone("small_cnn"), 2, 24, "none").save(str(run_dir / "model.keras"))
    (run_dir / "config.json").write_text('{"kind": "backbone"}')
    test_zip = shutil.copy(kaggle_data["test"], tmp_path / "test.zip")
    before = {
        path: path.read_bytes() for path in (run_dir / "model.keras", run_dir / "config.json", tmp_path / "test.zip")
    }
    model = str(run_dir / "model.keras")
    for args, message in [
        (["predict", model, "--data", str(test_zip), "-o", str(test_zip)], f"would overwrite {test_zip}, an input"),
        (["predict", str(run_dir), "--data", str(test_zip), "-o", model], "would overwrite the model.keras of run"),
        (["export", "onnx", str(run_dir), "-o", str(run_dir / "config.json")], "must name an .onnx file"),
        (["export", "onnx", model, "-o", model], "must name an .onnx file"),
        (
            ["latency", str(run_dir), "--runtime", "keras-predict", "-o", str(run_dir / "config.json")],
            "config.json of run",
        ),
    ]:
        done = run_cli(*args)
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr
    assert all(path.read_bytes() == data for path, data in before.items())
    assert sorted(os.listdir(run_dir)) == ["config.json", "model.keras"]


def test_latency_stopped_by_sigterm_exits_143_and_says_where_its_rows_are(monkeypatch, tmp_path):
    import kbench
    from kbench.api.serving import LatencyRows
    from kbench.core.errors import STOP_REQUESTS

    def stopped(*args, **options):
        STOP_REQUESTS.append(signal.SIGTERM)  # what kbench's SIGTERM handler records
        return LatencyRows([], interrupted=True)

    monkeypatch.setattr(kbench, "latency", stopped)
    output = str(tmp_path / "rows.csv")
    done = run_cli("latency", "small_cnn", "-o", output)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"kbench: interrupted; the rows in {output} are those finished"


@pytest.mark.once  # click's parsing, the same under either backend
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["latency", "small_cnn", "--runtime", "keras-compiled", "--runtime", "onnxruntime-cpu"],
            "--runtime given twice; give it once (a list is comma-separated: --runtime a,b)",
        ),
        (["latency", "small_cnn", "--batch-size=1", "--batch-size", "8"], "--batch-size given twice; give it once"),
        (["export", "onnx", "m.keras", "--output=a.onnx", "-ob.onnx"], "--output and -o (one option) given twice"),
        (
            ["export", "onnx", "m.keras", "--graph-passes", "--no-graph-passes"],
            "--graph-passes and --no-graph-passes contradict each other; give one",
        ),
        (["bench", "--config", "demo", "--out", "a", "--out", "b"], "--out given twice; give it once"),
        (["launch", "--processes", "1", "--processes", "2", "--", "kbench", "backbones"], "--processes given twice"),
        (
            ["latency", "small_cnn", "--runtime", "keras-compiled,onnxruntime-cpu,keras-compiled"],
            "--runtime names keras-compiled twice; name each once",
        ),
        (["latency", "small_cnn", "--batch-size", "1,8,1"], "--batch-size names 1 twice; name each once"),
    ],
)
def test_an_option_given_twice_is_refused_before_any_work(args, message, tmp_path):
    """click keeps the last of a repeated option silently: `--runtime a --runtime b` timed b alone."""
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.once
def test_the_same_flag_twice_and_a_launched_commands_own_options_are_not_refused(tmp_path):
    from kbench.cli.main import launch
    from kbench.cli.options import _options_given

    done = run_cli("export", "onnx", "missing.keras", "--no-graph-passes", "--no-graph-passes", cwd=tmp_path)
    assert done.returncode == 2 and "given twice" not in done.stderr and "missing.keras" in done.stderr
    inner = ["--processes", "2", "kbench", "train", "--processes", "3"]  # launch's options come first only
    assert [name for name, _ in _options_given(launch.params, inner, interspersed=False)] == ["--processes"]
