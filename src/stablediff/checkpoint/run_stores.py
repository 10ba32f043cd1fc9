"""Where a run's checkpoints live: RUN_DIR/checkpoints and the replicas its config names.

One place reads a run's replicas, so training, export and the `ckpt` commands
agree on which stores are fallbacks for a damaged chunk. A finished or
stopped run is read through its RUN_DIR/config.yaml (the config in use).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from .store import CheckpointStore

PRIMARY = "checkpoints"  # RUN_DIR/checkpoints: the primary store


def configured_replicas(run_dir: str | Path) -> list[str]:
    """The `checkpoint.replicas` of RUN_DIR/config.yaml ([] when the run has no config yet)."""
    path = Path(run_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return list(((config or {}).get("checkpoint") or {}).get("replicas") or [])


def run_stores(run_dir: str | Path, replicas: Iterable[str] | None = None) -> tuple[CheckpointStore, list[CheckpointStore]]:
    """The primary store and the replicas (`replicas`, or those RUN_DIR/config.yaml names)."""
    locations = configured_replicas(run_dir) if replicas is None else list(replicas)
    return CheckpointStore(Path(run_dir) / PRIMARY), [CheckpointStore(r) for r in locations]
