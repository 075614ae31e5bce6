"""`kbench demo` (what `make demo` runs): the embedded study end to end, about three minutes on a
2-core machine, so in the heavy tier (`make test-heavy`, which CI runs), under TensorFlow only."""

import json
import os

import pytest

from conftest import BACKEND, run_cli

pytestmark = [pytest.mark.heavy, pytest.mark.once]


def test_demo_command_runs_the_demo_config_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = run_cli("demo", "--out", str(out), "--images", "120", "--backend", BACKEND, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("report.md", "results.csv", "submission.csv", "logloss_vs_latency.png", "epoch_time.png"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "data")) == ["answers.csv", "test.zip", "train.zip"]
    assert "submission (" in done.stdout and "test log loss" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == [
        "small_cnn",
        "small_cnn_40",
        "mobilenet_v2",
        "small_cnn+small_cnn_40",
        "mean-of-three",
    ]
    assert all(row["status"] == "ok" for row in results["rows"])
