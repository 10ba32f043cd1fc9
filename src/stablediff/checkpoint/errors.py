"""Errors of the checkpoint store. Each message says what is wrong and what to do."""

from __future__ import annotations

from stablediff.errors import CheckpointError


class ManifestError(CheckpointError):
    """A manifest is unreadable, truncated or fails its checksum."""


class ChunkError(CheckpointError):
    """A chunk is missing, has the wrong size or does not match its hash."""

    def __init__(self, chunk_hash: str, problem: str):
        super().__init__(f"chunk {chunk_hash[:12]}… is {problem}")
        self.chunk_hash = chunk_hash
        self.problem = problem
