"""RUN_DIR/report.html: the one page a person opens to judge a run, rewritten at each evaluation.

`write_report(run_dir)` gathers the run's files (report_data), draws the
figures (plots), writes them under RUN_DIR/plots/ and inlines the same PNGs into
a self-contained report.html (report_html). Every file is written atomically
(io.atomic), so a browser or a copy never sees half a report, and a run with
nothing evaluated yet still gets a report that says what is missing.
`stablediff report RUN_DIR` calls it; it is also the one entry point for
`stablediff eval` and the training loop to rewrite the report after an evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

from stablediff.errors import MissingPathError, NotAFolderError
from stablediff.evaluation import plots, report_html
from stablediff.evaluation.report_data import ReportData, gather
from stablediff.io.atomic import make_dirs, remove_quietly, write_atomic

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
LOSS_PLOT = "losses.png"
CONFUSION_PLOT = "confusion.png"


def metric_plot_name(name: str) -> str:
    return f"metric-{name}.png"


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and RUN_DIR/plots/*.png from what the run holds now; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MissingPathError(f"{run_dir} does not exist; name a run directory (the --run-dir of `stablediff train`)")
    if not run_dir.is_dir():
        raise NotAFolderError(f"{run_dir} is a file; name a run directory (the --run-dir of `stablediff train`)")
    data = gather(run_dir)
    figures = draw_figures(data)
    save_plots(run_dir / PLOTS_DIR, figures)
    metric_pngs = {name: figures[metric_plot_name(name)] for name in data.metrics}
    sections = [
        report_html.summary_section(data),
        report_html.losses_section(figures.get(LOSS_PLOT)),
        report_html.metrics_section(data, metric_pngs),
        report_html.samples_section(data),
        report_html.confusion_section(data, figures.get(CONFUSION_PLOT)),
        report_html.data_section(data),
        report_html.config_section(data),
    ]
    written_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    path = run_dir / REPORT_FILE
    write_atomic(path, report_html.page(data, sections, written_at).encode("utf-8"))
    return path


def draw_figures(data: ReportData) -> dict[str, bytes]:
    """Every figure the data allows, by its file name under plots/."""
    figures = {}
    losses = plots.loss_plot(data.losses)
    if losses is not None:
        figures[LOSS_PLOT] = losses
    for name, points in data.metrics.items():
        figures[metric_plot_name(name)] = plots.metric_plot(name, points, data.best_step)
    if data.confusion is not None:
        figures[CONFUSION_PLOT] = plots.confusion_plot(data.confusion)
    return figures


def save_plots(folder: Path, figures: dict[str, bytes]) -> None:
    """Write the figures into `folder`, and remove the report's PNGs there that this report no longer has."""
    make_dirs(folder)
    for name, png in figures.items():
        write_atomic(folder / name, png)
    for stale in folder.glob("*.png"):
        if stale.name not in figures and (stale.name in (LOSS_PLOT, CONFUSION_PLOT)
                                          or stale.name.startswith("metric-")):
            remove_quietly(str(stale))
