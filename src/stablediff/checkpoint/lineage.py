"""Rollback lineage: which checkpoints a divergence rollback abandoned, and what it decided.

When the divergence guard rolls a run back to step T, the checkpoints newer than T
belong to the diverged trajectory. They stay on disk for inspection, but resume,
export, `generate RUN_DIR` and retention never choose them again.

Inside the store:
    abandoned/rollback-0001.json             the record of the run's first rollback (its commit point)
    abandoned/<step:012d>-<checksum>.json    an abandoned manifest, moved out of manifests/

The record is written atomically first. It names every abandoned manifest by step
and checksum, so from that instant they are excluded wherever they lie. Then each
one is copied under abandoned/ and removed from manifests/, so the rolled-back
run's own checkpoints of the same steps never overwrite them (a crash in between
leaves two copies of the same bytes; `complete_moves` finishes). A step's manifest
is identified by its checksum because the rolled-back run saves the same step
numbers again, as different manifests.

The record also carries what the rollback decided (the LR scale, the guard state
with its rollback count, the batches skipped), so a run killed right after a
rollback resumes the rolled-back trajectory from the target instead of losing it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable

import blake3

from .errors import CheckpointError, ManifestError
from .manifest import Manifest, ManifestSummary, canonical_json, parse_manifest

if TYPE_CHECKING:
    from .store import CheckpointStore

LINEAGE_DIR = "abandoned"
_RECORD_NAME = re.compile(r"^rollback-(\d{4,})\.json$")
_COPY_NAME = re.compile(r"^(\d{12,})-([0-9a-f]{64})\.json$")


@dataclass(frozen=True)
class RollbackRecord:
    number: int  # 1 for the run's first rollback
    target_step: int  # the checkpoint the run went back to
    first_bad_step: int
    at_step: int  # the step the guard asked for the rollback at
    abandoned: dict[int, list[str]]  # step -> checksums of that step's abandoned manifests
    lr_scale: float  # the LR multiplier from here on
    skipped_batches: int  # batches (data and random draws) this rollback skipped
    guard: dict[str, Any]  # the divergence guard's state after the rollback (with its rollback count)
    time: float = 0.0

    def to_bytes(self) -> bytes:
        body = asdict(self)
        body["abandoned"] = {str(step): sums for step, sums in self.abandoned.items()}
        return canonical_json({**body, "checksum": blake3.blake3(canonical_json(body)).hexdigest()}) + b"\n"

    @staticmethod
    def from_bytes(raw: bytes, where: str) -> RollbackRecord:
        try:
            data = json.loads(raw)
            stored = data.pop("checksum")
            if blake3.blake3(canonical_json(data)).hexdigest() != stored:
                raise ValueError("fails its checksum")
            data["abandoned"] = {int(step): list(sums) for step, sums in data["abandoned"].items()}
            return RollbackRecord(**data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"rollback record {where} is corrupt: {exc}") from None


def record_rel(number: int) -> str:
    return f"{LINEAGE_DIR}/rollback-{number:04d}.json"


def copy_rel(step: int, checksum: str) -> str:
    return f"{LINEAGE_DIR}/{step:012d}-{checksum}.json"


def read_records(store: CheckpointStore) -> list[RollbackRecord]:
    """The store's rollback records, oldest first; a corrupt one is left out (its moved copies still count)."""
    records = []
    for name in sorted(store._fs.list_files(LINEAGE_DIR)):
        if _RECORD_NAME.match(name):
            rel = f"{LINEAGE_DIR}/{name}"
            try:
                records.append(RollbackRecord.from_bytes(store._fs.read(rel), f"{store.location}/{rel}"))
            except (ManifestError, FileNotFoundError):
                continue
    return sorted(records, key=lambda r: r.number)


def records_of(stores: Iterable[CheckpointStore]) -> list[RollbackRecord]:
    """The records of all stores together (one per rollback number; an unreachable replica adds none)."""
    by_number: dict[int, RollbackRecord] = {}
    for store in stores:
        try:
            for record in read_records(store):
                by_number.setdefault(record.number, record)
        except OSError:
            continue
    return [by_number[n] for n in sorted(by_number)]


def manifests_after(stores: Iterable[CheckpointStore], target_step: int) -> dict[int, list[str]]:
    """step -> checksums of every manifest newer than `target_step`, in any of the stores."""
    found: dict[int, set[str]] = {}
    for store in stores:
        for step in store.steps():
            if step <= target_step:
                continue
            try:
                found.setdefault(step, set()).add(store.read_manifest(step).checksum)
            except ManifestError:  # damaged: never loadable anyway; name it by its bytes
                found.setdefault(step, set()).add(blake3.blake3(store.read_manifest_bytes(step)).hexdigest())
            except CheckpointError:  # deleted while we listed
                continue
    return {step: sorted(sums) for step, sums in sorted(found.items())}


def commit(store: CheckpointStore, record: RollbackRecord) -> None:
    """Write the record (the rollback's commit point), then move the abandoned manifests aside."""
    write_record(store, record)
    move_abandoned(store, [record])


def write_record(store: CheckpointStore, record: RollbackRecord) -> None:
    """The record alone, durably (temp name, fsync, rename, directory fsync)."""
    store._fs.write_atomic(record_rel(next_number(store, record.number)), record.to_bytes())


