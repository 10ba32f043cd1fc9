"""Who and where a training run is, handed as one object to the loop, its hooks and the stage builders.

Built once by `run.py`: the validated config, the run directory, the metrics log
(rank 0's; None on the other ranks) and the rank's place under torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stablediff.config import RunConfig
from stablediff.training.distributed import DistInfo
from stablediff.training.metrics import MetricsLog


@dataclass(frozen=True)
class RunContext:
    config: RunConfig
    run_dir: Path | None = None  # None for a loop run outside a run directory (tests, benchmarks)
    metrics: MetricsLog | None = None  # None: nothing is logged (the ranks other than 0)
    dist: DistInfo = field(default_factory=DistInfo)
