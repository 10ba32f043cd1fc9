"""`stablediff data ...`: look at a data source before training on it."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stablediff.errors import UserError
from stablediff.cli.locking import run_dir_locked
from stablediff.cli.options import config_options, resolve_run, trust_pickle_option
from stablediff.cli.preflight import check_run_inputs
from stablediff.data.check import ASPECT_BINS, SIZE_BINS, CheckReport, check_source
from stablediff.data.sources import CAPTION_POLICIES, SourceError
from stablediff.data.validate import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, ValidationConfig

# Rejects listed per reason in the human report; --json lists all of them.
SHOWN_PER_REASON = 5


@click.group(name="data")
def group() -> None:
    """Inspect and prepare training data."""


@group.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--caption-policy", type=click.Choice(CAPTION_POLICIES), default="error",
              show_default=True, help="What a sample without a caption becomes: a reject (error), "
              "an empty caption, or its file name.")
@click.option("--min-size", type=click.IntRange(min=1), default=DEFAULT_MIN_SIZE, show_default=True,
              help="Smallest allowed image side in pixels.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS,
              show_default=True,
              help="Images with more pixels are rejected as decompression bombs.")
@click.option("--max-aspect", type=click.FloatRange(min=1), default=DEFAULT_MAX_ASPECT, show_default=True,
              help="Images whose longer side exceeds the shorter this many times are rejected.")
@click.option("--allow-outside-paths", is_flag=True,
              help="Let a table's image paths be absolute or leave the dataset's folder.")
def check(source: str, as_json: bool, caption_policy: str, min_size: int, max_pixels: int, max_aspect: float,
          allow_outside_paths: bool) -> None:
    """Decode and judge every sample of SOURCE and report the rejects with their reasons.

    SOURCE is a folder, a .tar shard or glob, a .parquet file, a save_to_disk
    folder or builtin:digits. Nothing is trained or written; the exit status is
    0 even when there are rejects.
    """
    config = ValidationConfig(min_size=min_size, max_pixels=max_pixels, max_aspect=max_aspect)
    # On stderr, and only drawn on a terminal: stdout stays one clean JSON document.
    with Console(stderr=True).status("checking samples...") as status:
        try:
            report = check_source(source, caption_policy, config,
                                  on_progress=lambda n: status.update(f"checked {n} samples..."),
                                  allow_outside_paths=allow_outside_paths)
        except SourceError as exc:
            raise UserError(str(exc)) from exc
    if as_json:
        # ensure_ascii: a file name that is not UTF-8 holds lone surrogates, which only
        # an escaped JSON string can carry.
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=True))
    else:
        show_report(report, Console())


@group.command()
@click.argument("config_name", metavar="CONFIG")
@config_options
@trust_pickle_option
def cache(config_name: str, run_dir, overrides, trust_pickle: bool) -> None:
    """Encode CONFIG's data to VAE latents and caption embeddings once (the feature cache).

    Training does this by itself at the start of stage 2; run it ahead to prepare a
    shared cache (data.cache_dir) or after changing the data. Interrupted, it resumes.
    """
    config, run_dir = resolve_run(config_name, run_dir, overrides)
    check_run_inputs(config, run_dir)
    # The run dir's lock: this writes its metrics, quarantine and (by default) features/. A shared
    # data.cache_dir needs none of its own: each cache namespace serialises its writers by flock.
    with run_dir_locked(run_dir, "stablediff data cache"):
        from stablediff.training.run import cache_features

        cache_features(config, run_dir, trust_pickle)


def printable(text: str) -> str:
    """Rich markup escaped, and non-UTF-8 bytes of a file name shown as U+FFFD, not a crash."""
    return escape(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def show_report(report: CheckReport, console: Console) -> None:
    console.print(f"[bold]{printable(report.source)}[/bold] ({report.source_format})")
    summary = Table(show_header=False, box=None)
    summary.add_row("samples", str(report.total))
    summary.add_row("accepted", f"[green]{report.accepted}[/green]")
    summary.add_row("rejected", f"[red]{report.rejected}[/red]" if report.rejected else "0")
    console.print(summary)
    if report.rejects:
        console.print(rejects_table(report))
    data = report.to_dict()
    console.print(histogram_table("shorter side (px)", data["size_histogram"], SIZE_BINS))
    console.print(histogram_table("aspect (w:h)", data["aspect_histogram"], ASPECT_BINS))
    captions = data["captions"]
    table = Table(title=f"captions ({captions['count']}, {captions['empty']} empty)")
    for column in ("", "min", "median", "mean", "p95", "max"):
        table.add_column(column, justify="right")
    for unit in ("chars", "words"):
        stats = captions[unit]
        table.add_row(unit, *(str(stats[name]) for name in ("min", "median", "mean", "p95", "max")))
    console.print(table)


def rejects_table(report: CheckReport) -> Table:
    table = Table(title="rejects by reason")
    table.add_column("reason", style="red")
    table.add_column("count", justify="right")
    table.add_column("examples (origin: detail)", overflow="fold")
    for reason, count in report.reject_counts().items():
        items = report.rejects[reason]
        lines = []
        for item in items[:SHOWN_PER_REASON]:
            text = f"{item['origin']}: {item['detail']}" if item["detail"] else item["origin"]
            lines.append(printable(text))  # file names like "[bold].png" are not markup
        if count > SHOWN_PER_REASON:
            lines.append(f"... and {count - SHOWN_PER_REASON} more (--json lists all)")
        table.add_row(reason, str(count), "\n".join(lines))
    return table


def histogram_table(title: str, counts: dict[str, int], bins: tuple) -> Table:
    table = Table(title=title)
    table.add_column("bin")
    table.add_column("count", justify="right")
    table.add_column("")
    peak = max(counts.values(), default=0) or 1
    for _, label in bins:
        if counts[label]:
            table.add_row(label, str(counts[label]), "█" * max(1, round(30 * counts[label] / peak)))
    return table
