"""SIGTERM and SIGINT for a whole run: the handler only sets a flag; each stage stops at its next safe point.

A scheduler (SLURM, Kubernetes) sends SIGTERM and, after a grace period, SIGKILL; Ctrl-C sends SIGINT.
The handlers are installed when a run starts, before any work, and a stage looks at the flag where
stopping loses nothing:

  data ingestion     between samples: nothing to save (quarantine lines are flushed as written)
  stage 1 (VAE)      at a step boundary, after an emergency checkpoint
  feature encoding   between batches: the rows encoded so far are flushed into the feature cache
  stage 2 (UNet)     at a step boundary, after an emergency checkpoint
  export, samples    before each: the final checkpoint is already committed

The stage then raises `TrainingInterrupted` (one line for the user; the command exits 0), or
`EmergencySaveFailed` when the emergency checkpoint could not be written (exit 143, as if killed).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGINT)
EXIT_SAVE_FAILED = 128 + signal.SIGTERM  # 143: what a shell reports for a process killed by SIGTERM


class TrainingInterrupted(Exception):
    """A stage stopped at a safe point after a signal; what it had done is durable."""

    def __init__(self, signal_name: str, step: int | None = None, message: str | None = None) -> None:
        message = message or f"saved a checkpoint at step {step}; run the same command to continue"
        super().__init__(f"{signal_name}: {message}")
        self.signal_name, self.step = signal_name, step


class EmergencySaveFailed(Exception):
    """The checkpoint a signal asked for could not be written; the older checkpoints are intact."""

    exit_code = EXIT_SAVE_FAILED


def _stderr(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; rank 0 tells
        print(message, file=sys.stderr, flush=True)


class StopRequest:
    """The process's one stop flag; `handling()` installs the handlers (nested uses share them)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._depth = 0
        self._previous: dict[int, object] = {}
        self._owner_pid = 0
        self._say: Callable[[str], None] = _stderr

    @contextmanager
    def handling(self, say: Callable[[str], None] | None = None) -> Iterator[StopRequest]:
        outermost = self._depth == 0
        if outermost:
            self._install(say or _stderr)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if outermost:
                self._restore()

    def _install(self, say: Callable[[str], None]) -> None:
        self.signal_name, self._say, self._owner_pid = None, say, os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a run in a thread keeps the defaults
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signal_name = None

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._owner_pid:
            return  # a forked ingestion worker got the group's signal: its parent stops the pool
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            self._say(f"{name} received: stopping at the next safe point (nothing done so far is lost)")
        else:
            self._say(f"{name} received again: already stopping; SIGKILL stops at once (checkpoints stay intact)")

    def check(self, where: str, kept: str) -> None:
        """Raise `TrainingInterrupted` if a signal came: "stopped `where`; `kept`; run ... again"."""
        if self.signal_name is not None:
            raise TrainingInterrupted(self.signal_name,
                                      message=f"stopped {where}; {kept}; run the same command to continue")


STOP = StopRequest()


def handles_signals(func: Callable) -> Callable:
    """Run `func` with SIGTERM/SIGINT turned into the stop flag (restored afterwards)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with STOP.handling():
            return func(*args, **kwargs)

    return wrapper


def safe_point(where: str, kept: str) -> Callable[..., None]:
    """A callback (any arguments) for a loop's safe point: stops there when a signal came."""
    return lambda *_args, **_kwargs: STOP.check(where, kept)