def next_number(store: CheckpointStore, wanted: int) -> int:
    """`wanted`, or the next free record number, so that no record is ever overwritten."""
    taken = {int(m.group(1)) for m in map(_RECORD_NAME.match, store._fs.list_files(LINEAGE_DIR)) if m}
    return wanted if wanted not in taken else max(taken) + 1


def move_abandoned(store: CheckpointStore, records: Iterable[RollbackRecord]) -> None:
    """Copy each abandoned manifest still in manifests/ under abandoned/, then remove the original."""
    for record in records:
        for step, checksums in record.abandoned.items():
            try:
                raw = store.read_manifest_bytes(step)
            except CheckpointError:
                continue  # already moved, or never in this store
            checksum = _checksum_of(raw, store, step)
            if checksum in checksums:
                store._fs.write_atomic(copy_rel(step, checksum), raw)
                store.delete_manifest(step)


def complete_moves(store: CheckpointStore) -> None:
    """Finish the moves of a rollback that a crash interrupted (idempotent)."""
    move_abandoned(store, read_records(store))


def _checksum_of(raw: bytes, store: CheckpointStore, step: int) -> str:
    try:
        return parse_manifest(raw, f"{store.location}/{store.manifest_rel(step)}").checksum
    except ManifestError:
        return blake3.blake3(raw).hexdigest()


def abandoned_index(stores: Iterable[CheckpointStore]) -> dict[int, set[str]]:
    """step -> checksums of abandoned manifests, from the records and moved copies of all stores.

    An unreachable replica contributes nothing (it must not stop a load)."""
    index: dict[int, set[str]] = {}
    for store in stores:
        try:
            names, records = store._fs.list_files(LINEAGE_DIR), read_records(store)
        except OSError:
            continue
        for record in records:
            for step, sums in record.abandoned.items():
                index.setdefault(step, set()).update(sums)
        for match in filter(None, map(_COPY_NAME.match, names)):
            index.setdefault(int(match.group(1)), set()).add(match.group(2))
    return index


def is_abandoned(index: dict[int, set[str]], step: int, checksum: str) -> bool:
    return checksum in index.get(step, ())


def abandoned_summaries(store: CheckpointStore, not_moved: Iterable[Manifest] = ()) -> list[ManifestSummary]:
    """One summary per abandoned manifest (for `ckpt list --all`): the moved copies, and `not_moved`
    ones still in manifests/; each names the rollback that abandoned it."""
    number = {(step, c): r.number for r in read_records(store) for step, sums in r.abandoned.items() for c in sums}
    names = sorted(store._fs.list_files(LINEAGE_DIR))
    out = [replace(ManifestSummary.of(m), abandoned_by=number.get((m.step, m.checksum), 0)) for m in not_moved
           if f"{m.step:012d}-{m.checksum}.json" not in names]
    for name in names:
        match = _COPY_NAME.match(name)
        if not match:
            continue
        step, where = int(match.group(1)), f"{store.location}/{LINEAGE_DIR}/{name}"
        try:
            summary = ManifestSummary.of(parse_manifest(store._fs.read(f"{LINEAGE_DIR}/{name}"), where))
        except (ManifestError, FileNotFoundError) as exc:
            summary = ManifestSummary(step, None, 0, 0, {}, valid=False, problem=str(exc))
        out.append(replace(summary, abandoned_by=number.get((step, match.group(2)), 0)))
    return out


def abandoned_chunk_refs(store: CheckpointStore) -> set[str]:
    """Chunks named by moved abandoned manifests: gc keeps them, so the copies stay inspectable."""
    refs: set[str] = set()
    for name in store._fs.list_files(LINEAGE_DIR):
        if _COPY_NAME.match(name):
            try:
                refs.update(parse_manifest(store._fs.read(f"{LINEAGE_DIR}/{name}"), name).chunk_refs())
            except (ManifestError, FileNotFoundError):
                continue
    return refs


def rollback_targets(store: CheckpointStore) -> set[int]:
    """Steps that rollbacks went back to: retention never deletes them."""
    return {record.target_step for record in read_records(store)}


def pending_rollback(records: Iterable[RollbackRecord], meta: dict) -> RollbackRecord | None:
    """The newest rollback that a checkpoint with this `meta` predates (it was saved with fewer
    rollbacks counted): resuming from it must continue that rollback's trajectory."""
    counted = int((meta.get("guard") or {}).get("rollbacks", 0))
    later = [r for r in records if r.number > counted]
    return max(later, key=lambda r: r.number) if later else None


def sync_records(source: CheckpointStore, target: CheckpointStore) -> None:
    """Give `target` (a replica) the rollback records it lacks and move its abandoned manifests aside,
    so its copies of the diverged trajectory neither get chosen nor block the new checkpoints."""
    have = set(target._fs.list_files(LINEAGE_DIR))
    missing = [n for n in source._fs.list_files(LINEAGE_DIR) if _RECORD_NAME.match(n) and n not in have]
    for name in sorted(missing):
        target._fs.write_atomic(f"{LINEAGE_DIR}/{name}", source._fs.read(f"{LINEAGE_DIR}/{name}"))
    if missing:
        complete_moves(target)
