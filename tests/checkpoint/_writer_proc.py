"""Crash-test writer: saves deterministic checkpoints forever until it is SIGKILLed.

    python _writer_proc.py PRIMARY REPLICA

Runs the real AsyncCheckpointer (retention and a replica included) and prints
"ready" once it starts saving. The contents of each step are a pure function of
the step (`expected_state`), so a checker can tell a torn checkpoint from a good one.
Deliberately imports no torch: the process must start fast to be killed often.
"""

from __future__ import annotations

import sys

import numpy as np

from stablediff.checkpoint import AsyncCheckpointer, CheckpointStore, RetentionPolicy

CHUNK_BYTES = 64 * 1024


def expected_state(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "frozen": np.random.default_rng(12345).random(40_000, np.float32),  # never changes: dedup
        "unet": rng.random(30_000, np.float32),  # ~8 chunks of new bytes per step
        "optimizer.step": np.array([step], np.int64),
        "mask": rng.random(1000) > 0.5,
    }


def expected_meta(step: int) -> dict:
    return {"step": step, "sampler": {"epoch": step // 7, "index": step % 7}}


def val_loss(step: int) -> float:
    return 1.0 + ((step * 7919) % 13) / 13.0  # wanders, so keep_best has work to do


def open_stores(primary: str, replica: str) -> tuple[CheckpointStore, CheckpointStore]:
    return CheckpointStore(primary, chunk_bytes=CHUNK_BYTES), CheckpointStore(replica, chunk_bytes=CHUNK_BYTES)


def main(primary_dir: str, replica_dir: str) -> None:
    primary, replica = open_stores(primary_dir, replica_dir)
    step = max(primary.steps(), default=0)
    policy = RetentionPolicy(keep_last=2, keep_best=1)
    with AsyncCheckpointer(primary, [replica], retention=policy, log=lambda m: None) as ckpt:
        print("ready", flush=True)
        while True:
            step += 1
            ckpt.snapshot_and_save(step, expected_state(step), expected_meta(step), {"val_loss": val_loss(step)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
