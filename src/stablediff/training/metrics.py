"""`RUN_DIR/metrics.jsonl`: one JSON object per logged step, appended and flushed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


class MetricsLog:
    def __init__(self, path: Path, mirror: Callable[[dict], None] | None = None) -> None:
        """`mirror` also receives every record (the TensorBoard writer)."""
        self.path, self.mirror = path, mirror
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **fields: object) -> None:
        record = {"time": round(time.time(), 3), **fields}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.mirror is not None:
            self.mirror(record)
