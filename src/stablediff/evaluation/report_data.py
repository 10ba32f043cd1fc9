"""What RUN_DIR/report.html shows, gathered from the run's files (no model, no torch).

Every input is optional: a run that has not been evaluated, sampled or even
started yet still gives a `ReportData`, with `missing` saying what was not
found, so the report explains itself instead of crashing. Numbers that are not
finite (a diverged step's NaN loss) are left out of the curves; every string is
kept as read, and the HTML layer escapes it.

Sources, by section:
- losses: RUN_DIR/metrics.jsonl records with "step" and "loss"/"train_loss"/"val_loss" (stage "unet" or
  "vae"; records with an "event" key are events, not steps). A step logged twice (a rollback redoes steps)
  counts once, with its last value.
- metrics: RUN_DIR/eval.json (`stablediff eval`) and the train-time evaluation records of metrics.jsonl,
  for every metric named in `run_schema.METRIC_MODES`.
- samples: RUN_DIR/samples/step-*.png, the same prompts and seeds at each checkpoint.
- confusion: adherence's confusion matrix of the best checkpoint, else of the newest that has one.
- config: RUN_DIR/config.yaml as written; data: RUN_DIR/quarantine.jsonl grouped by reason.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stablediff.io.run_files import read_eval, read_lines
from stablediff.run_schema import METRIC_MODES, UNET_STAGE, VAE_STAGE

TRAIN_LOSS_KEYS = ("train_loss", "loss")  # the training loop logs "loss"; "train_loss" is the checkpoint's name
STAGES = (VAE_STAGE, UNET_STAGE)  # in the order a run trains them
SAMPLE_GRID = re.compile(r"^step-(\d+)\.png$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_COUNT_KEYS = ("train_images", "held_out_images")  # of training's "data" event in metrics.jsonl
EXAMPLES_PER_REASON = 3  # rejected sample keys shown per quarantine reason

Curve = list[tuple[int, float]]  # (step, value), ascending steps


@dataclass(frozen=True)
class MetricPoint:
    """One value of a metric at a step: from eval.json ("eval", with its spread and sample count) or training."""

    step: int
    value: float
    source: str  # "eval" or "train"
    spread: float | None = None
    count: int | None = None


@dataclass(frozen=True)
class Confusion:
    step: int
    matrix: list[list[int]]  # rows: the digit requested, columns: the digit the classifier read


@dataclass
class ReportData:
    run_dir: Path
    losses: dict[tuple[str, str], Curve] = field(default_factory=dict)  # (stage, "train_loss"|"val_loss")
    metrics: dict[str, list[MetricPoint]] = field(default_factory=dict)  # METRIC_MODES order
    eval_rows: dict[int, dict] = field(default_factory=dict)  # eval.json's checkpoints by step
    best: dict | None = None  # eval.json's "best": {"step", "metric", "mode", "value"}
    samples: list[tuple[int, Path]] = field(default_factory=list)
    confusion: Confusion | None = None
    config_text: str | None = None
    config: dict = field(default_factory=dict)  # config.yaml parsed ({} when it does not parse)
    counts: dict = field(default_factory=dict)  # the last start's "data" event: train_images, held_out_images
    rejects: Counter = field(default_factory=Counter)  # quarantine reason -> count
    reject_examples: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def best_step(self) -> int | None:
        step = (self.best or {}).get("step")
        return _as_int(step)


def gather(run_dir: Path) -> ReportData:
    """Everything the report shows, read from `run_dir`; what is absent is named in `.missing`."""
    run_dir = Path(run_dir)
    data = ReportData(run_dir)
    records = [r for _, r in read_lines(run_dir / "metrics.jsonl") if r is not None]
    if not records:
        data.missing.append("metrics.jsonl (no training steps logged yet)")
    data.losses = loss_curves(records)
    evaluation = read_eval(run_dir)
    if not evaluation.get("checkpoints"):
        data.missing.append("eval.json (no checkpoint evaluated yet: run `stablediff eval RUN_DIR`)")
    data.eval_rows = eval_rows(evaluation)
    best = evaluation.get("best")
    data.best = best if isinstance(best, dict) and _as_int(best.get("step")) is not None else None
    data.metrics = metric_points(records, data.eval_rows)
    data.confusion = pick_confusion(data.eval_rows, data.best_step)
    data.samples = sample_grids(run_dir / "samples")
    if not data.samples:
        data.missing.append("samples/step-*.png (no sample grids written yet)")
    data.config_text, data.config = read_config(run_dir / "config.yaml")
    if data.config_text is None:
        data.missing.append("config.yaml")
    data.counts = data_counts(records)
    data.rejects, data.reject_examples = quarantine_summary(run_dir / "quarantine.jsonl")
    return data


def data_counts(records: list[dict]) -> dict:
    """The newest "data" event's sample counts (each start logs one; a resume may see other data)."""
    events = [r for r in records if r.get("event") == "data"]
    last = events[-1] if events else {}
    return {key: last[key] for key in DATA_COUNT_KEYS if _as_int(last.get(key)) is not None}


