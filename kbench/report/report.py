"""The study's report folder: report.md (the reference study's tables, the plots, the Pareto front in
words, ensembles, ONNX Runtime against Keras, the submission), results.json, results.csv (one row per
model), latency.csv (one row per timing) and the plots.

Written by the study and by ``kbench compare``; training and serving code never import this (a run's
own curves come from kbench.report.plots).
"""

from __future__ import annotations

import os

from kbench.core import files
from kbench.core.errors import KbenchError
from kbench.core.tables import LATENCY_COLUMNS, flat_rows, format_table, latency_wide, pareto_text
from kbench.report.plots import EPOCH_PLOT, LOGLOSS_PLOT, PLOTS, VAL_LOSS_PLOT, write_plots

RESULTS_JSON, RESULTS_CSV, REPORT_MD, LATENCY_CSV = "results.json", "results.csv", "report.md", "latency.csv"


def _linked(flat: list[dict], out_dir: str | None) -> list[dict]:
    """Rows whose name links to the model's run folder (relative to report.md), when it exists."""
    from urllib.parse import quote

    linked = []
    for row in flat:
        folder = row.get("folder")
        if folder and out_dir is not None and os.path.isdir(os.path.join(out_dir, folder)):
            row = {**row, "name": f"[{row['name']}]({quote(folder.replace(os.sep, '/'))}/)"}
        linked.append(row)
    return linked


def _file_links(row: dict, out_dir: str | None) -> str:
    """Links to what a run folder holds that a reader opens: its curves, history, metrics, config."""
    from urllib.parse import quote

    from kbench.training.runs import CONFIG, CURVES, HISTORY, METRICS

    folder = row.get("folder")
    if not folder or out_dir is None:
        return "-"
    names = [name for name in (CURVES, HISTORY, METRICS, CONFIG) if os.path.isfile(os.path.join(out_dir, folder, name))]
    return (
        " · ".join(f"[{os.path.splitext(name)[0]}]({quote(folder.replace(os.sep, '/'))}/{name})" for name in names)
        or "-"
    )


def _status_notes(results: dict) -> list[str]:
    """Why cells of the wide table are empty: each runtime's non-ok status, once, with its models."""
    notes: dict[tuple[str, str], list[str]] = {}
    for row in results["rows"]:
        for timing in row.get("latency", []):
            if timing.get("status", "ok") != "ok":
                models = notes.setdefault((timing["runtime"], timing["status"]), [])
                if row["name"] not in models:
                    models.append(row["name"])
    lines = [f"- {runtime} ({', '.join(models)}): {status}" for (runtime, status), models in notes.items()]
    untimed = [row["name"] for row in results["rows"] if not row.get("latency")]
    if untimed:
        lines.append(f"- {', '.join(untimed)}: not timed")
    return lines


def _settings_notes(results: dict) -> list[str]:
    """Each runtime's settings (its timing rows' detail without the measurements that chose them) with
    the models that ran with them; bold where one runtime has several."""
    found: dict[str, dict[str, list[str]]] = {}
    for row in results["rows"]:
        for timing in row.get("latency", []):
            if timing.get("status", "ok") == "ok" and timing.get("detail"):
                settings = timing["detail"].split(" (chosen by measuring")[0]
                models = found.setdefault(timing["runtime"], {}).setdefault(settings, [])
                if row["name"] not in models:
                    models.append(row["name"])
    lines = []
    for runtime, by_settings in found.items():
        mark = "**" if len(by_settings) > 1 else ""
        for settings, models in by_settings.items():
            lines.append(f"- {mark}{runtime}{mark} ({', '.join(models)}): {settings}")
    return lines


def _busy_note(results: dict) -> list[str]:
    """report.md's warning when other processes were busy while some rows were timed; [] when none."""
    from kbench.core.timing import BUSY_CORES

    busy = [
        f"{row['name']} {timing['runtime']} b{timing['batch_size']}"
        for row in results["rows"]
        for timing in row.get("latency", [])
        if timing.get("busy")
    ]
    if not busy:
        return []
    return [
        f"**The machine was busy while timing** {', '.join(busy)} (other processes used more than "
        f"{BUSY_CORES:g} of a core of those timed on): those times may be slow; time them again on a quiet "
        "machine.",
        "",
    ]


