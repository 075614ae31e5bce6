"""What each command prints: one short text per command's result (train, ensemble, export, quantize,
predict, score, the registry) and the study's tables on the terminal (bench, demo, compare).

The CLI's side of the output, imported only by kbench.cli.main: library functions return values, and the
wording a person reads at the terminal lives here.
"""

from __future__ import annotations

import json
import os

from kbench.core.tables import flat_rows, format_table, latency_wide, pareto_text
from kbench.report.plots import PLOTS
from kbench.report.report import LATENCY_CSV, REPORT_MD, RESULTS_CSV, RESULTS_JSON


def backbone_text(specs: list, output_format: str = "table") -> str:
    """The registry (or part of it) as a table or JSON."""
    rows = [dict(spec) for spec in specs]
    if output_format == "json":
        return json.dumps(rows, indent=2)
    for row in rows:
        row["params"] = f"{row['params'] / 1e6:.1f}M"
        row["gflops"] = f"{row['gflops']:.2f}"
    columns = ["name", "image_size", "min_image_size", "params", "gflops", "feature_dim", "preprocessing"]
    return format_table(rows, columns)


def train_summary(result: dict, run_dir: str) -> str:
    from kbench.training.runs import MODEL

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
    from kbench.training.runs import MODEL

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
