"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never
through pyplot: no global figure state, no GUI backend, safe to call from a
training process or a thread. The PNGs carry no "Software" tag, so the same
data gives the same bytes across runs. Labels come from our own names (metric
and stage names), never from file contents, so matplotlib's mathtext (`$...$`)
cannot be triggered by what a run wrote.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stablediff.evaluation.report_data import Confusion, Curve, MetricPoint
from stablediff.run_schema import metric_mode

DPI = 100
STAGE_TITLES = {"vae": "stage 1: autoencoder", "unet": "stage 2: UNet"}
BETTER = {"min": "lower is better", "max": "higher is better"}


def loss_plot(losses: dict[tuple[str, str], Curve]) -> bytes | None:
    """Training and validation loss against step, one panel per stage; None when nothing was logged."""
    stages = list(dict.fromkeys(stage for stage, _ in losses))
    if not stages:
        return None
    figure = _figure(width=6.4 * len(stages), height=3.6)
    for index, stage in enumerate(stages, start=1):
        axes = figure.add_subplot(1, len(stages), index)
        for name, style in (("train_loss", "-"), ("val_loss", "o-")):
            curve = losses.get((stage, name))
            if curve:
                steps, values = zip(*curve)
                axes.plot(steps, values, style, markersize=4, label=name.replace("_", " "))
        axes.set_title(STAGE_TITLES.get(stage, stage))
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend()
    return _png(figure)


def metric_plot(name: str, points: list[MetricPoint], best_step: int | None) -> bytes:
    """One metric against step: eval.json's values with their spread, train-time values, the best step."""
    figure = _figure(width=6.4, height=3.6)
    axes = figure.add_subplot(1, 1, 1)
    for source, label, style in (("eval", "stablediff eval", "o"), ("train", "during training", "s--")):
        chosen = [p for p in points if p.source == source]
        if chosen:
            spread = [p.spread or 0.0 for p in chosen]
            axes.errorbar([p.step for p in chosen], [p.value for p in chosen], yerr=spread, fmt=style,
                          capsize=3, markersize=5, label=label)
    if best_step is not None:
        axes.axvline(best_step, color="tab:red", linestyle=":", label=f"best (step {best_step})")
    axes.set_title(f"{name} ({BETTER[metric_mode(name)]})")
    axes.set_xlabel("step")
    axes.set_ylabel(name)
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


def confusion_plot(confusion: Confusion) -> bytes:
    """The digits confusion matrix as a heat map with each cell's count (rows: asked for, columns: read as)."""
    size = len(confusion.matrix)
    figure = _figure(width=5.2, height=4.6)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(confusion.matrix, cmap="Blues")
    peak = max((max(row) for row in confusion.matrix), default=0)
    for row in range(size):
        for column in range(size):
            count = confusion.matrix[row][column]
            axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if peak and count > peak / 2 else "black")
    axes.set_xticks(range(size))
    axes.set_yticks(range(size))
    axes.set_xlabel("digit the classifier read")
    axes.set_ylabel("digit asked for")
    axes.set_title(f"adherence at step {confusion.step}")
    figure.colorbar(image, ax=axes)
    return _png(figure)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
