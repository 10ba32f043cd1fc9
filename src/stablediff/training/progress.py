"""Progress for long jobs: step, loss, images/s and ETA, on a terminal or in a log.

On a terminal a rich progress bar redraws in place; in a pipe or CI log a plain
line is printed every `log_every` steps so the log stays readable.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class StepProgress:
    def __init__(self, title: str, total: int, start: int = 0, log_every: int = 25, enabled: bool = True) -> None:
        """`enabled=False` (ranks other than 0 under torchrun) prints nothing."""
        self.title, self.total, self.start, self.log_every = title, total, start, log_every
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.interactive = self.console.is_terminal and enabled
        self._t0 = time.perf_counter()
        self._images = 0
        self._progress: Progress | None = None

    def __enter__(self) -> "StepProgress":
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, completed=self.start,
                                                 loss="-", rate="-")
        return self

    def update(self, step: int, loss: float, images: int) -> None:
        """Report that `step` (1-based count of finished steps) is done; `images` seen this step."""
        self._images += images
        elapsed = time.perf_counter() - self._t0
        rate = self._images / elapsed if elapsed > 0 else 0.0
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.0f}")
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            done = step - self.start
            eta = (self.total - step) * elapsed / done if done else 0.0
            print(f"{self.title}: step {step}/{self.total}  loss {loss:.4f}  {rate:.0f} img/s  "
                  f"ETA {_format_eta(eta)}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
