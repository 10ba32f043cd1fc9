"""Which checkpoint step an exported folder was made from, so `generate RUN_DIR` can tell a stale export.

The record is one small JSON file at the folder's root (diffusers ignores it):
`{"step": N, "weights": "ema"}`; no paths, since exports are shared.
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD_NAME = "stablediff_export.json"


def write_record(folder: Path, step: int, weights: str) -> None:
    (Path(folder) / RECORD_NAME).write_text(json.dumps({"step": int(step), "weights": weights}) + "\n")


def exported_step(folder: Path) -> int | None:
    """The step recorded in `folder`, or None (an export of an older version, or a damaged record)."""
    try:
        step = json.loads((Path(folder) / RECORD_NAME).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
