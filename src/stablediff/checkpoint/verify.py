"""`verify`: check a store without loading it into memory.

Shallow (`ckpt verify --quick`, `ckpt list`): every manifest passes its checksum
and every chunk it names exists with the right size (a listing, no reads). Deep
(`ckpt verify`): every chunk is also read and re-hashed, which finds bit rot that
leaves the size unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ChunkError, ManifestError

if TYPE_CHECKING:
    from .store import CheckpointStore


@dataclass(frozen=True)
class ChunkProblem:
    chunk_hash: str
    expected_size: int
    problem: str  # "missing", "truncated or the wrong size (...)", "corrupt (...)"
    steps: tuple[int, ...]  # checkpoints that need this chunk


@dataclass
class VerifyReport:
    location: str
    deep: bool
    steps_ok: list[int] = field(default_factory=list)
    bad_manifests: dict[int, str] = field(default_factory=dict)
    chunk_problems: list[ChunkProblem] = field(default_factory=list)
    chunks_checked: int = 0
    orphan_chunks: int = 0  # referenced by no manifest; `gc` removes them
    temp_files: int = 0  # left by interrupted writes; ignored by readers, removed by `gc`

    @property
    def ok(self) -> bool:
        return not self.bad_manifests and not self.chunk_problems

    def chunk_problems_of(self, step: int) -> list[ChunkProblem]:
        return [p for p in self.chunk_problems if step in p.steps]

    @property
    def damaged_steps(self) -> list[int]:
        steps = set(self.bad_manifests)
        for problem in self.chunk_problems:
            steps.update(problem.steps)
        return sorted(steps)

    def lines(self) -> list[str]:
        """Human-readable findings, one per line, for `ckpt verify`."""
        out = [f"step {step}: {reason}" for step, reason in sorted(self.bad_manifests.items())]
        for p in self.chunk_problems:
            steps = ", ".join(map(str, p.steps))
            out.append(f"chunk {p.chunk_hash[:12]}… ({p.expected_size} bytes) is {p.problem}; needed by step {steps}")
        how = "checked by re-hashing" if self.deep else "checked for presence and size only"
        leftovers = " (left by interrupted saves; `stablediff ckpt gc` removes them)"
        # The summary stays the last line: the crash campaign reads every line before it as a finding.
        out.append(
            f"verify of {self.location}: {len(self.steps_ok)} checkpoints ok, "
            f"{len(self.damaged_steps)} damaged, {self.chunks_checked} chunks {how}, "
            f"{self.orphan_chunks} unreferenced chunks, {self.temp_files} temp files"
            + (leftovers if self.orphan_chunks or self.temp_files else "")
        )
        return out


def verify_store(store: CheckpointStore, deep: bool) -> VerifyReport:
    report = VerifyReport(store.location, deep)
    needed: dict[str, tuple[int, set[int]]] = {}  # hash -> (size, steps)
    steps = store.steps()
    for step in steps:
        try:
            manifest = store.read_manifest(step)
        except ManifestError as exc:
            report.bad_manifests[step] = str(exc)
            continue
        for digest, size in manifest.chunk_refs().items():
            needed.setdefault(digest, (size, set()))[1].add(step)
    objects, temps = store.scan_objects()
    report.temp_files = len(temps)
    report.orphan_chunks = len(set(objects) - set(needed))
    for digest, (size, users) in sorted(needed.items()):
        problem = _check_chunk(store, digest, size, objects, deep)
        report.chunks_checked += 1
        if problem:
            report.chunk_problems.append(ChunkProblem(digest, size, problem, tuple(sorted(users))))
    damaged = set(report.damaged_steps)
    report.steps_ok = [s for s in steps if s not in damaged]
    return report


def _check_chunk(
    store: CheckpointStore, digest: str, size: int, objects: dict[str, tuple[int, float]], deep: bool
) -> str | None:
    if digest not in objects:
        return "missing"
    actual = objects[digest][0]
    if actual != size:
        return f"truncated or the wrong size ({actual} bytes, expected {size})"
    if deep:
        try:
            store.read_chunk(digest, size)
        except ChunkError as exc:
            return exc.problem
    return None
