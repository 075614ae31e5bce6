"""What a reader sees in a study's report folder: one-row-per-model timing tables, the Pareto front in
words, links to run folders and their curves, and `kbench compare` on runs trained outside a study."""

import csv
import os
import re

import pytest

from kbench.cli.summaries import study_summary
from kbench.core.tables import flat_rows
from kbench.report.report import markdown_report, write_report
from kbench.training.curves import write_curves

from test_plots import history, png_size

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def timing(runtime: str, batch: int, p50, status="ok") -> dict:
    return {
        "runtime": runtime,
        "backend": "jax",
        "device": "cpu",
        "batch_size": batch,
        "runs": 3,
        "warmup": 1,
        "p50_ms": p50,
        "p90_ms": None if p50 is None else p50 * 1.2,
        "images_per_second": None if p50 is None else 1000 * batch / p50,
        "status": status,
    }


def study_results(tmp_path) -> tuple[dict, str]:
    """Three models (a fast and worse, b slower and better, c slow and worse): the front is a, b."""
    out = tmp_path / "report"
    rows = []
    for name, ms, loss in (("a", 1.0, 0.5), ("b", 2.0, 0.3), ("c", 3.0, 0.4)):
        folder = out / "runs" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
        write_curves(history(3), str(folder / "curves.png"))
        with open(folder / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(history(3)[0]))
            writer.writeheader()
            writer.writerows(history(3))
        latency = [
            timing(runtime, batch, ms * batch * factor)
            for runtime, factor in (("keras-compiled", 3.0), ("onnxruntime-cpu", 1.0))
            for batch in (1, 8)
        ]
        latency += [timing("onnxruntime-cuda", batch, None, "unavailable: no CUDA provider") for batch in (1, 8)]
        rows.append(
            {
                "name": name,
                "kind": "backbone",
                "backbone": "small_cnn",
                "status": "ok",
                "params": 10,
                "epoch_seconds": [2.0, 1.0, 1.0],
                "val_log_loss": loss,
                "val_accuracy": 0.9,
                "latency": latency,
                "folder": os.path.join("runs", name),
            }
        )
    rows.append(
        {
            "name": "broken",
            "kind": "backbone",
            "backbone": "small_cnn",
            "status": "failed: bad weights",
            "folder": os.path.join("runs", "broken"),
        }
    )  # never created
    return {"name": "t", "backend": "jax", "command": "test", "rows": rows}, str(out)


def section(report: str, heading: str) -> str:
    return report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_report_has_a_wide_timing_table_links_and_the_front_in_words(tmp_path):
    results, out = study_results(tmp_path)
    paths = write_report(results, out)
    report = open(paths["report"]).read()
    inference = section(report, "Inference time")
    header = [line for line in inference.splitlines() if line.startswith("| name")]
    assert header == [
        "| name | keras-compiled b1 | keras-compiled b8 | onnxruntime-cpu b1 | onnxruntime-cpu b8 | "
        "onnxruntime-cuda b1 | onnxruntime-cuda b8 |"
    ]
    assert "| [b](runs/b/) | 6 | 48 | 2 | 16 | - | - |" in inference  # one row per model, p50 ms
    assert "| broken | - |" in inference  # no folder: no link
    assert "onnxruntime-cuda (a, b, c): unavailable: no CUDA provider" in inference
    assert "- broken: not timed" in inference and "p90" in inference  # p90 only in the pointer to latency.csv
    with open(paths["latency"]) as handle:
        long = list(csv.DictReader(handle))
    assert len(long) == 18 and {row["model"] for row in long} == {"a", "b", "c"}
    assert {"p50_ms", "p90_ms", "images_per_second", "status"} <= set(long[0])
    with open(paths["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4  # results.csv: still one row per model
    assert "On the front: a, b (" in section(report, "Quality against serving cost")
    assert "On the front: a, b (" in study_summary(results, out)
    for target in re.findall(r"\]\(([^)]+)\)", report):  # every relative link resolves
        assert os.path.exists(os.path.join(out, target)), target
    assert "[curves](runs/a/curves.png)" in section(report, "Log loss")
    for name in ("logloss_vs_latency.png", "epoch_time.png", "val_loss_by_epoch.png"):
        assert png_size(os.path.join(out, name))[0] > 300 and f"]({name})" in report


def test_without_a_folder_the_report_has_plain_names_and_no_front_without_timings(tmp_path):
    results, _ = study_results(tmp_path)
    for row in results["rows"]:
        row["latency"] = []
    report = markdown_report(results, flat_rows(results))
    assert "| a |" in report and "](runs/" not in report
    assert "On the front" not in report and "No model was timed." in report


def test_report_names_the_settings_each_runtime_ran_with_and_flags_a_change(tmp_path):
    results, out = study_results(tmp_path)
    on = "intra-op threads ONNX Runtime's default, spinning on (chosen by measuring at batch 1: ...)"
    for row in results["rows"][:3]:
        for timing in row["latency"]:
            timing["detail"] = {"keras-compiled": "tf.function (chosen by measuring: ...)"}.get(timing["runtime"], on)
            if timing["runtime"] == "onnxruntime-cuda":
                timing["detail"] = ""
    inference = section(open(write_report(results, out)["report"]).read(), "Inference time")
    assert "- keras-compiled (a, b, c): tf.function\n" in inference
    assert "- onnxruntime-cpu (a, b, c): intra-op threads ONNX Runtime's default, spinning on\n" in inference
    assert "different settings for different models" not in inference
    for timing in results["rows"][2]["latency"]:
        if timing["runtime"] == "onnxruntime-cpu":
            timing["detail"] = "intra-op threads 2 (physical cores), spinning off (chosen by measuring: ...)"
    inference = section(open(write_report(results, out)["report"]).read(), "Inference time")
    assert "- **onnxruntime-cpu** (a, b): intra-op threads ONNX Runtime's default, spinning on\n" in inference
    assert "- **onnxruntime-cpu** (c): intra-op threads 2 (physical cores), spinning off\n" in inference
    assert "**A runtime ran with different settings for different models**" in inference


def test_entries_trained_side_by_side_are_named_under_the_epoch_table(tmp_path):
    """Ray entries that shared a node (trained_beside) took their epoch times on a shared machine:
    report.md says so where the epoch times are; a study trained in turn says nothing."""
    results, out = study_results(tmp_path)
    assert "side by side" not in markdown_report(results, flat_rows(results), out)
    results["rows"][0].update(trained_beside=["b", "c"], host="node-1")
    results["rows"][1].update(trained_beside=["a"], host="node-1")
    epochs = section(markdown_report(results, flat_rows(results), out), "Time per training epoch")
    assert "**Trained side by side on one node**: a beside b, c on node-1; b beside a on node-1." in epochs
    assert "--executor sequential" in epochs
