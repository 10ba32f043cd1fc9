"""Retention: which checkpoints to keep, and garbage collection of chunks.

Deletion order is what keeps this crash-safe: manifests go first (a checkpoint
stops existing at that instant), chunks referenced by no remaining manifest go
after. A crash in between only leaves unreferenced chunks for the next `gc`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

from stablediff.io.run_files import read_eval
from stablediff.run_schema import BEST_METRIC

from .errors import CheckpointError, ManifestError
from .lineage import abandoned_chunk_refs, rollback_targets
from .manifest import ManifestSummary
from .retention_guard import guard_deletions

from stablediff.errors import ConfigError

if TYPE_CHECKING:
    from .store import CheckpointStore

# `gc` run by hand may overlap a trainer's save whose chunks are written but
# whose manifest is not yet: chunks younger than this are never collected.
DEFAULT_GC_GRACE_S = 3600.0


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest `keep_last`, the best `keep_best` by `best_metric`, and every
    step divisible by `keep_every`. The single best checkpoint is always kept
    while `best_metric` is set, even with keep_best=0."""

    keep_last: int = 3
    keep_best: int = 0
    best_metric: str | None = BEST_METRIC
    best_mode: Literal["min", "max"] = "min"
    keep_every: int | None = None
    rollback_window: int | None = None  # the divergence guard's window (guard.within_steps): see rollback_keeps
    # A run directory whose eval.json "best" mark is kept too: `stablediff eval` may mark a best by another
    # metric than the one keep_best ranks by, and export/generate follow that mark.
    marked_in: Path | None = None

    def __post_init__(self) -> None:
        if self.keep_last < 2:
            raise ConfigError(
                f"retention keep_last must be at least 2 (got {self.keep_last}): with one, a save "
                f"interrupted after retention ran could leave no loadable checkpoint"
            )
        if self.keep_best < 0:
            raise ConfigError(f"retention keep_best must be 0 or more, got {self.keep_best}")
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"retention best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_every is not None and self.keep_every <= 0:
            raise ConfigError(f"retention keep_every must be a positive step count or None, got {self.keep_every}")

    def apply(self, store: CheckpointStore, grace_s: float = 0.0) -> RetentionReport:
        """Delete the manifests this policy drops, then collect their chunks.

        A deletion happens only while a newer kept checkpoint is known good
        (`retention_guard`); the report lists what was held back and why.
        grace_s=0 is right for the trainer's own writer, which runs this after its
        save committed; pass DEFAULT_GC_GRACE_S when another process may be saving.
        """
        summaries = store.list()
        chosen = select_to_delete(summaries, self, rollback_targets(store) | self.marked_steps())
        kept = [s.step for s in summaries if s.valid and s.step not in chosen]
        decision = guard_deletions(store, chosen, kept)
        for step in decision.delete:
            store.delete_manifest(step)
        report = RetentionReport(decision.delete, held_back=decision.held_back,
                                 held_reason=decision.reason(store.location))
        report.gc = gc(store, grace_s=grace_s)
        return report


    def marked_steps(self) -> set[int]:
        """The step eval.json marks best in `marked_in` (none without a readable mark)."""
        step = (read_eval(self.marked_in).get("best") or {}).get("step") if self.marked_in is not None else None
        return {step} if isinstance(step, int) else set()


def best_steps(summaries: Iterable[ManifestSummary], policy: RetentionPolicy) -> list[int]:
    """Steps of the best valid checkpoints by the monitored metric, best first."""
    if policy.best_metric is None:
        return []
    scored = [(s.metric(policy.best_metric), s.step) for s in summaries if s.valid]
    scored = [(value, step) for value, step in scored if value is not None]
    sign = 1.0 if policy.best_mode == "min" else -1.0
    scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))  # ties: the newer one wins
    return [step for _value, step in scored[: max(policy.keep_best, 1)]]


def select_to_delete(summaries: Iterable[ManifestSummary], policy: RetentionPolicy,
                     targets: Iterable[int] = ()) -> list[int]:
    """Pure decision: steps whose manifests retention deletes, oldest first.

    Only valid checkpoints are ever chosen; corrupt manifests are left for
    `ckpt repair`. The newest valid one is always kept (keep_last >= 2), and so
    are the rollback targets and the guard window's checkpoint (`rollback_keeps`).
    Abandoned checkpoints are not in `summaries` (store.list leaves them out).
    """
    valid = sorted((s for s in summaries if s.valid), key=lambda s: s.step)
    keep = {s.step for s in valid[-policy.keep_last :]}
    keep.update(best_steps(valid, policy))
    if policy.keep_every:
        keep.update(s.step for s in valid if s.step % policy.keep_every == 0)
    keep.update(rollback_keeps([s.step for s in valid], policy.rollback_window, targets))
    return [s.step for s in valid if s.step not in keep]


def rollback_keeps(steps: list[int], window: int | None, targets: Iterable[int] = ()) -> set[int]:
    """What a divergence rollback needs kept, of `steps` (oldest first): every past rollback's target,
    and a checkpoint older than the guard's `window`. The guard rolls back to the newest checkpoint
    before the first of its bad steps, which lie within the last `window` steps, so the newest
    checkpoint at least `window` steps before the newest one (or, early in a run, the oldest)
    is always a target that exists."""
    keep = set(targets) & set(steps)
    if window and steps:
        old_enough = [s for s in steps if s <= steps[-1] - window]
        keep.add(old_enough[-1] if old_enough else steps[0])
    return keep


@dataclass
class GcReport:
    chunks_removed: int = 0
    bytes_freed: int = 0
    temp_files_removed: int = 0
    young_files_kept: int = 0  # unreferenced, but within the grace period


@dataclass
class RetentionReport:
    deleted_steps: list[int]
    gc: GcReport = field(default_factory=GcReport)
    held_back: list[int] = field(default_factory=list)  # chosen, but no newer kept one is known good
    held_reason: str | None = None


def referenced_chunks(store: CheckpointStore) -> set[str]:
    """Chunks named by any manifest — also by corrupt ones that still parse, so that
    a damaged manifest restored by `repair` finds its chunks still there."""
    refs = abandoned_chunk_refs(store)  # abandoned checkpoints stay inspectable
    for step in store.steps():
        try:
            refs.update(store.read_manifest(step).chunk_refs())
        except ManifestError:
            refs.update(_chunks_of_damaged(store, step))
        except CheckpointError:  # deleted while we listed
            continue
    return refs


def _chunks_of_damaged(store: CheckpointStore, step: int) -> set[str]:
    try:
        data = json.loads(store.read_manifest_bytes(step))
        return {h for entry in data["tensors"].values() for h in entry["chunks"] if isinstance(h, str)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return set()  # unreadable: nothing we can honour


def gc(store: CheckpointStore, grace_s: float = DEFAULT_GC_GRACE_S) -> GcReport:
    """Remove chunks no manifest references and temp files left by crashes."""
    report = GcReport()
    refs = referenced_chunks(store)
    objects, temps = store.scan_objects()
    cutoff = time.time() - grace_s if grace_s > 0 else math.inf
    for digest, (size, mtime) in objects.items():
        if digest in refs:
            continue
        if mtime > cutoff:
            report.young_files_kept += 1
            continue
        store.remove_chunk(digest)
        report.chunks_removed += 1
        report.bytes_freed += size
    for rel, mtime in temps:
        if mtime > cutoff:
            report.young_files_kept += 1
            continue
        store.remove_file(rel)
        report.temp_files_removed += 1
    return report
