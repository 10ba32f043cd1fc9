"""`RUN_DIR/metrics.jsonl`: one JSON object per logged step, appended and flushed."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **fields: object) -> None:
        record = {"time": round(time.time(), 3), **fields}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
