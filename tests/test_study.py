import json
import os

import pytest

from conftest import BACKEND, run_cli
from kbench.report import pareto_front
from kbench.study import load_config, run_study

CONFIG = """
[study]
name = "tiny"
data = "{data}"
test_data = "{test}"
answers = "{answers}"

[train]
epochs = 3
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
epochs = 5

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
    config_path.write_text(CONFIG.format(data=kaggle_data["train"], test=kaggle_data["test"],
                                         answers=kaggle_data["answers"], missing=root / "missing.keras"))
    out = str(root / "report")
    results = run_study(load_config(str(config_path)), out, command="test", echo=lambda line: None)
    return str(config_path), out, results


def test_report_has_every_table_with_a_row_per_member(study):
    _, out, results = study
    for name in ("report.md", "results.csv", "results.json", "submission.csv", "logloss_vs_latency.png",
                 "epoch_time.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    report = open(os.path.join(out, "report.md")).read()
    for heading in ("## Time per training epoch", "## Inference time", "## Log loss", "## Ensembles",
                    "## ONNX Runtime against Keras", "## Submission"):
        assert heading in report
    for member in ("small_cnn", "small_cnn_24", "broken", "pair", "needs-broken"):
        assert f"| {member} |" in report
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


def test_pareto_front():
    assert pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)]) == [0, 1, 3]
    assert pareto_front([(1, 1), (2, 2)]) == [0]


def test_bench_command_rejects_a_missing_config(tmp_path):
    done = run_cli("bench", "--config", str(tmp_path / "nope.toml"), "--backend", BACKEND)
    assert done.returncode == 2 and "config not found" in done.stderr


@pytest.mark.skipif(BACKEND != "jax", reason="one backend is enough for the whole demo; test_study covers both")
def test_demo_command_runs_the_demo_config_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = run_cli("demo", "--out", str(out), "--images", "120", "--backend", BACKEND, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("report.md", "results.csv", "submission.csv", "logloss_vs_latency.png", "epoch_time.png"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "data")) == ["answers.csv", "test.zip", "train.zip"]
    assert "submission (" in done.stdout and "test log loss" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["small_cnn", "small_cnn_40", "mobilenet_v2",
                                                        "small_cnn+small_cnn_40", "mean-of-three"]
    assert all(row["status"] == "ok" for row in results["rows"])
