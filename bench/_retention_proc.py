"""Crash-campaign writer for retention: saves, then runs retention, forever, until SIGKILLed.

    python bench/_retention_proc.py PRIMARY

Each step is saved synchronously and then retention runs; the process prints
"R" (flushed) just before retention starts, so the killer can aim its SIGKILL
into the deletion of manifests and chunks rather than at a random instant.
The contents of each step are those of the store crash test's writer
(`expected_state`), so the checker can tell a torn checkpoint from a good one.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablediff.checkpoint import RetentionPolicy  # noqa: E402
from tests.checkpoint._writer_proc import CHUNK_BYTES, expected_meta, expected_state, val_loss  # noqa: E402

POLICY = RetentionPolicy(keep_last=2, keep_best=1)


def main(primary_dir: str) -> None:
    from stablediff.checkpoint import CheckpointStore

    primary = CheckpointStore(primary_dir, chunk_bytes=CHUNK_BYTES)
    step = max(primary.steps(), default=0)
    print("ready", flush=True)
    while True:
        step += 1
        primary.save(step, expected_state(step), expected_meta(step), {"val_loss": val_loss(step)})
        print("R", flush=True)
        POLICY.apply(primary)


if __name__ == "__main__":
    main(sys.argv[1])
