"""Loading with verification and fallback.

Every chunk is checked against its hash as it is read. A bad chunk is taken
from the first fallback store (a replica) that has a good copy; only when no
copy is good is the whole checkpoint skipped for an older one. The result says
what was skipped and what was recovered, so the CLI can tell the user.
Checkpoints that a divergence rollback abandoned (lineage.py) are passed over,
in every store, without being counted as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._codec import as_torch, empty_bytes
from .errors import CheckpointError, ChunkError, ManifestError
from .lineage import abandoned_index, is_abandoned
from .manifest import Manifest

if TYPE_CHECKING:
    from .store import CheckpointStore


@dataclass(frozen=True)
class SkippedCheckpoint:
    step: int
    reason: str


@dataclass(frozen=True)
class Recovery:
    """Something damaged in the primary store that was read from a fallback instead."""

    item: str  # "manifest" or "chunk <hash>"
    tensor: str | None
    source: str  # location of the store that had a good copy
    problem: str  # what was wrong with the primary's copy


@dataclass
class LoadedCheckpoint:
    step: int
    tensors: dict[str, Any]  # name -> torch.Tensor
    meta: dict[str, Any]
    metrics: dict[str, float]
    manifest: Manifest
    skipped: list[SkippedCheckpoint] = field(default_factory=list)
    recovered: list[Recovery] = field(default_factory=list)

    def notes(self) -> list[str]:
        """Lines for the user about what loading had to work around."""
        lines = [f"skipped step {s.step}: {s.reason}" for s in self.skipped]
        for r in self.recovered:
            what = f"{r.item} of tensor '{r.tensor}'" if r.tensor else f"{r.item} of step {self.step}"
            lines.append(f"{what} was {r.problem}; used the copy in {r.source}")
        return lines


def load_checkpoint(
    store: CheckpointStore, step: int | None, device: str, fallbacks: list[CheckpointStore]
) -> LoadedCheckpoint:
    stores = [store, *fallbacks]
    abandoned = abandoned_index(stores)  # a divergence rollback's diverged trajectory: never chosen
    if step is not None:
        return _load_given_step(stores, step, device, abandoned)
    candidates = sorted({s for st in stores for s in _steps_or_empty(st, st is store)}, reverse=True)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint in {store.location} (no manifests/ entries). Check the path, "
            f"or start the run from scratch."
        )
    skipped: list[SkippedCheckpoint] = []
    for candidate in candidates:
        try:
            loaded = _load_step(stores, candidate, device, abandoned)
        except AbandonedCheckpoint:
            continue  # not damaged: set aside on purpose, so not reported as skipped
        except CheckpointError as exc:
            skipped.append(SkippedCheckpoint(candidate, str(exc)))
            continue
        loaded.skipped = skipped
        return loaded
    if not skipped:
        raise CheckpointError(f"every checkpoint in {store.location} was abandoned by a divergence rollback; "
                              "`stablediff ckpt list --all` shows them. Start the run from scratch.")
    reasons = "; ".join(f"step {s.step}: {s.reason}" for s in skipped[:5])
    raise CheckpointError(
        f"all {len(skipped)} checkpoints in {store.location} failed verification ({reasons}). "
        f"Run `stablediff ckpt verify` for details and `stablediff ckpt repair` with a replica."
    )


def _load_given_step(stores: list[CheckpointStore], step: int, device: str,
                     abandoned: dict[int, set[str]]) -> LoadedCheckpoint:
    store = stores[0]
    if not any(step in _steps_or_empty(s, s is store) for s in stores):
        raise CheckpointError(_abandoned_message(store, step) if step in abandoned
                              else store._unknown_step_message(step))
    try:
        return _load_step(stores, step, device, abandoned)
    except AbandonedCheckpoint:
        raise CheckpointError(_abandoned_message(store, step)) from None
    except CheckpointError as exc:
        raise CheckpointError(
            f"checkpoint step {step} in {store.location} cannot be loaded: {exc}. "
            f"Run `stablediff ckpt repair` with a replica, or load another step."
        ) from exc


def _steps_or_empty(store: CheckpointStore, is_primary: bool) -> list[int]:
    # An unreachable replica must not stop a load; an unreachable primary must.
    try:
        return store.steps()
    except OSError:
        if is_primary:
            raise
        return []


class AbandonedCheckpoint(CheckpointError):
    """The manifest belongs to the trajectory a divergence rollback abandoned."""


def _abandoned_message(store: CheckpointStore, step: int) -> str:
    return (f"checkpoint step {step} in {store.location} belongs to a trajectory abandoned by a divergence "
            f"rollback; it is kept for inspection (`stablediff ckpt list --all` shows it) but is never loaded. "
            f"Load another step, or omit the step to load the newest.")


def _load_step(stores: list[CheckpointStore], step: int, device: str,
               abandoned: dict[int, set[str]]) -> LoadedCheckpoint:
    recovered: list[Recovery] = []
    manifest = _read_manifest(stores, step, recovered)
    if is_abandoned(abandoned, step, manifest.checksum):
        raise AbandonedCheckpoint(f"step {step} was abandoned by a divergence rollback")
    tensors = {}
    for name, entry in manifest.tensors.items():
        raw = empty_bytes(entry.nbytes)  # flat uint8 tensor, filled chunk by chunk
        view = memoryview(raw.numpy())
        offset = 0
        for digest, size in zip(entry.chunks, entry.chunk_sizes(manifest.chunk_bytes)):
            _read_chunk(stores, digest, view[offset : offset + size], name, recovered)
            offset += size
        tensors[name] = as_torch(raw, entry.dtype, list(entry.shape), device)
    return LoadedCheckpoint(step, tensors, manifest.meta, manifest.metrics, manifest, recovered=recovered)


def _read_manifest(stores: list[CheckpointStore], step: int, recovered: list[Recovery]) -> Manifest:
    problems = []
    for store in stores:
        try:
            manifest = store.read_manifest(step)
        except (CheckpointError, OSError) as exc:
            problems.append(exc)
            continue
        if problems:
            recovered.append(Recovery("manifest", None, store.location, _describe(problems[0])))
        return manifest
    raise problems[0] if isinstance(problems[0], CheckpointError) else CheckpointError(str(problems[0]))


def _read_chunk(
    stores: list[CheckpointStore], digest: str, out: memoryview, tensor: str, recovered: list[Recovery]
) -> None:
    first_problem: ChunkError | None = None
    for store in stores:
        try:
            store.read_chunk_into(digest, out)
        except ChunkError as exc:
            first_problem = first_problem or exc
            continue
        except OSError as exc:  # unreachable replica, I/O error: try the next copy
            first_problem = first_problem or ChunkError(digest, f"unreadable ({exc})")
            continue
        if first_problem is not None:
            recovered.append(Recovery(f"chunk {digest[:12]}…", tensor, store.location, first_problem.problem))
        return
    assert first_problem is not None
    tail = " and no replica has a good copy" if len(stores) > 1 else ""
    raise CheckpointError(f"chunk {digest[:12]}… of tensor '{tensor}' is {first_problem.problem}{tail}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ManifestError):
        return "corrupt or truncated"
    if isinstance(exc, CheckpointError):  # the only other one read_manifest raises: no such step
        return "missing"
    return f"unreadable ({exc})"
