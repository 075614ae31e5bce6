"""Rows -> PNG: a run's training curves (``curves.png``, written by the training process itself) and
a study's plots (log loss against latency with the Pareto front, time per epoch, validation log loss
per epoch).

matplotlib is imported only when a plot is written; of kbench this imports only what lies below
training (the row helpers in kbench.tables, atomic writes, the run folder), so training can draw its
own curves without loading the report.
"""

from __future__ import annotations

import os

from kbench.tables import latency_label, pareto_members


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
        axes.set_xlabel(f"latency, {latency_label(key)} p50 (ms)")
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
