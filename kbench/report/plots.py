"""Rows -> PNG: a study's plots (log loss against latency with the Pareto front, time per epoch,
validation log loss per epoch). A run's own curves are drawn by training (``kbench.training.curves``),
whose matplotlib helpers these plots share. matplotlib is imported only when a plot is written.
"""

from __future__ import annotations

import os

from kbench.core.tables import latency_label, pareto_members
from kbench.training.curves import pyplot, save_figure, series

LOGLOSS_PLOT, EPOCH_PLOT, VAL_LOSS_PLOT = "logloss_vs_latency.png", "epoch_time.png", "val_loss_by_epoch.png"
PLOTS = (LOGLOSS_PLOT, EPOCH_PLOT, VAL_LOSS_PLOT)


def _histories(flat: list[dict], out_dir: str) -> dict[str, list[dict]]:
    """Each trained model's history.csv (ensembles have none), by name."""
    from kbench.training.runs import Run

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
    plt = pyplot()
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
        axes.set_xlabel(f"latency, {latency_label(key)} p50 (ms)")
        axes.set_ylabel("validation log loss")
        axes.set_title("Quality against serving cost (lower left is better)")
        axes.grid(alpha=0.3)
        axes.legend()
        written.append(save_figure(figure, os.path.join(out_dir, LOGLOSS_PLOT)))
    trained = [row for row in flat if row["kind"] == "backbone" and row.get("epoch_seconds")]
    if trained:
        figure, axes = plt.subplots(figsize=(7, 0.5 * len(trained) + 1.5))
        axes.barh([row["name"] for row in trained], [row["epoch_seconds"] for row in trained], color="tab:blue")
        axes.set_xlabel("seconds per training epoch (median of steady epochs)")
        axes.invert_yaxis()
        axes.grid(axis="x", alpha=0.3)
        written.append(save_figure(figure, os.path.join(out_dir, EPOCH_PLOT)))
    histories = _histories(flat, out_dir)
    if histories:
        from matplotlib.ticker import MaxNLocator

        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name, history in histories.items():
            axes.plot(series(history, "epoch"), series(history, "val_loss"), marker="o", markersize=3, label=name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("validation log loss (Keras val_loss)")
        axes.set_title("Validation log loss per epoch (lower is better)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        written.append(save_figure(figure, os.path.join(out_dir, VAL_LOSS_PLOT)))
    for name in PLOTS:
        path = os.path.join(out_dir, name)
        if path not in written and os.path.isfile(path):
            os.remove(path)
    return written
