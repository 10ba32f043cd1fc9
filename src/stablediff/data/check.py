"""`stablediff data check`: every sample decoded and judged, as a report instead of a training run.

The report holds the totals, every reject with its reason and origin, size
and aspect-ratio histograms of the accepted images, and caption length
statistics. `CheckReport.to_dict()` is the `--json` document.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from stablediff.data.sources import open_source
from stablediff.data.validate import DEFAULT_VALIDATION, REASONS, ValidationConfig, Validator

PROGRESS_EVERY = 100
# Shorter side in pixels: (exclusive upper bound, label).
SIZE_BINS = ((64, "<64"), (128, "64-127"), (256, "128-255"), (512, "256-511"), (768, "512-767"),
             (1024, "768-1023"), (2048, "1024-2047"), (float("inf"), ">=2048"))
# Width / height: (exclusive upper bound, label); "1:1" is square within 5%.
ASPECT_BINS = ((1 / 2, "<1:2"), (2 / 3, "1:2-2:3"), (4 / 5, "2:3-4:5"), (0.95, "4:5-1:1"),
               (1.05, "1:1"), (5 / 4, "1:1-5:4"), (3 / 2, "5:4-3:2"), (2.0, "3:2-2:1"),
               (float("inf"), ">2:1"))


def bin_label(value: float, bins: tuple[tuple[float, str], ...]) -> str:
    return next(label for upper, label in bins if value < upper)


def length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0, "median": 0.0, "p95": 0.0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"min": ordered[0], "max": ordered[-1], "mean": round(statistics.fmean(ordered), 2),
            "median": float(statistics.median(ordered)), "p95": float(p95)}


@dataclass
class CheckReport:
    source: str
    source_format: str
    caption_policy: str
    config: ValidationConfig
    total: int = 0
    rejects: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    sizes: Counter = field(default_factory=Counter)
    aspects: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(len(items) for items in self.rejects.values())

    @property
    def accepted(self) -> int:
        return self.total - self.rejected

    def reject_counts(self) -> dict[str, int]:
        """Counts by reason, in the order of `validate.REASONS`."""
        order = {reason: i for i, reason in enumerate(REASONS)}
        reasons = sorted(self.rejects, key=lambda r: (order.get(r, len(order)), r))
        return {reason: len(self.rejects[reason]) for reason in reasons}

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.source_format,
            "caption_policy": self.caption_policy,
            "min_size": self.config.min_size,
            "max_pixels": self.config.max_pixels,
            "max_aspect": self.config.max_aspect,
            "total": self.total,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "reject_counts": self.reject_counts(),
            "rejects": {reason: self.rejects[reason] for reason in self.reject_counts()},
            "size_histogram": {label: self.sizes.get(label, 0) for _, label in SIZE_BINS},
            "aspect_histogram": {label: self.aspects.get(label, 0) for _, label in ASPECT_BINS},
            "modes": dict(sorted(self.modes.items())),
            "captions": {
                "count": len(self.caption_chars),
                "empty": sum(1 for n in self.caption_chars if n == 0),
                "chars": length_stats(self.caption_chars),
                "words": length_stats(self.caption_words),
            },
        }


def check_source(spec: str, caption_policy: str = "error",
                 config: ValidationConfig = DEFAULT_VALIDATION,
                 on_progress: Callable[[int], None] | None = None,
                 allow_outside_paths: bool = False) -> CheckReport:
    """Open `spec`, judge every sample, gather the report; raises `SourceError` for a bad spec.

    `on_progress(samples_judged)` is called every `PROGRESS_EVERY` samples.
    """
    source = open_source(spec, caption_policy, allow_outside_paths)
    report = CheckReport(spec, type(source).__name__, caption_policy, config)
    validator = Validator(config)
    for sample in source:
        verdict = validator.judge(sample)
        report.total += 1
        if on_progress is not None and report.total % PROGRESS_EVERY == 0:
            on_progress(report.total)
        if not verdict.ok:
            report.rejects.setdefault(verdict.reason, []).append(
                {"key": sample.key, "origin": sample.origin, "detail": verdict.detail})
            continue
        report.sizes[bin_label(min(verdict.width, verdict.height), SIZE_BINS)] += 1
        report.aspects[bin_label(verdict.width / verdict.height, ASPECT_BINS)] += 1
        report.modes[verdict.mode] += 1
        report.caption_chars.append(len(sample.caption))
        report.caption_words.append(len(sample.caption.split()))
    return report
