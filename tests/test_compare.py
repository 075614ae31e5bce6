"""kbench compare: a study's report for runs and ensembles trained outside a study (two small_cnn
runs trained by hand, the first timed as a study leaves it), and the curves each run folder holds."""

import json
import logging
import os
import re

import pytest
from test_report import section, timing

from kbench.core.errors import KbenchError

from conftest import run_cli
from test_plots import png_size

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


@pytest.fixture(scope="module")
def two_runs(small_cnn_run, tmp_path_factory):
    """Two small_cnn runs trained by hand (no study); the first one timed, as a study leaves it."""
    import shutil

    root = tmp_path_factory.mktemp("runs")
    paths = [
        str(shutil.copytree(small_cnn_run(image_size=24, seed=seed), root / name))
        for name, seed in (("first", 0), ("second", 1))
    ]
    rows = [timing("onnxruntime-cpu", 1, 0.25), timing("keras-compiled", 1, 0.9)]
    with open(os.path.join(paths[0], "latency.json"), "w") as handle:
        json.dump({"key": {}, "rows": rows}, handle)
    return root, paths


def test_every_run_folder_has_its_curves(two_runs):
    _, paths = two_runs
    for path in paths:
        width, height = png_size(os.path.join(path, "curves.png"))
        assert width > 400 and height > 300


def test_compare_reports_runs_trained_outside_a_study(two_runs, tmp_path, caplog):
    from kbench.report.compare import compare_runs

    _, (first, second) = two_runs
    out = str(tmp_path / "compare")
    with caplog.at_level(logging.WARNING, logger="kbench"):
        results = compare_runs([first, second], out, command="test")
    # seeds 0 and 1: two validation splits, said in one line (#36.9)
    assert f"{first} and {second} were validated on different images" in caplog.text
    assert [row["name"] for row in results["rows"]] == ["first", "second"]
    assert sorted(os.listdir(out)) == [
        "epoch_time.png",
        "latency.csv",
        "logloss_vs_latency.png",
        "report.md",
        "results.csv",
        "results.json",
        "val_loss_by_epoch.png",
    ]
    report = open(os.path.join(out, "report.md")).read()
    assert report.startswith("# kbench comparison: 2 run(s)")
    link = os.path.relpath(first, out)
    assert f"| [first]({link}/) | 0.25 | 0.9 |" in section(report, "Inference time")
    assert "- second: not timed" in report and "On the front: first (" in report
    metrics = json.load(open(os.path.join(second, "metrics.json")))
    assert f"{metrics['val_log_loss']:.4g}" in section(report, "Log loss")
    for target in re.findall(r"\]\(([^)]+)\)", report):
        assert os.path.exists(os.path.join(out, target)), target
    again = compare_runs([second], out)  # a comparison folder may be rewritten; stale plots go
    assert len(again["rows"]) == 1 and not os.path.exists(os.path.join(out, "logloss_vs_latency.png"))


def test_compare_command_prints_the_tables_and_refuses_bad_input(two_runs, tmp_path):
    root, (first, second) = two_runs
    out = str(tmp_path / "cli")
    done = run_cli("compare", first, second, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "Inference time (p50 ms" in done.stdout and "On the front: first" in done.stdout
    assert "ONNX files" not in done.stdout and os.path.isfile(os.path.join(out, "report.md"))
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.json").write_text(json.dumps({"name": "seed", "rows": []}))
    for args, message in (
        ([str(not_a_run)], "is not a finished kbench run (no model.keras)"),
        ([first, first + "/"], "is given twice"),
        ([first, "--out", os.path.join(first, "report")], "is inside the run folder"),
        ([first, "--out", second], "is a run folder"),
        ([first, "--out", str(study)], "holds a study's report"),
    ):
        refused = run_cli("compare", *args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
        assert refused.stderr.count("\n") == 1
    assert os.listdir(study) == ["results.json"] and "report.md" not in os.listdir(second)  # nothing written


def test_compare_library_refuses_nothing_to_compare(tmp_path):
    from kbench.report.compare import compare_runs

    with pytest.raises(KbenchError, match="at least one"):
        compare_runs([], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
