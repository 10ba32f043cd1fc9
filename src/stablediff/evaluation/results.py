"""eval.json's results: per checkpoint, per metric, cached by (checkpoint identity, metric, settings).

The file (io/run_files.py reads and writes it atomically) holds

    {"best": {"step", "metric", "mode", "value"},
     "checkpoints": {"<step>": {"checkpoint": "<manifest checksum>",
                                "metrics": {"fd": {"value", "spread", "count", "seconds", "settings", ...}}}},
     "models": {"<path>": {"checkpoint": "<weights identity>", "metrics": {...}}}}

"checkpoints" are a run's steps; "models" are diffusers folders or single files evaluated with
`--out`. A result is reused only while its step still holds the same checkpoint (a step that
was saved again, after a rollback say, has another manifest checksum) and its settings are
equal; a step whose checkpoint changed loses its old results. Writing one checkpoint's results
keeps every other entry, "best" included.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from stablediff.evaluation.metric_result import MetricResult
from stablediff.io.run_files import read_eval, update_eval
from stablediff.run_schema import METRIC_MODES

CHECKPOINTS = "checkpoints"
MODELS = "models"


def cached_result(data: Mapping, section: str, key: str, identity: str, name: str,
                  settings: Mapping) -> MetricResult | None:
    """The stored result of metric `name` for entry `key`, if it was computed on this checkpoint with
    these settings."""
    entry = (data.get(section) or {}).get(key)
    if not isinstance(entry, dict) or entry.get("checkpoint") != identity:
        return None
    stored = (entry.get("metrics") or {}).get(name)
    if not isinstance(stored, dict) or stored.get("settings") != dict(settings) or "value" not in stored:
        return None
    return MetricResult.from_json(name, stored)


def record_results(out_dir: Path, section: str, key: str, identity: str, results: Mapping[str, MetricResult]) -> dict:
    """Store `results` for entry `key` (merged with its other metrics while the checkpoint is the same);
    returns the file's new contents."""
    data = read_eval(out_dir)
    entries = dict(data.get(section) or {})
    entry = entries.get(key)
    same = isinstance(entry, dict) and entry.get("checkpoint") == identity
    metrics = dict(entry.get("metrics") or {}) if same else {}
    metrics.update({name: result.to_json() for name, result in results.items()})
    entries[key] = {"checkpoint": identity, "metrics": metrics}
    if section == CHECKPOINTS:
        entries = dict(sorted(entries.items(), key=lambda item: _step_order(item[0])))
    update_eval(out_dir, **{section: entries})
    return {**data, section: entries}


def best_mark(data: Mapping, metric: str, identities: Mapping[int, str]) -> dict | None:
    """{"step", "metric", "mode", "value"} of the best checkpoint by `metric` (its direction from
    METRIC_MODES) among `identities` {step: checkpoint identity} that have a result for it; the earlier
    step wins a tie. None when no checkpoint has one."""
    mode = METRIC_MODES[metric]
    candidates = []
    for step, identity in identities.items():
        entry = (data.get(CHECKPOINTS) or {}).get(str(step))
        if not isinstance(entry, dict) or entry.get("checkpoint") != identity:
            continue
        value = ((entry.get("metrics") or {}).get(metric) or {}).get("value")
        if isinstance(value, (int, float)) and math.isfinite(value):
            candidates.append((value if mode == "min" else -value, step, value))
    if not candidates:
        return None
    _, step, value = min(candidates)
    return {"step": step, "metric": metric, "mode": mode, "value": value}


def computed_metrics(data: Mapping, identities: Mapping[int, str]) -> set[str]:
    """The metrics some current checkpoint has a result for."""
    names: set[str] = set()
    for step, identity in identities.items():
        entry = (data.get(CHECKPOINTS) or {}).get(str(step))
        if isinstance(entry, dict) and entry.get("checkpoint") == identity:
            names |= set(entry.get("metrics") or {})
    return names


def _step_order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 62, key)
