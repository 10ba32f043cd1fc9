"""Replicas: `sync` one store into another, and `repair` a primary from its replicas.

A replica is an independent store with its own commit points, so syncing uses
the same order as a save: first every chunk a manifest names (verified against
its hash as it is read from the source), then the manifest itself. A
checkpoint whose source copy is damaged is not propagated. A target that
belongs to another run (its `owner.json`) is refused, never shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from .errors import CheckpointError, ChunkError, ManifestError
from .lineage import sync_records
from .manifest import Manifest, parse_manifest
from .ownership import check_sync_target

if TYPE_CHECKING:
    from .store import CheckpointStore


@dataclass
class SyncReport:
    source: str
    target: str
    steps_copied: list[int] = field(default_factory=list)
    chunks_copied: int = 0
    bytes_copied: int = 0
    chunks_healed: int = 0  # damaged target chunks rewritten from the source
    problems: list[str] = field(default_factory=list)  # checkpoints that could not be copied

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    fixed: list[str] = field(default_factory=list)
    unfixable: list[str] = field(default_factory=list)
    syncs: list[SyncReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unfixable and all(s.ok for s in self.syncs)

    def lines(self) -> list[str]:
        out = [f"fixed: {line}" for line in self.fixed]
        out += [f"NOT fixed: {line}" for line in self.unfixable]
        for s in self.syncs:
            out.append(
                f"synced {s.target}: {len(s.steps_copied)} manifests, {s.chunks_copied} chunks "
                f"({s.bytes_copied} bytes) copied"
                + (f", {s.chunks_healed} damaged chunks rewritten" if s.chunks_healed else "")
            )
            out += [f"NOT synced to {s.target}: {p}" for p in s.problems]
        return out


class _ChunkCopier:
    """Copies chunks into `target` that it lacks or holds damaged.

    A target chunk of the right size is trusted only once this process knows it is
    good (the target store's `known_good`: written or verified by it); the first
    reuse re-reads and checks it, so a flipped bit in a chunk every replica
    checkpoint shares is rewritten from the source instead of being referenced
    forever. Deep: every chunk is re-checked, known or not.
    """

    def __init__(self, source: CheckpointStore, target: CheckpointStore, deep: bool, report: SyncReport):
        self.source, self.target, self.deep, self.report = source, target, deep, report
        self.target_sizes = target.object_sizes()
        self.checked: set[str] = set()  # by this sync (deep re-checks even known-good chunks once)

    def _target_has(self, digest: str, size: int) -> bool:
        if self.target_sizes.get(digest) != size:
            return False
        known = digest in self.checked or (digest in self.target.known_good and not self.deep)
        if not known:
            try:
                self.target.read_chunk(digest, size)  # adds it to the target's known_good
            except ChunkError:
                self.report.chunks_healed += 1
                return False
        self.checked.add(digest)
        return True

    def copy_for(self, manifest: Manifest) -> None:
        """Make every chunk of `manifest` durable in the target; ChunkError if the source's is bad."""
        written = []
        try:
            for digest, size in manifest.chunk_refs().items():
                if self._target_has(digest, size):
                    continue
                data = self.source.read_chunk(digest, size)  # verified against its hash
                self.target.put_chunk(digest, data, sync_dir=False)
                self.target_sizes[digest] = size
                self.checked.add(digest)
                written.append(digest)
                self.report.chunks_copied += 1
                self.report.bytes_copied += size
        finally:
            self.target.sync_object_dirs(written)


def sync(source: CheckpointStore, target: CheckpointStore, *, deep: bool = False) -> SyncReport:
    """Copy into `target` every checkpoint of `source` it lacks or holds in another version, oldest first.

    A target chunk counts as present once this process has checked it (the first
    reuse re-reads it; a damaged one is rewritten from the source). Deep: every
    target chunk and manifest is re-read and re-checked, and damaged ones replaced.
    Raises OSError when the target cannot be written and StoreOwnedByAnotherRun
    when it is another run's; damaged source data is reported in `problems` instead.
    """
    check_sync_target(source, target)
    report = SyncReport(source.location, target.location)
    sync_records(source, target)  # first: the target's abandoned manifests move aside before new steps come
    copier = _ChunkCopier(source, target, deep, report)
    target_steps = set(target.steps())
    for step in source.steps():
        try:
            raw = source.read_manifest_bytes(step)
            manifest = parse_manifest(raw, f"{source.location}/{source.manifest_rel(step)}")
            copier.copy_for(manifest)
        except ManifestError as exc:
            report.problems.append(f"step {step} not copied: {exc}")
            continue
        except ChunkError as exc:
            report.problems.append(f"step {step} not copied: the source's {exc}; run `stablediff ckpt repair`")
            continue
        except CheckpointError:  # the manifest was deleted while we listed
            continue
        # A step saved again (stage 1 is always step 0) has a new manifest: compare, not just list.
        if step not in target_steps or not _same_manifest(target, step, raw):
            target.write_manifest(raw, step)
            report.steps_copied.append(step)
    return report


def _same_manifest(target: CheckpointStore, step: int, raw: bytes) -> bool:
    try:
        return target.read_manifest_bytes(step) == raw
    except CheckpointError:
        return False


def repair(primary: CheckpointStore, replicas: Iterable[CheckpointStore]) -> RepairReport:
    """Restore the primary's damaged manifests and chunks from any replica with a good
    copy, then bring every replica in sync with the repaired primary."""
    report = RepairReport()
    replicas = _own_replicas(primary, replicas, report)
    verified = primary.verify(deep=True)
    if verified.bad_manifests:
        _restore_manifests(primary, replicas, verified.bad_manifests, report)
        verified = primary.verify(deep=True)  # restored manifests may name more chunks
    for problem in verified.chunk_problems:
        source = _restore_chunk(primary, replicas, problem.chunk_hash, problem.expected_size)
        steps = ", ".join(map(str, problem.steps))
        if source:
            report.fixed.append(f"chunk {problem.chunk_hash[:12]}… ({problem.problem}) restored from {source}")
        else:
            report.unfixable.append(
                f"chunk {problem.chunk_hash[:12]}… is {problem.problem} and no replica has a good copy; "
                f"step {steps} cannot be loaded (loading falls back to an older checkpoint)"
            )
    for replica in replicas:
        try:
            report.syncs.append(sync(primary, replica, deep=True))
        except Exception as exc:  # an unreachable replica is reported, never fatal
            report.unfixable.append(f"replica {replica.location} could not be synced: {exc!r}")
    return report


def _own_replicas(primary: CheckpointStore, replicas: Iterable[CheckpointStore],
                  report: RepairReport) -> list[CheckpointStore]:
    """The replicas repair may read and write: another run's store would restore that run's
    checkpoints into this one, so it is reported and left alone."""
    own = []
    for replica in replicas:
        try:
            check_sync_target(primary, replica)
        except CheckpointError as exc:  # another run's, or its owner file is unreadable
            report.unfixable.append(str(exc))
            continue
        except OSError:
            pass  # unreachable: its sync below reports it
        own.append(replica)
    return own


def _restore_manifests(
    primary: CheckpointStore, replicas: list[CheckpointStore], bad: dict[int, str], report: RepairReport
) -> None:
    for step, reason in sorted(bad.items()):
        for replica in replicas:
            try:
                raw = replica.read_manifest_bytes(step)
                parse_manifest(raw, f"{replica.location}/{replica.manifest_rel(step)}")
            except (CheckpointError, OSError):
                continue
            primary.write_manifest(raw, step)
            report.fixed.append(f"step {step}: manifest restored from {replica.location}")
            break
        else:
            report.unfixable.append(f"step {step}: {reason}; no replica has a good copy")


def _restore_chunk(primary: CheckpointStore, replicas: list[CheckpointStore], digest: str, size: int) -> str | None:
    for replica in replicas:
        try:
            data = replica.read_chunk(digest, size)
        except (ChunkError, OSError):
            continue
        primary.put_chunk(digest, data)
        return replica.location
    return None
