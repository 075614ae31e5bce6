"""A run's training curves (``curves.png``): drawn by the training process itself after every epoch.

matplotlib is imported only when a plot is written. The study's plots (``kbench.report.plots``)
draw with the same helpers.
"""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str) -> str:
    from kbench.core.files import atomic_path

    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
    figure.clf()
    pyplot().close(figure)
    return path


def series(rows: list[dict], key: str) -> list[float | None]:
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
    panels = [(label, [(key, name, series(rows, key)) for key, name in lines]) for label, lines in CURVE_PANELS]
    panels = [(label, [line for line in lines if any(v is not None for v in line[2])]) for label, lines in panels]
    panels = [panel for panel in panels if panel[1]]
    plt = pyplot()
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
    return save_figure(figure, path)
