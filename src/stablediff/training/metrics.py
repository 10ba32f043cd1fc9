"""`RUN_DIR/metrics.jsonl`: one JSON object per logged step, appended and flushed.

A resumed run redoes the steps after its checkpoint, so `rewind` first drops
what the killed run logged past that point: the file then reads as if the run
had never stopped (each step once), and the rewrite is atomic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from stablediff.io.atomic import replace_atomic
from stablediff.io.run_files import cut_torn_tail, read_lines

# Stages in the order a run does them; a record without "stage" (an event) belongs to stage 2.
STAGE_ORDER = {"vae": 0, "unet": 1}
DEFAULT_STAGE = "unet"


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

    def has_event(self, event: dict) -> bool:
        """Whether a record with these fields (whatever its time) is in the log already."""
        return any(record is not None and {k: record.get(k) for k in event} == event
                   for _, record in read_lines(self.path))

    def rewind(self, stage: str | None, step: int | None) -> int:
        """Drop every record after the last one at or before (`stage`, `step`), the checkpoint resumed from.

        File order, not step values, decides: a divergence rollback logs steps again
        after its event, and those earlier records stay. `stage=None` (no checkpoint:
        the run starts over) drops everything. Returns how many lines were dropped.
        """
        lines = read_lines(self.path)
        keep = 0
        if stage is not None:
            for index, (_, record) in enumerate(lines):
                if record is not None and _at_or_before(record, stage, step):
                    keep = index + 1
        if keep == len(lines):
            cut_torn_tail(self.path)
            return 0
        replace_atomic(self.path, b"".join(line for line, _ in lines[:keep]))
        return len(lines) - keep


def _at_or_before(record: dict, stage: str, step: int | None) -> bool:
    order = STAGE_ORDER.get(str(record.get("stage") or DEFAULT_STAGE), STAGE_ORDER[DEFAULT_STAGE])
    target = STAGE_ORDER.get(stage, STAGE_ORDER[DEFAULT_STAGE])
    if order != target:
        return order < target
    logged = record.get("step")
    if not isinstance(logged, int):
        return True
    if record.get("event") == "resumed":  # names the step resumed from, but is written after the next one
        logged += 1
    return step is None or logged <= step
