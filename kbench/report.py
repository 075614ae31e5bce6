"""Rows (lists of flat dicts) -> ASCII and markdown tables; study results -> report.md, CSV/JSON, PNG plots."""

from __future__ import annotations

import json
import os
import statistics


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


def latency_text(rows: list[dict], output_format: str, machine: dict) -> str:
    """Latency rows as JSON (a list of rows), CSV, or a table / markdown headed by the machine."""
    from kbench.latency import COLUMNS

    if output_format == "json":
        return json.dumps(rows, indent=2)
    if output_format == "csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    header = (
        f"machine: {machine['cpu']}, {machine['cores']} cores; GPU: {machine['gpu']}; "
        f"ONNX Runtime threads: {machine['threads']}; {versions}"
    )
    shown = [c for c in COLUMNS if c not in ("runs", "warmup", "detail")]
    style = "markdown" if output_format == "markdown" else "ascii"
    return header + "\n\n" + format_table(rows, shown, style=style) + _details_text(rows)


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


def _latency_label(key: str) -> str:
    return key.replace("_p50_ms", "").replace("_b1", " batch 1")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> str:
    from kbench.files import atomic_path

    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
    figure.clf()
    _pyplot().close(figure)
    return path


def _series(rows: list[dict], key: str) -> list[float | None]:
    values = []
    for row in rows:
        value = row.get(key)
        values.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
    return values


def _phases(rows: list[dict], epochs: list[float]) -> list[tuple[str, float, float]]:
    """(name, first epoch, last epoch) of each run of equal ``phase`` values."""
    spans = []
    for row, epoch in zip(rows, epochs):
        phase = row.get("phase")
        if phase in (None, ""):
            continue
        if spans and spans[-1][0] == str(phase) and spans[-1][2] < epoch:
            spans[-1] = (spans[-1][0], spans[-1][1], epoch)
        else:
            spans.append((str(phase), epoch, epoch))
    return spans


CURVE_PANELS = (  # (y label, ((history column, legend), ...))
    ("loss (cross-entropy)", (("loss", "training"), ("val_loss", "validation"))),
    ("accuracy", (("accuracy", "training"), ("val_accuracy", "validation"))),
    ("learning rate", (("lr", "learning rate"), ("learning_rate", "learning rate"))),
)