def _header(results: dict) -> list[str]:
    """report.md's title, the machine (or where each number came from) and the command."""
    machine = results.get("machine")
    title = "comparison" if results.get("kind") == "comparison" else "study"
    parts = [f"# kbench {title}: {results['name']}", ""]
    if machine:
        versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
        parts += [
            f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, GPU: "
            f"{machine.get('gpu', '?')}; backend {results['backend']}; {versions}.",
            "",
        ]
    else:
        parts += [
            f"Backend(s): {results.get('backend') or '?'}. Each number is from where its run was trained "
            "and timed (its metrics.json and latency.json).",
            "",
        ]
    return parts + [f"Command: `{results.get('command', '')}`", ""]


def _shared_training_note(results: dict) -> list[str]:
    """report.md's warning under the epoch table when entries trained side by side on one Ray node
    (``trained_beside``): their epoch times were taken on a shared machine; [] when none did."""
    shared = [
        f"{row['name']} beside {', '.join(row['trained_beside'])}" + (f" on {row['host']}" if row.get("host") else "")
        for row in results["rows"]
        if row.get("trained_beside")
    ]
    if not shared:
        return []
    return [
        f"**Trained side by side on one node**: {'; '.join(shared)}. Their epoch times were taken while "
        "they shared it and may be slower than each alone; to compare training costs, train them in turn "
        "(`--executor sequential`).",
        "",
    ]


def _epoch_section(backbones: list[dict], plots: dict) -> list[str]:
    """The reference study's first table: time per training epoch, then its plot."""
    columns = [
        "name",
        "backbone",
        "status",
        "params",
        "image_size",
        "batch_size",
        "epochs",
        "epoch_seconds",
        "train_images_per_second",
    ]
    parts = ["## Time per training epoch", "", format_table(backbones, columns, style="markdown"), ""]
    if plots[EPOCH_PLOT]:
        parts += [f"![seconds per training epoch]({EPOCH_PLOT})", ""]
    return parts


def _latency_section(results: dict, linked: list[dict]) -> list[str]:
    """The inference table (one row per model), why cells are empty, each runtime's settings, the
    busy-machine warning and the link to every timing."""
    wide = latency_wide(linked)
    parts = [
        "## Inference time",
        "",
        "p50 ms (median of individually timed runs after warm-up); bN = batch size N.",
        "",
    ]
    if not any(len(row) > 1 for row in wide):
        return parts + ["No model was timed.", ""]
    notes = _status_notes(results)
    parts += [format_table(wide, style="markdown"), ""]
    parts += ["Empty cells:", "", *notes, ""] if notes else []
    settings = _settings_notes(results)
    if settings:
        parts += ["Settings each runtime ran with (its detail, without the timings it chose them by):", ""]
        parts += [*settings, ""]
        if any(line.startswith("- **") for line in settings):
            parts += [
                "**A runtime ran with different settings for different models** (it chooses by measuring, "
                "and the machine's load changed during the study): compare those models' times with care.",
                "",
            ]
    parts += _busy_note(results)
    return parts + [
        f"Every timing (p50, p90, images/s, status), one row per model, runtime and batch size: "
        f"[{LATENCY_CSV}]({LATENCY_CSV}).",
        "",
    ]


def _quality_sections(linked: list[dict], flat: list[dict], out_dir: str | None, plots: dict) -> list[str]:
    """The log-loss table, the Pareto front in words with its plot, and the training curves."""
    by_loss = sorted(linked, key=lambda r: (r["val_log_loss"] is None, r["val_log_loss"] or 0))
    parts = [
        "## Log loss",
        "",
        format_table(
            [{**row, "files": _file_links(row, out_dir)} for row in by_loss],
            ["name", "kind", "status", "val_log_loss", "val_accuracy", "files"],
            style="markdown",
        ),
        "",
    ]
    front = pareto_text(flat)
    if front:
        parts += ["## Quality against serving cost", "", front, ""]
        if plots[LOGLOSS_PLOT]:
            parts += [f"![validation log loss against latency]({LOGLOSS_PLOT})", ""]
    if plots[VAL_LOSS_PLOT]:
        parts += [
            "## Training curves",
            "",
            "Validation log loss per epoch of every trained model; each run's "
            "own curves (loss, accuracy, learning rate) are its curves.png, linked above.",
            "",
            f"![validation log loss per epoch]({VAL_LOSS_PLOT})",
            "",
        ]
    return parts


