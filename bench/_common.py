"""What every benchmark shares: the machine's description and where results go."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> str:
    import torch

    return f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}"


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>-<time>.json, with the machine and date added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out
