"""The known-good guard: retention deletes a checkpoint only while a newer kept one is known good.

A manifest that parses says nothing about its chunks. Without this guard, newer
checkpoints whose chunks went missing or bad would still count as "the last
`keep_last`", and retention would delete the older ones — the only ones left
that load. The anchor is the newest kept checkpoint whose every chunk is present
with its size and which is deep-verified: each chunk written, compared or
re-hashed by this process (re-hashed here if not yet). Only checkpoints older than
the anchor may go; the others are held back, with the reason, until a newer good
checkpoint exists.

In the trainer the newest kept checkpoint is the one it just wrote, so the guard
costs one listing and no reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from .errors import CheckpointError, ChunkError

if TYPE_CHECKING:
    from .store import CheckpointStore


@dataclass
class GuardDecision:
    delete: list[int]
    held_back: list[int] = field(default_factory=list)
    anchor: int | None = None  # the newest kept checkpoint known good
    problems: list[str] = field(default_factory=list)  # why newer kept ones are not

    def reason(self, location: str) -> str | None:
        """One line for the log when deletions were held back."""
        if not self.held_back:
            return None
        steps = ", ".join(map(str, self.held_back))
        found = "; ".join(self.problems) or "none of them is known good"
        if self.anchor is None:
            why = f"no kept checkpoint is known good ({found})"
        else:
            why = f"they are newer than step {self.anchor}, the newest kept checkpoint known good ({found})"
        return (f"retention held back deleting step {steps} of {location}: {why}. Run `stablediff ckpt "
                f"verify` and `stablediff ckpt repair` with a replica; the next good save releases them")


def guard_deletions(store: CheckpointStore, to_delete: Iterable[int], kept: Iterable[int]) -> GuardDecision:
    """Split `to_delete` into what may go now and what is held back (see the module doc)."""
    to_delete = sorted(to_delete)
    if not to_delete:
        return GuardDecision([])
    sizes = store.object_sizes()
    decision = GuardDecision([])
    for step in sorted(kept, reverse=True):
        problem = why_not_known_good(store, step, sizes)
        if problem is None:
            decision.anchor = step
            break
        decision.problems.append(f"step {step}: {problem}")
    anchor = decision.anchor
    decision.delete = [s for s in to_delete if anchor is not None and s < anchor]
    decision.held_back = [s for s in to_delete if anchor is None or s >= anchor]
    return decision


def why_not_known_good(store: CheckpointStore, step: int, sizes: dict[str, int]) -> str | None:
    """None when every chunk of `step` is present with its size and known good (re-hashing
    the ones this process has not checked yet); otherwise what is wrong."""
    try:
        refs = store.read_manifest(step).chunk_refs()
    except CheckpointError as exc:  # corrupt, or deleted meanwhile
        return str(exc)
    for digest, size in refs.items():
        actual = sizes.get(digest)
        if actual != size:
            return f"chunk {digest[:12]}… is " + ("missing" if actual is None else f"{actual} bytes, expected {size}")
    for digest, size in refs.items():
        if digest not in store.known_good:
            try:
                store.read_chunk(digest, size)  # verified against its hash, then known good
            except ChunkError as exc:
                return str(exc)
    return None