def _ensembles_section(ensembles: list[dict]) -> list[str]:
    if not ensembles:
        return []
    columns = ["name", "backbone", "status", "val_log_loss", "val_accuracy", "feature_seconds", "head_seconds"]
    return ["## Ensembles", "", format_table(ensembles, columns, style="markdown"), ""]


def _onnx_against_keras(flat: list[dict], linked: list[dict]) -> list[str]:
    """Keras compiled against ONNX Runtime on the CPU at batch 1, for the models timed on both."""
    comparison = []
    for row, shown in zip(flat, linked):
        keras_ms, onnx_ms = row.get("keras-compiled_b1_p50_ms"), row.get("onnxruntime-cpu_b1_p50_ms")
        if keras_ms and onnx_ms:
            comparison.append(
                {
                    "name": shown["name"],
                    "keras-compiled p50 ms": keras_ms,
                    "onnxruntime-cpu p50 ms": onnx_ms,
                    "speed-up": keras_ms / onnx_ms,
                }
            )
    if not comparison:
        return []
    return ["## ONNX Runtime against Keras (batch 1)", "", format_table(comparison, style="markdown"), ""]


def _submission_section(submission: dict | None) -> list[str]:
    if not submission:
        return []
    if submission.get("status", "ok") != "ok":
        return ["## Submission", "", f"From {submission['model']}: {submission['status']}.", ""]
    score = (
        f"; test log loss {submission['test_log_loss']:.4f}, accuracy {submission['test_accuracy']:.3f}"
        if "test_log_loss" in submission
        else ""
    )
    return [
        "## Submission",
        "",
        f"`{submission['path']}` from {submission['model']}: "
        f"{submission['predicted']} of {submission['images']} test images{score}.",
        "",
    ]


def markdown_report(results: dict, flat: list[dict], out_dir: str | None = None) -> str:
    """report.md: the reference study's three tables (time per epoch, inference time as one row per
    model, log loss), the plots with the Pareto front named, then ensembles, ONNX Runtime against
    Keras, the submission, the machine and the command. With ``out_dir`` (where report.md goes),
    model names link to their run folders."""
    linked = _linked(flat, out_dir)
    plots = {name: out_dir is not None and os.path.isfile(os.path.join(out_dir, name)) for name in PLOTS}
    parts = _header(results)
    parts += _epoch_section([row for row in linked if row["kind"] == "backbone"], plots)
    parts += _shared_training_note(results)
    parts += _latency_section(results, linked)
    parts += _quality_sections(linked, flat, out_dir, plots)
    parts += _ensembles_section([row for row in linked if row["kind"] == "ensemble"])
    parts += _onnx_against_keras(flat, linked)
    parts += _submission_section(results.get("submission"))
    return "\n".join(parts)


def report_in(out_dir: str) -> dict | None:
    """What the report already in ``out_dir`` says of itself (its results.json: ``name``, ``kind``) for
    the study, the demo and compare to decide whether --out is theirs, after refusing an --out that is a
    run folder; None where there is no report, ``{"name": "?"}`` where it can't be read."""
    from kbench.training.runs import CONFIG, Run

    if Run(out_dir).exists(CONFIG):
        raise KbenchError(f"--out {out_dir} is a run folder; choose another --out")
    path = os.path.join(out_dir, RESULTS_JSON)
    if not os.path.isfile(path):
        return None
    try:
        found = files.read_json(path)
    except (ValueError, OSError):
        return {"name": "?"}
    return found if isinstance(found, dict) else {"name": "?"}


def write_report(results: dict, out_dir: str) -> dict:
    """results.json, results.csv (one row per model), latency.csv (one row per timing), the PNG plots
    and report.md into ``out_dir``; returns their paths."""
    from kbench.core.files import write_csv, write_json, write_text

    flat = flat_rows(results)
    paths = {
        "json": os.path.join(out_dir, RESULTS_JSON),
        "csv": os.path.join(out_dir, RESULTS_CSV),
        "latency": os.path.join(out_dir, LATENCY_CSV),
        "report": os.path.join(out_dir, REPORT_MD),
    }
    write_json(paths["json"], results)
    write_csv(paths["csv"], flat)
    timings = [{**timing, "model": row["name"]} for row in results["rows"] for timing in row.get("latency", [])]
    write_csv(paths["latency"], timings, LATENCY_COLUMNS)
    paths["plots"] = write_plots(flat, out_dir)  # before report.md, which shows the ones written
    write_text(paths["report"], markdown_report(results, flat, out_dir))
    return paths
