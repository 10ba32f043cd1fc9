"""Learning-rate multipliers: linear warm-up, then constant, cosine or linear decay."""

from __future__ import annotations

import math

from stablediff.errors import ConfigError


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ConfigError(f"unknown lr_schedule {schedule!r}; use constant, cosine or linear")
