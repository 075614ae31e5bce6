"""Rows (lists of flat dicts) -> text: ASCII and markdown tables, the latency rows as a table, CSV or
JSON, a study's results as one flat or wide row per model, the Pareto front in words, and row labels
that can be told apart.

Of kbench it imports only ``kbench.core.timing`` (the busy-machine threshold, inside a function): the
timing loop, the plots, the study's report and the CLI all lay their rows out with these functions.
"""

from __future__ import annotations

import json
import os
import statistics

LATENCY_COLUMNS = [  # one timing row of kbench.serving.latency, in the order latency.csv and the tables show it
    "model",
    "runtime",
    "backend",
    "device",
    "batch_size",
    "runs",
    "warmup",
    "min_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "std_ms",
    "images_per_second",
    "other_cpu_cores",
    "busy",
    "parity",
    "status",
    "detail",
]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None, style: str = "ascii") -> str:
    """Render rows as an ASCII grid (the reference study's style) or a markdown table.

    >>> print(format_table([{"model": "a", "ms": 1.5}], style="markdown"))
    | model | ms |
    |---|---|
    | a | 1.5 |
    """
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    if style == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    rule = "+" + "+".join("-" * (width + 2) for width in widths) + "+"

    def line(values):
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths)) + " |"

    return "\n".join([rule, line(columns), rule, *(line(values) for values in cells), rule])


def distinct_names(names: list[str], paths: list[str]) -> list[str]:
    """Row labels that can be told apart: each name, or where two share one, the paths they came
    from as given (normalised). ``kbench compare`` and ``kbench latency`` label their rows so.

    >>> distinct_names(["m", "m", "b0"], ["runs/a/m/", "runs/b/m", "runs/b0"])
    ['runs/a/m', 'runs/b/m', 'b0']
    """
    return [name if names.count(name) == 1 else os.path.normpath(path) for name, path in zip(names, paths)]


def latency_text(rows: list[dict], output_format: str, machine: dict) -> str:
    """Latency rows as JSON (a list of rows), CSV, or a table / markdown headed by the machine."""
    if output_format == "json":
        return json.dumps(rows, indent=2)
    if output_format == "csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, LATENCY_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    header = (
        f"machine: {machine['cpu']}, {machine['cores']} cores; GPU: {machine['gpu']}; "
        f"ONNX Runtime threads: {machine['threads']}; {versions}"
    )
    shown = [c for c in LATENCY_COLUMNS if c not in ("runs", "warmup", "other_cpu_cores", "busy", "detail")]
    style = "markdown" if output_format == "markdown" else "ascii"
    return header + "\n\n" + format_table(rows, shown, style=style) + _busy_text(rows) + _details_text(rows)


def _busy_text(rows: list[dict]) -> str:
    """A warning under the table when other processes were busy on the cores timed on (rows' ``busy``,
    from ``kbench.core.timing.watch_load``); "" when none was."""
    from kbench.core.timing import BUSY_CORES

    busy = [row for row in rows if row.get("busy")]
    if not busy:
        return ""
    timed = [row for row in rows if row.get("status") == "ok"]
    most = max(row["other_cpu_cores"] for row in busy)
    return (
        f"\n\nwarning: the machine was busy while {len(busy)} of {len(timed)} rows were timed (other "
        f"processes used up to {most:.2f} cores of those timed on; busy is more than {BUSY_CORES:g}): "
        "those times may be slow and noisy; time them again on a quiet machine"
    )


def _details_text(rows: list[dict]) -> str:
    """Each distinct (model, runtime, detail) once, as a list under the table (a column would be too
    wide): the settings a runtime ran with and what it chose by measuring; "" when no row has one."""
    lines = dict.fromkeys(f"- {row['model']} {row['runtime']}: {row['detail']}" for row in rows if row.get("detail"))
    return "\n\n" + "\n".join(lines) if lines else ""


def _steady_epoch_seconds(row: dict) -> float | None:
    seconds = row.get("epoch_seconds") or []
    compiled = row.get("epochs_with_compilation", [1])  # those epochs include compilation
    steady = [s for epoch, s in enumerate(seconds, 1) if epoch not in compiled] or seconds
    return statistics.median(steady) if steady else None


def flat_rows(results: dict) -> list[dict]:
    """One flat row per model: training, quality and each runtime's median latency."""
    flat = []
    for row in results["rows"]:
        item = {
            "name": row["name"],
            "kind": row["kind"],
            "backbone": row.get("backbone"),
            "status": row["status"],
            "params": row.get("params"),
            "image_size": row.get("image_size"),
            "epochs": row.get("epochs"),
            "batch_size": row.get("batch_size"),
            "epoch_seconds": _steady_epoch_seconds(row),
            "train_images_per_second": row.get("train_images_per_second"),
            "feature_seconds": row.get("feature_seconds"),
            "head_seconds": row.get("head_seconds"),
            "val_log_loss": row.get("val_log_loss"),
            "val_accuracy": row.get("val_accuracy"),
        }
        for timing in row.get("latency", []):
            key = f"{timing['runtime']}_b{timing['batch_size']}_p50_ms"
            item[key] = timing.get("p50_ms") if timing["status"] == "ok" else None
        item["folder"] = row.get("folder")  # the model's run folder, relative to the report's
        flat.append(item)
    return flat


def latency_wide(flat: list[dict]) -> list[dict]:
    """One row per model, one column per runtime and batch size (``onnxruntime-cpu b1``): p50 ms."""
    columns = list(dict.fromkeys(c for row in flat for c in row if c.endswith("_p50_ms")))
    return [
        {"name": row["name"], **{c.replace("_p50_ms", "").replace("_b", " b"): row.get(c) for c in columns}}
        for row in flat
    ]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better for both).

    >>> pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)])
    [0, 1, 3]
    """
    front = []
    for i, (x, y) in enumerate(points):
        if not any((a <= x and b <= y) and (a < x or b < y) for j, (a, b) in enumerate(points) if j != i):
            front.append(i)
    return front


def _latency_key(flat: list[dict]) -> str | None:
    """The runtime column that the quality/latency trade-off is plotted against."""
    for runtime in ("onnxruntime-cuda", "onnxruntime-cpu", "openvino-cpu", "keras-compiled", "keras-predict"):
        key = f"{runtime}_b1_p50_ms"
        if any(row.get(key) is not None for row in flat):
            return key
    return None


def pareto_members(flat: list[dict]) -> tuple[str | None, list[dict], list[int]]:
    """(latency column, the models scored on it and on validation log loss, indices of the front)."""
    key = _latency_key(flat)
    scored = [row for row in flat if key and row.get(key) is not None and row.get("val_log_loss") is not None]
    return key, scored, pareto_front([(row[key], row["val_log_loss"]) for row in scored])


def latency_label(key: str) -> str:
    """A flat row's latency column in words: ``onnxruntime-cpu_b1_p50_ms`` -> ``onnxruntime-cpu batch 1``."""
    return key.replace("_p50_ms", "").replace("_b1", " batch 1")


def pareto_text(flat: list[dict]) -> str | None:
    """The Pareto front in words: ``On the front: a, b (...)``; None without timed, scored models."""
    key, scored, front = pareto_members(flat)
    if not scored:
        return None
    names = [scored[i]["name"] for i in sorted(front, key=lambda i: scored[i][key])]
    return (
        f"On the front: {', '.join(names)} (no other model has both a lower validation log loss and a "
        f"lower {latency_label(key)} p50 latency; fastest first)."
    )
