"""`RUN_DIR/tb/`: TensorBoard event files next to metrics.jsonl (`tensorboard --logdir RUN_DIR/tb`).

The writer is torch's SummaryWriter, imported when a log is opened so that
importing the trainer does not pull in tensorboard. A resumed run appends a new
event file to the same folder; TensorBoard merges them by step.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Mapping

import numpy as np

from stablediff.errors import ConfigError


class TensorBoardLog:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch needs the separate `tensorboard` package for this
            raise ConfigError("TensorBoard logging needs the `tensorboard` package: pip install tensorboard "
                              f"(or turn TensorBoard logging off) [{error}]") from error
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, step: int, values: Mapping[str, object], prefix: str = "") -> None:
        """One scalar per numeric field (tag `prefix/name`); strings, bools and None are skipped,
        so the same dict can go to MetricsLog.write and here."""
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if math.isfinite(float(value)):  # TensorBoard's charts cannot draw NaN/inf
                self._writer.add_scalar(f"{prefix}/{name}" if prefix else name, float(value), global_step=step)

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (e.g. a sample grid), stored as RGB."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        self._writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
