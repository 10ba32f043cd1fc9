"""`stablediff ckpt list|info|verify|repair|gc RUN_DIR_OR_STORE`: inspect and mend checkpoint stores."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from stablediff.checkpoint import DEFAULT_GC_GRACE_S, CheckpointStore, gc, repair
from stablediff.checkpoint.run_stores import configured_replicas
from stablediff.cli import ckpt_models
from stablediff.errors import UserError
from stablediff.cli.locking import store_locked
from stablediff.cli.options import trust_pickle_option
from stablediff.run_schema import BULKY_META, group_of


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def open_target(target: str, extra_replicas: tuple[str, ...]) -> tuple[CheckpointStore, list[CheckpointStore]]:
    """A run directory (its checkpoints/ and configured replicas) or a store location."""
    path = Path(target)
    replicas = list(extra_replicas)
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        replicas = configured_replicas(path) + replicas
        path = path / "checkpoints"
    # objects/ alone is a store too: the orphans of a first save that failed before its manifest.
    if "://" not in target and not ((path / "manifests").is_dir() or (path / "objects").is_dir()):
        raise UserError(f"{target} holds no checkpoint store (no manifests/ or objects/ folder); give a run "
                        "directory or the store itself")
    return CheckpointStore(str(path) if "://" not in target else target), [CheckpointStore(r) for r in replicas]


replica_option = click.option("--replica", "replicas", multiple=True, metavar="LOCATION",
                              help="Another store holding copies (added to the run's configured replicas).")


@click.group(name="ckpt")
def group() -> None:
    """Checkpoint stores (list, info, verify, repair, gc) and model files (export, convert, merge, prune, hash)."""


@group.command(name="list")
@click.argument("target")
@replica_option
@click.option("--all", "show_all", is_flag=True,
              help="Also list the checkpoints a divergence rollback abandoned (marked; never loaded).")
def list_cmd(target: str, replicas, show_all: bool) -> None:
    """One line per checkpoint: step, time, size, bytes new in it, metrics, replicas holding it, and
    whether its manifest and chunks are whole (every chunk present with its size; `verify` re-hashes)."""
    store, others = open_target(target, replicas)
    held = {r.location: set(_steps_or_empty(r)) for r in others}
    checked = store.verify(deep=False)
    table = Table("step", "time", "size", "new", "metrics", "replicas", "chunks: present+size")
    summaries = store.list(include_abandoned=True)
    for s in summaries if show_all else [s for s in summaries if s.abandoned_by is None]:
        when = dt.datetime.fromtimestamp(s.time).strftime("%Y-%m-%d %H:%M:%S") if s.time else "?"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in s.metrics.items())
        holding = sum(s.step in steps for steps in held.values()) if s.abandoned_by is None else 0
        table.add_row(str(s.step), when, human_bytes(s.bytes_total), human_bytes(s.bytes_new), metrics,
                      f"{holding}/{len(others)}", _list_status(s, checked.chunk_problems_of(s.step)))
    Console(width=160).print(table)
    click.echo("chunks checked for presence and size only; `stablediff ckpt verify` re-hashes them")
    if checked.orphan_chunks:
        click.echo(f"{checked.orphan_chunks} chunks are referenced by no checkpoint (left by an interrupted "
                   "save); `stablediff ckpt gc` removes them")
    hidden = sum(s.abandoned_by is not None for s in summaries)
    if hidden and not show_all:
        click.echo(f"{hidden} checkpoints abandoned by divergence rollbacks are not shown; "
                   "`stablediff ckpt list --all` lists them")


def _list_status(summary, problems) -> str:
    if summary.abandoned_by is not None:  # kept for inspection only: its chunks are not checked here
        return f"abandoned by rollback {summary.abandoned_by or '?'}"
    if not summary.valid:
        return f"NO: {summary.problem}"
    if not problems:
        return "ok"
    kinds = Counter(p.problem.split(" ")[0] for p in problems)
    return "NO: " + ", ".join(f"{n} chunk{'s' * (n > 1)} {kind}" for kind, n in sorted(kinds.items()))


def _steps_or_empty(store: CheckpointStore) -> list[int]:
    try:
        return store.steps()
    except OSError:
        return []


@group.command()
@click.argument("target")
@click.option("--step", type=int, default=None, help="Which checkpoint (default: the newest).")
@trust_pickle_option
def info(target: str, step: int | None, trust_pickle: bool) -> None:
    """A checkpoint's metadata: counters, metrics, fingerprints, tensors by group; for a model file or
    diffusers folder: architecture, dtypes, parameters per component and metadata."""
    if ckpt_models.is_model_target(target):
        return ckpt_models.show_model_info(target, trust_pickle)
    store, _ = open_target(target, ())
    steps = store.steps() if step is not None else [s.step for s in store.list()]  # newest: not an abandoned one
    if not steps:
        raise UserError(f"{target} holds no checkpoints")
    manifest = store.read_manifest(step if step is not None else steps[-1])
    groups: dict[str, list[int]] = {}
    for name, entry in manifest.tensors.items():
        g = groups.setdefault(group_of(name), [0, 0])
        g[0] += 1
        g[1] += entry.nbytes
    meta = {k: v for k, v in manifest.meta.items() if k not in BULKY_META}
    click.echo(json.dumps({"step": manifest.step, "time": manifest.time, "bytes_total": manifest.bytes_total,
                           "bytes_new": manifest.bytes_new, "metrics": manifest.metrics,
                           "tensors": {g: {"count": c, "bytes": b} for g, (c, b) in groups.items()},
                           "meta": meta}, indent=2, default=str))


@group.command()
@click.argument("target")
@click.option("--quick", is_flag=True, help="Only check that every chunk is present with its size (no reads).")
@click.option("--deep", is_flag=True, hidden=True)  # re-hashing is the default now; kept for old scripts
def verify(target: str, quick: bool, deep: bool) -> None:
    """Check every manifest and re-hash every chunk; exit 1 with a per-chunk report when anything is wrong."""
    if quick and deep:
        raise click.UsageError("--quick and --deep contradict each other; re-hashing (--deep) is the default")
    store, _ = open_target(target, ())
    report = store.verify(deep=not quick)
    for line in report.lines():
        click.echo(line)
    how = "checked for presence and size only (--quick)" if quick else "checked by re-hashing"
    checked = f"{len(report.steps_ok)} checkpoints verified, {report.chunks_checked} chunks {how}"
    if not report.ok:
        click.echo(f"damaged: steps {report.damaged_steps}; {checked}. Run `stablediff ckpt repair` "
                   "with a replica to restore them.", err=True)
        sys.exit(1)
    click.echo(f"ok: {checked}")


@group.command(name="repair")
@click.argument("target")
@replica_option
def repair_cmd(target: str, replicas) -> None:
    """Restore bad or missing chunks of the primary from replicas, then re-sync every replica."""
    store, others = open_target(target, replicas)
    if not others:
        raise UserError("repair needs at least one replica: configure checkpoint.replicas or pass --replica")
    with store_locked(target, "stablediff ckpt repair"):
        report = repair(store, others)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        sys.exit(1)


@group.command(name="gc")
@click.argument("target")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=DEFAULT_GC_GRACE_S, show_default=True,
              metavar="SECONDS", help="Keep unreferenced files used this recently (a save in flight may need them).")
def gc_cmd(target: str, grace_s: float) -> None:
    """Remove chunks no manifest references and temp files left by interrupted writes; a chunk's age
    counts from the last save that used it."""
    store, _ = open_target(target, ())
    with store_locked(target, "stablediff ckpt gc"):
        report = gc(store, grace_s=grace_s)
    click.echo(f"removed {report.chunks_removed} chunks ({human_bytes(report.bytes_freed)}) and "
               f"{report.temp_files_removed} temp files; kept {report.young_files_kept} files used in the "
               f"last {grace_s:g} s (or of unknown age)")


ckpt_models.register(group)  # export, convert, merge, prune, hash
