"""Early stopping: stop when the monitored metric has not improved for `patience` evaluations.

The tracker sees each evaluation's value (val_loss by default) and keeps the
best one; its state is part of every checkpoint (meta "early_stopping"), so a
resumed run counts on from where it was and a run that stopped stays stopped.
The best step it finds is also written to RUN_DIR/eval.json ("best"), the one
mark export, generate and `ckpt export` read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from stablediff.config.finetune import EarlyStoppingConfig


@dataclass
class EarlyStopping:
    metric: str = "val_loss"
    mode: str = "min"
    patience: int | None = None  # None: never stop, only track the best
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0  # evaluations since the best
    stopped_at: int | None = None

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig) -> "EarlyStopping":
        return cls(cfg.metric, cfg.mode, cfg.patience, cfg.min_delta)

    def improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        gain = self.best_value - value if self.mode == "min" else value - self.best_value
        return gain > self.min_delta

    def update(self, step: int, value: float) -> bool:
        """Record one evaluation; True when it is the new best."""
        if not math.isfinite(value):
            improved = False
        else:
            improved = self.improves(value)
        if improved:
            self.best_value, self.best_step, self.bad_evaluations = float(value), int(step), 0
        else:
            self.bad_evaluations += 1
        if self.patience is not None and self.bad_evaluations >= self.patience and self.stopped_at is None:
            self.stopped_at = int(step)
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def reason(self) -> str:
        return (f"{self.metric} has not improved by more than {self.min_delta:g} for {self.bad_evaluations} "
                f"evaluations (patience {self.patience}); the best is {self.best_value:.6g} at step {self.best_step}")

    def best_mark(self) -> dict:
        """The "best" entry of eval.json."""
        return {"step": self.best_step, "metric": self.metric, "mode": self.mode, "value": self.best_value}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("best_value", "best_step", "bad_evaluations", "stopped_at"):
            setattr(self, key, state.get(key, getattr(self, key)))
