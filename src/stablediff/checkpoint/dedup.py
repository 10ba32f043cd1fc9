"""Deduplication that heals: a chunk already in `objects/` is reused only once this
process knows it is good.

A chunk's size says nothing about bit rot, and a chunk shared by every checkpoint
(a frozen VAE, the base under a LoRA) would otherwise carry one flipped bit into
every checkpoint written after it. So the first time a process reuses a chunk, it
compares the bytes on disk with the bytes it is about to save — the same bytes,
since the name is their hash; a compare is cheaper than re-hashing — and rewrites
the chunk from memory (atomically, like any chunk) when they differ. The store
remembers every chunk this process wrote, compared or read and verified, so later
saves pay nothing for them. A reuse also touches the chunk, because gc's grace
period counts from a chunk's last reference — but only once its mtime is older
than TOUCH_AFTER_S: a utime per chunk per save dirties thousands of inodes, which
every later fsync then has to write (it made saves of the tiny model ~1.6x slower).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import CheckpointStore

# A chunk reused by a save is at most this much older than the save, so gc's
# default grace (an hour) still spares it for 50 minutes of a save in flight.
TOUCH_AFTER_S = 600.0


@dataclass
class ChunkCounts:
    """What one save did with its chunks."""

    written: int = 0  # new chunks
    bytes_new: int = 0
    reused: int = 0  # already present and known good (or checked now)
    checked: int = 0  # of those, compared with the bytes in memory by this save
    bytes_checked: int = 0
    check_s: float = 0.0  # time spent reading and comparing them
    healed: list[str] = field(default_factory=list)  # present but damaged: rewritten from memory
    bytes_healed: int = 0


class ChunkPlacer:
    """Puts the chunks of one save into a store: write new ones, check and reuse, or heal."""

    def __init__(self, store: CheckpointStore, existing: dict[str, tuple[int, float]]):
        self.store = store
        self.existing = existing  # hash -> (size, mtime) on disk, from one listing
        self.touch_before = time.time() - TOUCH_AFTER_S
        self.counts = ChunkCounts()
        self.written: list[str] = []  # their directories are fsynced once, in `finish`
        self._scratch: bytearray | None = None  # one read buffer for every full-sized chunk compared

    def place(self, digest: str, piece: memoryview) -> None:
        size, mtime = self.existing.get(digest, (None, 0.0))
        if size == len(piece) and self._reusable(digest, piece, mtime):
            self.counts.reused += 1
            return
        self.store.put_chunk(digest, piece, sync_dir=False)
        self.existing[digest] = (len(piece), math.inf)  # just written: young
        self.written.append(digest)
        if size is None:
            self.counts.written += 1
            self.counts.bytes_new += len(piece)
        else:  # present, but damaged or of the wrong size
            self.counts.healed.append(digest)
            self.counts.bytes_healed += len(piece)

    def _reusable(self, digest: str, piece: memoryview, mtime: float) -> bool:
        known = self.store.known_good
        if digest not in known and self.store.check_reused:
            self.counts.checked += 1
            self.counts.bytes_checked += len(piece)
            if self._scratch is None:
                self._scratch = bytearray(self.store.chunk_bytes)
            started = time.perf_counter()
            same = self.store.same_bytes_on_disk(digest, piece, self._scratch)
            self.counts.check_s += time.perf_counter() - started
            if not same:
                known.discard(digest)
                return False
            known.add(digest)
        if mtime >= self.touch_before:
            return True
        # A chunk removed since the listing is written again rather than referenced.
        return self.store.touch_chunk(digest)

    def finish(self) -> None:
        """Make the renames of every written chunk durable (call before the manifest)."""
        self.store.sync_object_dirs(self.written)
