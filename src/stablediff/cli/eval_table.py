"""`stablediff eval`'s table: one row per checkpoint, one column per metric, the best row marked."""

from __future__ import annotations

from typing import Callable, Sequence

import click

from stablediff.run_schema import METRIC_MODES


def cell(result) -> str:
    """"value ± spread (n=count)", with 4 significant digits."""
    spread = f" ± {result.spread:.3g}" if result.spread is not None else ""
    return f"{result.value:.4g}{spread} (n={result.count})"


def print_results(evaluated: Sequence, mark: dict | None, say: Callable[[str], None]) -> None:
    """The table on stdout; the best mark and each result's warning on stderr (via `say`)."""
    names = list(dict.fromkeys(n for e in evaluated for n in e.results))
    best_key = str(mark["step"]) if mark else None
    rows = [[f"{e.key}{' *' if e.key == best_key else ''}"] + [cell(e.results[n]) if n in e.results else ""
                                                               for n in names] for e in evaluated]
    header = ["step" if evaluated and evaluated[0].key.isdigit() else "model"] + \
        [f"{n} ({'lower' if METRIC_MODES[n] == 'min' else 'higher'} is better)" for n in names]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip())
    warned = {e.results[n].details.get("warning") for e in evaluated for n in e.results} - {None}
    for warning in sorted(warned):
        say(f"warning: {warning}")
    if mark:
        say(f"best: step {mark['step']} by {mark['metric']} ({mark['value']:.4g}; "
            f"{'lower' if mark['mode'] == 'min' else 'higher'} is better), marked in eval.json")
