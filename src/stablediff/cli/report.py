"""`stablediff report RUN_DIR`: (re)write the run's self-contained report.html and print where it is."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.html (and its plots under RUN_DIR/plots/) from what the run holds now.

    The report shows the loss curves, each evaluation metric against step, the
    sample grids per checkpoint, the digits confusion matrix, the best
    checkpoint, the config and the data summary. It reads the run's files
    only: no model is loaded, and a run still training can be reported on.
    """
    from stablediff.evaluation.report import write_report

    click.echo(str(write_report(run_dir)))
