"""Rows -> text: tables, the latency rows in each format, one row per model, the Pareto front and row
labels that can be told apart."""

import csv
import io
import json

import pytest

from kbench.core.tables import (
    LATENCY_COLUMNS,
    distinct_names,
    flat_rows,
    format_table,
    latency_text,
    latency_wide,
    pareto_front,
    pareto_text,
)

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

MACHINE = {"cpu": "cpu", "cores": 2, "gpu": "none", "threads": 2, "versions": {"onnxruntime": "1"}}


def test_pareto_front():
    assert pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)]) == [0, 1, 3]
    assert pareto_front([(1, 1), (2, 2)]) == [0]


def test_tables_show_missing_values_and_thousands():
    text = format_table([{"name": "a", "params": 1234567, "ms": None}, {"name": "bb", "ms": 0.12345}])
    assert text.splitlines()[3] == "| a    | 1,234,567 | -      |"
    assert text.splitlines()[4] == "| bb   | -         | 0.1235 |"


def test_latency_details_follow_the_table_once_per_model_and_runtime():
    row = {"model": "m", "runtime": "onnxruntime-cpu", "batch_size": 1, "p50_ms": 1.0, "status": "ok"}
    rows = [{**row, "detail": "spinning on"}, {**row, "batch_size": 32, "detail": "spinning on"}]
    rows.append({**row, "runtime": "keras-predict", "detail": ""})
    rows.append({**row, "batch_size": 8, "detail": "spinning off"})  # another model of the same name
    for style in ("table", "markdown"):
        text = latency_text(rows, style, MACHINE)
        assert text.endswith("\n\n- m onnxruntime-cpu: spinning on\n- m onnxruntime-cpu: spinning off")
        assert text.count("spinning on") == 1
    assert "\n\n- " not in latency_text([rows[2]], "markdown", MACHINE)
    table = csv.DictReader(io.StringIO(latency_text(rows, "csv", MACHINE)))
    assert table.fieldnames == LATENCY_COLUMNS and [r["batch_size"] for r in table] == ["1", "32", "1", "8"]
    assert json.loads(latency_text(rows, "json", MACHINE)) == rows


def test_one_row_per_model_with_steady_epochs_and_the_front_in_words():
    def timing(runtime, ms, status="ok"):
        return {"runtime": runtime, "batch_size": 1, "p50_ms": ms, "status": status}

    a = {"name": "a", "kind": "backbone", "status": "ok", "epoch_seconds": [9.0, 2.0, 4.0], "val_log_loss": 0.5}
    a["latency"] = [timing("onnxruntime-cpu", 1.0), timing("onnxruntime-cuda", None, "unavailable: no GPU")]
    b = {"name": "b", "kind": "backbone", "status": "ok", "val_log_loss": 0.3}
    b["latency"] = [timing("onnxruntime-cpu", 2.0)]
    results = {"rows": [a, b, {"name": "c", "kind": "ensemble", "status": "failed: x"}]}
    flat = flat_rows(results)
    assert [row["epoch_seconds"] for row in flat] == [3.0, None, None]  # the first epoch compiles
    assert latency_wide(flat) == [
        {"name": "a", "onnxruntime-cpu b1": 1.0, "onnxruntime-cuda b1": None},
        {"name": "b", "onnxruntime-cpu b1": 2.0, "onnxruntime-cuda b1": None},
        {"name": "c", "onnxruntime-cpu b1": None, "onnxruntime-cuda b1": None},
    ]
    assert pareto_text(flat).startswith("On the front: a, b (") and "onnxruntime-cpu batch 1" in pareto_text(flat)
    assert pareto_text(flat_rows({"rows": results["rows"][2:]})) is None


def test_rows_of_models_with_one_name_are_labelled_by_their_paths():
    assert distinct_names(["m", "m", "b0"], ["runs/a/m/", "runs/b/./m", "runs/b0"]) == ["runs/a/m", "runs/b/m", "b0"]
    assert distinct_names(["m"], ["runs/a/m"]) == ["m"]