def write_curves(history_rows: list[dict], path: str, title: str = "") -> str | None:
    """``curves.png``: loss and validation loss, accuracy and validation accuracy per epoch, and the
    learning rate when the history records it (``lr``); phases (``phase``) are shaded and named.
    Written atomically; returns the path, or None for a history without epochs.

    >>> write_curves(Run("runs/b0").history, "runs/b0/curves.png", "b0")  # doctest: +SKIP
    """
    rows = [row for row in history_rows if isinstance(row.get("epoch"), (int, float))]
    if not rows:
        return None
    epochs = [float(row["epoch"]) for row in rows]
    panels = [(label, [(key, name, _series(rows, key)) for key, name in lines]) for label, lines in CURVE_PANELS]
    panels = [(label, [line for line in lines if any(v is not None for v in line[2])]) for label, lines in panels]
    panels = [panel for panel in panels if panel[1]]
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 1 + 2.4 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, (label, lines) in zip(axes, panels):
        for _, name, values in lines:
            ax.plot(epochs, values, marker="o", markersize=4, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if label == "learning rate":
            ax.set_yscale("log")
        elif len(lines) > 1:
            ax.legend(loc="best", fontsize=8)
        if label == "accuracy":
            ax.set_ylim(min(0.45, ax.get_ylim()[0]), 1.02)
    spans = _phases(rows, epochs)
    for number, (phase, first, last) in enumerate(spans):
        for ax in axes:
            ax.axvspan(first - 0.5, last + 0.5, color="0.5" if number % 2 else "0.8", alpha=0.15, lw=0)
        axes[0].annotate(
            f"phase: {phase}",
            ((first + last) / 2, 1),
            xycoords=("data", "axes fraction"),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axes[-1].set_xlabel("epoch")
    if len(set(epochs)) <= 15:
        axes[-1].set_xticks(sorted(set(epochs)))
        axes[-1].xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    else:
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    if title:
        axes[0].set_title(title, pad=16 if spans else 6)
    figure.tight_layout()
    return _save(figure, path)


LOGLOSS_PLOT, EPOCH_PLOT, VAL_LOSS_PLOT = "logloss_vs_latency.png", "epoch_time.png", "val_loss_by_epoch.png"
PLOTS = (LOGLOSS_PLOT, EPOCH_PLOT, VAL_LOSS_PLOT)
RESULTS_JSON, RESULTS_CSV, REPORT_MD, LATENCY_CSV = "results.json", "results.csv", "report.md", "latency.csv"


def _histories(flat: list[dict], out_dir: str) -> dict[str, list[dict]]:
    """Each trained model's history.csv (ensembles have none), by name."""
    from kbench.runs import Run

    found = {}
    for row in flat:
        if row["kind"] == "backbone" and row.get("folder"):
            history = Run(os.path.join(out_dir, row["folder"])).history
            if any(isinstance(h.get("val_loss"), float) for h in history):
                found[row["name"]] = history
    return found


def write_plots(flat: list[dict], out_dir: str) -> list[str]:
    """PNG plots: log loss against latency with the Pareto front, time per epoch per backbone, and
    every trained model's validation log loss per epoch. A plot with nothing to show is not written
    (and an older one of that name removed)."""
    plt = _pyplot()
    written = []
    key, scored, front = pareto_members(flat)
    if scored:
        points = [(row[key], row["val_log_loss"]) for row in scored]
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for index, (row, (x, y)) in enumerate(zip(scored, points)):
            marker = "s" if row["kind"] == "ensemble" else "o"
            axes.scatter(x, y, marker=marker, s=60, color="tab:red" if index in front else "tab:blue", zorder=3)
            axes.annotate(row["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ordered = sorted(points[i] for i in front)
        axes.plot([p[0] for p in ordered], [p[1] for p in ordered], "--", color="tab:red", label="Pareto front")
        axes.set_xlabel(f"latency, {_latency_label(key)} p50 (ms)")
        axes.set_ylabel("validation log loss")
        axes.set_title("Quality against serving cost (lower left is better)")
        axes.grid(alpha=0.3)
        axes.legend()
        written.append(_save(figure, os.path.join(out_dir, LOGLOSS_PLOT)))
    trained = [row for row in flat if row["kind"] == "backbone" and row.get("epoch_seconds")]
    if trained:
        figure, axes = plt.subplots(figsize=(7, 0.5 * len(trained) + 1.5))
        axes.barh([row["name"] for row in trained], [row["epoch_seconds"] for row in trained], color="tab:blue")
        axes.set_xlabel("seconds per training epoch (median of steady epochs)")
        axes.invert_yaxis()
        axes.grid(axis="x", alpha=0.3)
        written.append(_save(figure, os.path.join(out_dir, EPOCH_PLOT)))
    histories = _histories(flat, out_dir)
    if histories:
        from matplotlib.ticker import MaxNLocator

        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name, history in histories.items():
            axes.plot(_series(history, "epoch"), _series(history, "val_loss"), marker="o", markersize=3, label=name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("validation log loss (Keras val_loss)")
        axes.set_title("Validation log loss per epoch (lower is better)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        written.append(_save(figure, os.path.join(out_dir, VAL_LOSS_PLOT)))
    for name in PLOTS:
        path = os.path.join(out_dir, name)
        if path not in written and os.path.isfile(path):
            os.remove(path)
    return written


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

    from kbench.runs import CONFIG, CURVES, HISTORY, METRICS

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


def pareto_text(flat: list[dict]) -> str | None:
    """The Pareto front in words: ``On the front: a, b (...)``; None without timed, scored models."""
    key, scored, front = pareto_members(flat)
    if not scored:
        return None
    names = [scored[i]["name"] for i in sorted(front, key=lambda i: scored[i][key])]
    return (
        f"On the front: {', '.join(names)} (no other model has both a lower validation log loss and a "
        f"lower {_latency_label(key)} p50 latency; fastest first)."
    )


def markdown_report(results: dict, flat: list[dict], out_dir: str | None = None) -> str:
    """report.md: the reference study's three tables (time per epoch, inference time as one row per
    model, log loss), the plots with the Pareto front named, then ensembles, ONNX Runtime against
    Keras, the submission, the machine and the command. With ``out_dir`` (where report.md goes),
    model names link to their run folders."""
    machine = results.get("machine")
    linked = _linked(flat, out_dir)
    backbones = [row for row in linked if row["kind"] == "backbone"]
    ensembles = [row for row in linked if row["kind"] == "ensemble"]
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
    parts += [f"Command: `{results.get('command', '')}`", ""]
    plots = {name: out_dir is not None and os.path.isfile(os.path.join(out_dir, name)) for name in PLOTS}
    parts += [
        "## Time per training epoch",
        "",
        format_table(
            backbones,
            [
                "name",
                "backbone",
                "status",
                "params",
                "image_size",
                "batch_size",
                "epochs",
                "epoch_seconds",
                "train_images_per_second",
            ],
            style="markdown",
        ),
        "",
    ]
    if plots[EPOCH_PLOT]:
        parts += [f"![seconds per training epoch]({EPOCH_PLOT})", ""]
    wide = latency_wide(linked)
    parts += [
        "## Inference time",
        "",
        "p50 ms (median of individually timed runs after warm-up); bN = batch size N.",
        "",
    ]
    if any(len(row) > 1 for row in wide):
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
        parts += [
            f"Every timing (p50, p90, images/s, status), one row per model, runtime and batch size: "
            f"[{LATENCY_CSV}]({LATENCY_CSV}).",
            "",
        ]
    else:
        parts += ["No model was timed.", ""]
    by_loss = sorted(linked, key=lambda r: (r["val_log_loss"] is None, r["val_log_loss"] or 0))
    parts += [
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
    if ensembles:
        parts += [
            "## Ensembles",
            "",
            format_table(
                ensembles,
                ["name", "backbone", "status", "val_log_loss", "val_accuracy", "feature_seconds", "head_seconds"],
                style="markdown",
            ),
            "",
        ]
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
    if comparison:
        parts += ["## ONNX Runtime against Keras (batch 1)", "", format_table(comparison, style="markdown"), ""]
    submission = results.get("submission")
    if submission and submission.get("status", "ok") != "ok":
        parts += ["## Submission", "", f"From {submission['model']}: {submission['status']}.", ""]
    elif submission:
        score = (
            f"; test log loss {submission['test_log_loss']:.4f}, accuracy {submission['test_accuracy']:.3f}"
            if "test_log_loss" in submission
            else ""
        )
        parts += [
            "## Submission",
            "",
            f"`{submission['path']}` from {submission['model']}: "
            f"{submission['predicted']} of {submission['images']} test images{score}.",
            "",
        ]
    return "\n".join(parts)


def write_report(results: dict, out_dir: str) -> dict:
    """results.json, results.csv (one row per model), latency.csv (one row per timing), the PNG plots
    and report.md into ``out_dir``; returns their paths."""
    from kbench.files import write_csv, write_json, write_text
    from kbench.latency import COLUMNS

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
    write_csv(paths["latency"], timings, COLUMNS)
    paths["plots"] = write_plots(flat, out_dir)  # before report.md, which shows the ones written
    write_text(paths["report"], markdown_report(results, flat, out_dir))
    return paths


# -- what the commands print -----------------------------------------------------------------------


def backbone_text(specs: list, output_format: str = "table") -> str:
    """The registry (or part of it) as a table or JSON."""
    rows = [spec.to_dict() for spec in specs]
    if output_format == "json":
        return json.dumps(rows, indent=2)
    for row in rows:
        row["params"] = f"{row['params'] / 1e6:.1f}M"
        row["gflops"] = f"{row['gflops']:.2f}"
    columns = ["name", "image_size", "min_image_size", "params", "gflops", "feature_dim", "preprocessing"]
    return format_table(rows, columns)


def train_summary(result: dict, run_dir: str) -> str:
    from kbench.runs import MODEL

    seconds = result["epoch_seconds"]
    quality = (
        f"val log loss {result['val_log_loss']:.4f}, accuracy {result['val_accuracy']:.3f}"
        if result["val_log_loss"] is not None
        else "no validation split"
    )
    return (
        f"{result['backbone']} ({result['backend']}): {quality}; {len(seconds)} epochs, "
        f"last {seconds[-1]:.1f} s ({result['train_images_per_second']:.0f} images/s) "
        f"-> {os.path.join(run_dir, MODEL)}"
    )


def ensemble_summary(result: dict, run_dir: str) -> str:
    from kbench.runs import MODEL

    parts = ", ".join(
        f"{m['backbone']} {m['val_log_loss']:.4f}" for m in result["members"] if m["val_log_loss"] is not None
    )
    return (
        f"ensemble ({result['method']}): val log loss {result['val_log_loss']:.4f}, accuracy "
        f"{result['val_accuracy']:.3f} (members: {parts}); features {result['feature_seconds']:.1f} s, "
        f"head {result['head_seconds']:.1f} s -> {os.path.join(run_dir, MODEL)}"
    )


def export_summary(result: dict) -> str:
    if result.get("reused"):
        return (
            f"{result['path']} is up to date ({result['megabytes']:.1f} MB, opset {result['opset']}, batch "
            f"{result['batch_size']}): made from this model with these options, checked when it was written"
        )
    skipped = (result.get("graph_passes") or {}).get("skipped")
    return (
        f"wrote {result['path']} ({result['megabytes']:.1f} MB, opset {result['opset']}, batch "
        f"{result['batch_size']}) in {result['export_seconds']:.1f} s; ONNX Runtime vs Keras ({result['backend']}): "
        f"largest relative difference {result['max_relative_difference']:.1e}"
        + ("; graph as tf2onnx wrote it (--no-graph-passes)" if skipped else "")
    )


def quantize_summary(record: dict) -> str:
    """``export onnx --quantize int8``'s lines: the int8 file kept (its configuration, float vs int8
    batch-1 time and validation log loss), or one line saying why none was written."""
    best = record["candidates"][0] if record["candidates"] else None
    if record["int8_path"] is None:
        removed = f" (removed the earlier {record['removed']})" if record.get("removed") else ""
        if best is None or not any("val_log_loss" in row for row in record["candidates"]):
            return (
                f"no int8 file written: no int8 configuration was faster than the float file at batch 1 "
                f"(float {record['float_ms']:.2f} ms; fastest int8, {best['config']}, {best['ms']:.2f} ms){removed}"
            )
        return (
            f"no int8 file written: the int8 configurations faster than the float file lose too much validation "
            f"log loss ({best['config']}: {record['float_val_log_loss']:.4f} -> {best['val_log_loss']:.4f}, "
            f"bound {record['log_loss_bound']:.4f}){removed}"
        )
    lines = [
        f"wrote {record['int8_path']} ({record['config']}, calibrated on {record['calibration_images']} images); "
        f"batch-1 latency {record['float_ms']:.2f} ms -> {record['int8_ms']:.2f} ms ({record['speedup']:.2f}x)"
    ]
    if "int8_val_log_loss" in record:
        lines.append(
            f"validation log loss {record['float_val_log_loss']:.4f} -> {record['int8_val_log_loss']:.4f} "
            f"(bound {record['log_loss_bound']:.4f}), accuracy {record['float_val_accuracy']:.3f} -> "
            f"{record['int8_val_accuracy']:.3f}"
        )
    else:
        lines.append("no validation split to compare float and int8 accuracy on")
    return "\n".join(lines)


def predict_summary(result: dict) -> str:
    return (
        f"wrote {result['path']}: {result['predicted']} of {result['images']} images predicted, "
        f"{result['skipped']} unreadable (given the uniform probability)"
    )


def study_summary(results: dict, out: str) -> str:
    """What ``kbench bench``, ``kbench demo`` and ``kbench compare`` print: the three tables, the
    Pareto front, the submission, the files."""
    flat = flat_rows(results)
    parts = [
        "",
        "Time per training epoch",
        format_table(
            [r for r in flat if r["kind"] == "backbone"],
            ["name", "status", "params", "image_size", "epoch_seconds", "train_images_per_second"],
        ),
    ]
    parts += [
        "",
        "Inference time (p50 ms; bN = batch size N)",
        format_table(latency_wide(flat)),
        "",
        "Log loss",
        format_table(flat, ["name", "kind", "status", "val_log_loss", "val_accuracy"]),
    ]
    front = pareto_text(flat)
    if front:
        parts += ["", front]
    submission = results.get("submission")
    if submission and "test_log_loss" in submission:
        parts += [
            "",
            f"submission ({submission['model']}): test log loss {submission['test_log_loss']:.4f}, "
            f"accuracy {submission['test_accuracy']:.3f}",
        ]
    elif submission and submission.get("status", "ok") != "ok":
        parts += ["", f"submission ({submission['model']}): {submission['status']}"]
    plots = [os.path.join(out, name) for name in PLOTS if os.path.isfile(os.path.join(out, name))]
    parts += [
        "",
        f"report: {os.path.join(out, REPORT_MD)}",
        f"results: {', '.join(os.path.join(out, name) for name in (RESULTS_CSV, LATENCY_CSV, RESULTS_JSON))}",
        f"plots: {', '.join(plots) or 'none'}",
    ]
    if results.get("kind") != "comparison":
        parts.append(f"ONNX files: {os.path.join(out, 'onnx')}/")
    if submission and submission.get("path"):
        parts.append(f"submission: {submission['path']}")
    if results.get("failed"):
        parts.append(f"{results['failed']} stage(s) failed: see the status column")
    return "\n".join(parts)


def score_summary(submission: str, result: dict) -> str:
    return f"{submission}: log loss {result['log_loss']:.5f}, accuracy {result['accuracy']:.4f} ({result['rows']} rows)"
