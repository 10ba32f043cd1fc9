"""Crash-safe, content-addressed checkpoints (see DESIGN.md, "Checkpoint store — the invariants").

    store = CheckpointStore("runs/x/checkpoints")          # or any fsspec URL
    with AsyncCheckpointer(store, replicas=[CheckpointStore("s3://b/x")],
                           retention=RetentionPolicy(keep_last=3, keep_best=1)) as ckpt:
        ckpt.snapshot_and_save(step, tensors, meta, metrics)
    loaded = store.load()                                    # newest that verifies
"""

from .errors import CheckpointError, ChunkError, ManifestError
from .verified_load import LoadedCheckpoint, Recovery, SkippedCheckpoint
from .manifest import Manifest, ManifestSummary, TensorEntry
from .replicate import RepairReport, SyncReport, repair, sync
from .retention import DEFAULT_GC_GRACE_S, GcReport, RetentionPolicy, RetentionReport, gc, select_to_delete
from .store import DEFAULT_CHUNK_BYTES, CheckpointStore
from .verify import ChunkProblem, VerifyReport
from .writer import AsyncCheckpointer, SaveStats

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_GC_GRACE_S",
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointStore",
    "ChunkError",
    "ChunkProblem",
    "GcReport",
    "LoadedCheckpoint",
    "Manifest",
    "ManifestError",
    "ManifestSummary",
    "Recovery",
    "RepairReport",
    "RetentionPolicy",
    "RetentionReport",
    "SaveStats",
    "SkippedCheckpoint",
    "SyncReport",
    "TensorEntry",
    "VerifyReport",
    "gc",
    "repair",
    "select_to_delete",
    "sync",
]
