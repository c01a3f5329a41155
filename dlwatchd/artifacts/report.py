"""The training report: one PNG with loss and IoU curves, the best epoch's per-class IoU and its confusion matrix.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, never through pyplot: pyplot keeps global figure
state and picks a GUI backend, and a worker must neither leak figures across jobs nor need a display.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from dlwatchd.spool.atomic import write_bytes_atomic

FIGURE_SIZE = (13.0, 9.5)
DPI = 100
BEST_COLOUR = "tab:red"
# Past this many classes the per-cell count labels overlap; the colours still tell the story.
MAX_ANNOTATED_CLASSES = 12


def write_training_report(
    path: Path,
    history: list[dict[str, Any]],
    class_names: list[str],
    confusion_matrix: list[list[int]] | None,
    best_epoch: int | None,
) -> None:
    """Draw the report of `history` (training_history.json entries) as a PNG at `path`, atomically.

    Missing or None values are left out of the curves; an empty history or an absent confusion matrix gives
    panels that say so. Raises only on filesystem errors.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)  # binds the Agg canvas to this figure only; no global backend switch
    axes = figure.subplots(2, 2)
    best = _best_entry(history, best_epoch)
    if best_epoch is None and best is not None and best.get("is_best"):
        best_epoch = best.get("epoch")  # the history's own is_best flag marks it when the caller has none
    _plot_losses(axes[0][0], history, best_epoch)
    _plot_mean_iou(axes[0][1], history, best_epoch)
    _plot_class_iou(axes[1][0], best, class_names, best_epoch)
    _plot_confusion(figure, axes[1][1], confusion_matrix, class_names)
    title = f"Training report: {len(history)} epoch(s)"
    if best_epoch is not None:
        title += f", best epoch {best_epoch}"
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(Path(path), buffer.getvalue())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    epochs: list[int] = []
    values: list[float] = []
    for position, entry in enumerate(history, start=1):
        value = _number(entry.get(key))
        if value is not None:
            epochs.append(int(entry.get("epoch") or position))
            values.append(value)
    return epochs, values


def _best_entry(history: list[dict[str, Any]], best_epoch: int | None) -> dict[str, Any] | None:
    for entry in history:
        if best_epoch is not None and entry.get("epoch") == best_epoch:
            return entry
    for entry in history:
        if entry.get("is_best"):
            return entry
    return history[-1] if history else None


def _mark_best(ax: Any, best_epoch: int | None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers; no "2.5" ticks
    if best_epoch is not None:
        ax.axvline(best_epoch, color=BEST_COLOUR, linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_losses(ax: Any, history: list[dict[str, Any]], best_epoch: int | None) -> None:
    ax.set_title("Loss per epoch")
    plotted = False
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        epochs, values = _series(history, key)
        if values:
            # Markers keep a single epoch visible as a point instead of an invisible zero-length line.
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
            plotted = True
    if not plotted:
        _empty(ax, "no loss recorded")
        return
    _mark_best(ax, best_epoch)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize="small")


def _plot_mean_iou(ax: Any, history: list[dict[str, Any]], best_epoch: int | None) -> None:
    ax.set_title("Mean IoU per epoch (validation)")
    epochs, values = _series(history, "mean_iou")
    if not values:
        _empty(ax, "no IoU recorded")
        return
    ax.plot(epochs, values, marker="o", markersize=3, color="tab:green", label="mean IoU")
    _mark_best(ax, best_epoch)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("IoU")
    ax.legend(loc="best", fontsize="small")


def _plot_class_iou(ax: Any, best: dict[str, Any] | None, class_names: list[str], best_epoch: int | None) -> None:
    epoch = best.get("epoch") if best else best_epoch
    ax.set_title(f"Per-class IoU, epoch {epoch}" if epoch is not None else "Per-class IoU")
    per_class = best.get("per_class_iou") if best else None
    if not isinstance(per_class, dict) or not per_class:
        _empty(ax, "no per-class IoU recorded")
        return
    names = [name for name in class_names if name in per_class] + [
        name for name in per_class if name not in class_names
    ]
    values = [_number(per_class[name]) for name in names]
    heights = [value if value is not None else 0.0 for value in values]
    bars = ax.bar(range(len(names)), heights, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        label = f"{value:.2f}" if value is not None else "n/a"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("IoU")


def _plot_confusion(figure: Any, ax: Any, matrix: list[list[int]] | None, class_names: list[str]) -> None:
    ax.set_title("Confusion matrix, best epoch (row-normalised)")
    if not matrix or not all(isinstance(row, list) and len(row) == len(matrix) for row in matrix):
        _empty(ax, "no confusion matrix recorded" if not matrix else "confusion matrix is not square")
        return
    counts = [[_number(cell) or 0.0 for cell in row] for row in matrix]
    size = len(counts)
    # Rows are true classes: normalising by row shows recall per class, which is what a sparse-label user checks.
    fractions = [[cell / sum(row) if sum(row) > 0 else 0.0 for cell in row] for row in counts]
    image = ax.imshow(fractions, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(size)]
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    ax.set_xticklabels(names, rotation=30 if size > 4 else 0, fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if size > MAX_ANNOTATED_CLASSES:
        return
    for row_index, row in enumerate(counts):
        for column_index, count in enumerate(row):
            fraction = fractions[row_index][column_index]
            ax.text(
                column_index,
                row_index,
                f"{fraction:.2f}\n({int(count)})",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if fraction > 0.5 else "black",
            )