def loss_curves(records: list[dict]) -> dict[tuple[str, str], Curve]:
    """Training and validation loss against step, per stage; the last value logged for a step wins."""
    points: dict[tuple[str, str], dict[int, float]] = {}
    for record in _step_records(records):
        stage = record.get("stage", UNET_STAGE)
        if stage not in STAGES:
            continue
        train = next((record[k] for k in TRAIN_LOSS_KEYS if k in record), None)
        for name, value in (("train_loss", train), ("val_loss", record.get("val_loss"))):
            if _finite(value):
                points.setdefault((stage, name), {})[record["step"]] = float(value)
    order = [(stage, name) for stage in STAGES for name in ("train_loss", "val_loss")]
    return {key: sorted(points[key].items()) for key in order if key in points}


def eval_rows(evaluation: dict) -> dict[int, dict]:
    """eval.json's "checkpoints" keyed by integer step, ascending; entries that are not objects are skipped."""
    rows = {}
    checkpoints = evaluation.get("checkpoints")
    for key, entry in (checkpoints.items() if isinstance(checkpoints, dict) else ()):
        step = _as_int(key)
        if step is not None and isinstance(entry, dict) and isinstance(entry.get("metrics", {}), dict):
            rows[step] = entry
    return dict(sorted(rows.items()))


def metric_points(records: list[dict], rows: dict[int, dict]) -> dict[str, list[MetricPoint]]:
    """Every METRIC_MODES metric against step: eval.json's values, then train-time evaluation's."""
    found: dict[str, list[MetricPoint]] = {name: [] for name in METRIC_MODES}
    for step, entry in rows.items():
        for name, result in entry.get("metrics", {}).items():
            if name in found and isinstance(result, dict) and _finite(result.get("value")):
                found[name].append(MetricPoint(step, float(result["value"]), "eval",
                                               _finite_or_none(result.get("spread")), _as_int(result.get("count"))))
    for record in _step_records(records):
        if record.get("stage", UNET_STAGE) != UNET_STAGE:
            continue
        for name in found:
            if _finite(record.get(name)):
                found[name].append(MetricPoint(record["step"], float(record[name]), "train"))
    return {name: sorted(points, key=lambda p: (p.step, p.source)) for name, points in found.items() if points}


def pick_confusion(rows: dict[int, dict], best_step: int | None) -> Confusion | None:
    """Adherence's confusion matrix of the best checkpoint, else of the newest one evaluated for adherence."""
    candidates = ([best_step] if best_step in rows else []) + sorted(rows, reverse=True)
    for step in candidates:
        adherence = rows[step].get("metrics", {}).get("adherence")
        matrix = adherence.get("confusion") if isinstance(adherence, dict) else None
        if _is_matrix(matrix):
            return Confusion(step, [[int(cell) for cell in row] for row in matrix])
    return None


def sample_grids(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every samples/step-N.png that is a PNG, by step."""
    grids = []
    for path in folder.glob("step-*.png") if folder.is_dir() else ():
        match = SAMPLE_GRID.match(path.name)
        if match and _is_png(path):
            grids.append((int(match.group(1)), path))
    return sorted(grids)


def read_config(path: Path) -> tuple[str | None, dict]:
    """(config.yaml's text, its parsed mapping); (None, {}) when there is no file, {} when it does not parse."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, {}
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    return text, parsed if isinstance(parsed, dict) else {}


def quarantine_summary(path: Path) -> tuple[Counter, dict[str, list[str]]]:
    """Rejected samples per reason, and the first few keys of each (each reject counted once)."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for _, record in read_lines(path):
        if record is None:
            continue
        reason = str(record.get("reason", "unknown"))
        counts[reason] += 1
        shown = examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(str(record.get("key", "")))
    return counts, examples


def _step_records(records: list[dict]) -> list[dict]:
    """The per-step records (an integer "step", no "event" key)."""
    return [r for r in records if "event" not in r and isinstance(r.get("step"), int)
            and not isinstance(r.get("step"), bool)]


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_or_none(value: object) -> float | None:
    return float(value) if _finite(value) else None


def _is_matrix(value: object) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(row, list) and len(row) == len(value) and all(_finite(c) for c in row)
                    for row in value))


def _is_png(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False
