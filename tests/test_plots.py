"""Rows -> PNG: a run's training curves and a study's plots, written atomically, and matplotlib only
loaded when a plot is drawn (training imports this module)."""

import os
import struct
import subprocess
import sys

import pytest

from kbench.report.plots import EPOCH_PLOT, LOGLOSS_PLOT, VAL_LOSS_PLOT, write_plots
from kbench.training.curves import write_curves

from conftest import REPO

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails on anything that isn't a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def history(epochs: int, lr: bool = False) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        row = {
            "epoch": float(epoch),
            "epoch_seconds": 1.0,
            "loss": 0.7 / epoch,
            "accuracy": 0.5 + 0.04 * epoch,
            "val_loss": 0.75 / epoch**0.5,
            "val_accuracy": 0.5 + 0.03 * epoch,
        }
        if lr:
            row.update(lr=1e-3 if epoch <= 2 else 1e-4, phase="head" if epoch <= 2 else "fine-tune")
        rows.append(row)
    return rows


def test_curves_are_a_png_with_a_learning_rate_panel_when_recorded(tmp_path):
    plain, scheduled = str(tmp_path / "plain.png"), str(tmp_path / "scheduled.png")
    assert write_curves(history(5), plain, "small_cnn: a") == plain
    assert write_curves(history(5, lr=True), scheduled) == scheduled
    (width, height), (_, height_lr) = png_size(plain), png_size(scheduled)
    assert width > 400 and height > 300
    assert height_lr > height * 1.3  # a third panel: the learning rate
    assert write_curves([], str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["plain.png", "scheduled.png"]  # no temporary left behind


def test_study_plots_are_written_only_with_something_to_show(tmp_path):
    flat = [
        {
            "name": name,
            "kind": "backbone",
            "epoch_seconds": seconds,
            "val_log_loss": loss,
            "onnxruntime-cpu_b1_p50_ms": ms,
        }
        for name, seconds, loss, ms in (("a", 2.0, 0.5, 1.0), ("b", 3.0, 0.3, 2.0))
    ]
    written = write_plots(flat, str(tmp_path))
    assert written == [str(tmp_path / LOGLOSS_PLOT), str(tmp_path / EPOCH_PLOT)]  # no folders: no histories
    assert all(png_size(path)[0] > 300 for path in written)
    (tmp_path / VAL_LOSS_PLOT).write_bytes(b"stale")
    untimed = [{**row, "onnxruntime-cpu_b1_p50_ms": None} for row in flat]
    assert write_plots(untimed, str(tmp_path)) == [str(tmp_path / EPOCH_PLOT)]
    assert sorted(os.listdir(tmp_path)) == [EPOCH_PLOT]  # the plots with nothing to show are gone


def test_training_loads_neither_matplotlib_nor_the_report():
    code = (
        "import sys, kbench.report.plots, kbench.training.train\n"
        "print(sorted(m for m in ('matplotlib', 'kbench.report.report', 'kbench.cli.summaries') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
