"""One metric's result, as eval.json, metrics.jsonl and the report store it (light: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MetricResult:
    """One metric of one model: the eval.json entry's fields, `details` metric-specific (adherence: macro
    and per-class precision/recall/F1, accuracy, confusion; fd/kid: reference_count, feature_dim,
    warning; bpd: its unit and parts; val_loss: per_timestep)."""

    name: str
    value: float
    spread: float | None  # KID's std over subsets, bpd's standard error, CLIP's std; None for one number
    count: int  # samples the value rests on (generated images, held-out images)
    seconds: float
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"value": self.value, "spread": self.spread, "count": self.count, "seconds": self.seconds,
                "settings": self.settings, **self.details}

    @classmethod
    def from_json(cls, name: str, entry: dict) -> MetricResult:
        core = ("value", "spread", "count", "seconds", "settings")
        return cls(name, entry["value"], entry.get("spread"), entry.get("count", 0), entry.get("seconds", 0.0),
                   dict(entry.get("settings") or {}), {k: v for k, v in entry.items() if k not in core})
