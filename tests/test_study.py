import json
import os
import socket

import pytest

from kbench.study.config import load_config
from kbench.study.study import run_study

from conftest import BACKEND, MINIMAL_STUDY, run_cli, write_study

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

CONFIG = """
[study]
name = "tiny"
data = "{data}"
test_data = "{test}"
answers = "{answers}"

[train]
epochs = 2
batch_size = 24
image_size = 32
lr = 2e-3
weights = "none"
val_split = 0.2

[[backbones]]
backbone = "small_cnn"

[[backbones]]
name = "small_cnn_24"
backbone = "small_cnn"
image_size = 24

[[backbones]]
name = "broken"
backbone = "small_cnn"
weights = "{missing}"

[[ensembles]]
name = "pair"
members = ["small_cnn", "small_cnn_24"]
epochs = 3

[[ensembles]]
name = "needs-broken"
members = ["small_cnn", "broken"]

[latency]
runtimes = ["keras-compiled", "onnxruntime-cpu"]
batch_sizes = [1]
runs = 3
warmup = 1

[submission]
tta = "flip"
clip = 0.01
"""


@pytest.fixture(scope="module")
def study(kaggle_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    config_path = root / "tiny.toml"
    config_path.write_text(
        CONFIG.format(
            data=kaggle_data["train"],
            test=kaggle_data["test"],
            answers=kaggle_data["answers"],
            missing=root / "missing.keras",
        )
    )
    out = str(root / "report")
    results = run_study(load_config(str(config_path)), out, command="test", echo=lambda line: None)
    return str(config_path), out, results


def test_report_has_every_table_with_a_row_per_member(study):
    _, out, results = study
    for name in (
        "report.md",
        "results.csv",
        "results.json",
        "submission.csv",
        "logloss_vs_latency.png",
        "epoch_time.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    report = open(os.path.join(out, "report.md")).read()
    for heading in (
        "## Time per training epoch",
        "## Inference time",
        "## Log loss",
        "## Ensembles",
        "## ONNX Runtime against Keras",
        "## Submission",
    ):
        assert heading in report
    for member in ("small_cnn", "small_cnn_24", "pair"):  # names link to their folders
        kind = "ensembles" if member == "pair" else "runs"
        assert f"| [{member}]({kind}/{member}/) |" in report
    for member in ("broken", "needs-broken"):  # failed before a folder was made: plain names
        assert f"| {member} |" in report
    assert "val_loss_by_epoch.png" in os.listdir(out) and "On the front: " in report
    assert sorted(os.listdir(os.path.join(out, "onnx"))) == ["pair.onnx", "small_cnn.onnx", "small_cnn_24.onnx"]
    assert "test_log_loss" in results["submission"]
    rows = open(os.path.join(out, "results.csv")).read().splitlines()
    assert len(rows) == 6 and "onnxruntime-cpu_b1_p50_ms" in rows[0]


def test_failed_member_is_marked_and_the_study_goes_on(study):
    _, _, results = study
    status = {row["name"]: row["status"] for row in results["rows"]}
    assert status["small_cnn"] == "ok" and status["pair"] == "ok"
    assert status["broken"].startswith("failed: ") and "weights file not found" in status["broken"]
    assert status["needs-broken"] == "failed: member(s) broken failed"


def test_rerun_resumes_without_redoing_finished_members(study):
    config_path, out, _ = study
    model = os.path.join(out, "runs", "small_cnn", "model.keras")
    ensemble = os.path.join(out, "ensembles", "pair", "model.keras")
    before = os.path.getmtime(model), os.path.getmtime(ensemble)
    lines = []
    results = run_study(load_config(config_path), out, echo=lines.append)
    assert (os.path.getmtime(model), os.path.getmtime(ensemble)) == before
    assert {row["name"]: row["status"] for row in results["rows"]}["small_cnn"] == "ok"


def test_bench_command_rejects_a_missing_config(tmp_path):
    done = run_cli("bench", "--config", str(tmp_path / "nope.toml"), "--backend", BACKEND)
    assert done.returncode == 2 and "config not found" in done.stderr


def test_failures_exit_1_and_the_report_is_still_written(study, tmp_path):
    config_path, out, results = study
    assert results["failed"] == 2  # "broken" and "needs-broken"
    done = run_cli("bench", "--config", config_path, "--out", out, "--backend", BACKEND, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "2 stage(s) failed" in done.stdout and os.path.isfile(os.path.join(out, "report.md"))


def test_out_folder_of_another_study_is_refused(study, kaggle_data, tmp_path):
    _, out, _ = study
    path = write_study(tmp_path, MINIMAL_STUDY, data=kaggle_data["train"])
    done = run_cli("bench", "--config", path, "--out", out, "--backend", BACKEND)
    assert done.returncode == 2 and "holds the results of study 'tiny'" in done.stderr


def test_the_ray_executor_gives_the_sequential_results_and_keeps_member_logs(study, tmp_path):
    config_path, _, sequential = study
    out = tmp_path / "ray"
    done = run_cli("bench", "--config", config_path, "--out", str(out), "--executor", "ray", timeout=240, process=True)
    assert done.returncode == 1, done.stderr[-2000:]  # "broken" fails, as in the sequential run
    assert "[3/3]" in done.stderr and "ray: 3 backbone entries as tasks on 1 node(s)" in done.stderr
    on_ray = json.load(open(out / "results.json"))
    assert [(r["name"], r["status"]) for r in on_ray["rows"]] == [(r["name"], r["status"]) for r in sequential["rows"]]
    for ray_row, row in zip(on_ray["rows"], sequential["rows"]):
        if row["status"] == "ok":  # a seeded tiny model: the same numbers up to run-to-run noise
            assert ray_row["val_log_loss"] == pytest.approx(row["val_log_loss"], rel=1e-2), row["name"]
            assert ray_row.get("epochs_trained") == row.get("epochs_trained"), row["name"]
    assert on_ray["submission"]["model"] == sequential["submission"]["model"]
    assert sorted(os.listdir(out / "logs")) == ["broken.log", "small_cnn.log", "small_cnn_24.log"]
    assert not [name for name in os.listdir(out) if name.startswith(".kbench-probe")]
    ok = [row for row in on_ray["rows"] if row["status"] == "ok" and row["kind"] == "backbone"]
    assert ok and all(row["latency"] and row["host"] for row in ok)  # timed afterwards, by this process
    assert "timing" in done.stderr


def test_the_ray_executor_refuses_an_unreachable_cluster_before_anything(study, tmp_path):
    config_path, _, _ = study
    out = tmp_path / "nowhere"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: nothing answers there
        done = run_cli("bench", "--config", config_path, "--out", str(out), "--executor", "ray",
                       "--address", f"127.0.0.1:{port}", timeout=60, process=True)  # fmt: skip
    assert done.returncode == 2 and "can't reach the Ray cluster at 127.0.0.1" in done.stderr
    assert not out.exists()


def test_address_auto_is_resolved_and_refused_before_anything_is_written(study, tmp_path, monkeypatch):
    config_path, _, _ = study
    out = tmp_path / "st" / "auto"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed.getsockname()[1]}")  # what auto finds first
        done = run_cli("bench", "--config", config_path, "--out", str(out), "--executor", "ray", "--address", "auto")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "can't reach the Ray cluster at " in lines[0], done.stderr
    assert not (tmp_path / "st").exists()


def test_demo_refuses_an_out_it_cannot_own_before_writing_an_image(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"kind": "backbone"}')
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"name": "seed"}')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for out, extra, message in [
        ("", [], "--out is empty"),
        (str(run_dir), [], "is a run folder"),
        (str(other), ["--fresh"], "holds the results of study 'seed', not the demo"),
        (
            str(mine),
            ["--fresh"],
            "--fresh would remove --out " + str(mine) + ", which holds more than a demo (notes.txt)",
        ),
        (str(tmp_path / "x"), ["--images", "5"], "--images must be a whole number of at least 20"),
    ]:
        done = run_cli("demo", "--out", out, *extra)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert sorted(os.listdir(tmp_path)) == ["mine", "other", "run"] and os.listdir(mine) == ["notes.txt"]
    assert sorted(os.listdir(run_dir)) == ["config.json"] and sorted(os.listdir(other)) == ["results.json"]
