"""The training run's side of the checkpoint store: when to save, where to resume, SIGTERM.

One place decides where a run resumes (`find_resume`): the newest checkpoint
that verifies in the primary store, with replicas as fallbacks for damaged
chunks, never one a divergence rollback abandoned; when it predates the run's
last rollback, the rolled-back trajectory continues from it. Saves go through
the asynchronous writer; SIGTERM/SIGINT set the stop flag (`interrupt.STOP`)
that the loop checks at the next step boundary, where an emergency checkpoint
is written before the run stops.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from stablediff.checkpoint import AsyncCheckpointer, CheckpointError, CheckpointStore, LoadedCheckpoint, RetentionPolicy
from stablediff.checkpoint import lineage
from stablediff.checkpoint.run_stores import run_stores
from stablediff.config.schema import CheckpointConfig
from stablediff.run_schema import BEST_METRIC
from stablediff.training import distributed
from stablediff.training import state as train_state
from stablediff.training.distributed import DistInfo
from stablediff.training.interrupt import STOP, EmergencySaveFailed, TrainingInterrupted
from stablediff.training.rollback import describe as describe_rollback


def open_stores(run_dir: Path, cfg: CheckpointConfig) -> tuple[CheckpointStore, list[CheckpointStore]]:
    return run_stores(run_dir, cfg.replicas)


def find_resume(primary: CheckpointStore, replicas: list[CheckpointStore], say: Callable[[str], None],
                announce: bool = True) -> LoadedCheckpoint | None:
    """The newest verifying checkpoint, or None for a fresh run; says what it skipped or repaired.

    `announce=False` leaves "resumed from step N" to the caller, which first checks
    that the config and data still fit the checkpoint.
    """
    found = bool(primary.steps()) or any(_has_checkpoints(r) for r in replicas)
    if not found:
        return None
    try:
        loaded = primary.load(fallbacks=replicas)  # every chunk is hashed as it is read
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume from {primary}: {exc}. Run `stablediff ckpt verify` and "
                              "`stablediff ckpt repair` on the run directory, or start a fresh run directory.") from None
    for note in loaded.notes():
        say(note)
    if announce:
        say(train_state.resume_message(loaded))
    pending = lineage.pending_rollback(lineage.records_of([primary, *replicas]), loaded.meta)
    if pending is not None:  # killed right after a rollback: continue the rolled-back trajectory
        loaded.meta = {**loaded.meta, train_state.CONTINUE_ROLLBACK: pending}
        say(f"continuing after the divergence rollback: {describe_rollback(pending)}")
    return loaded


def _has_checkpoints(store: CheckpointStore) -> bool:
    try:
        return bool(store.steps())
    except OSError:
        return False


class RunCheckpointer:
    """Saves the run on schedule and on signals; owns the async writer.

    Under torchrun every rank holds one: they agree on when to save or stop (an OR
    over ranks at each step boundary), `capture` gathers every rank's RNG, and
    rank 0 alone writes.
    """

    def __init__(self, primary: CheckpointStore, replicas: list[CheckpointStore], cfg: CheckpointConfig,
                 say: Callable[[str], None], dist_info: DistInfo = DistInfo(),
                 rollback_window: int | None = None, best: tuple[str, str] = (BEST_METRIC, "min"),
                 run_dir: Path | None = None) -> None:
        """`rollback_window`: the divergence guard's guard.within_steps (None without a guard):
        retention keeps a checkpoint older than it, so a rollback always has a target.
        `best`: (metric, mode) that keep_best ranks by: early stopping's, so its best is never deleted.
        `run_dir`: the best its eval.json marks (by `stablediff eval`, perhaps by another metric) is kept too."""
        retention = RetentionPolicy(keep_last=cfg.keep_last, keep_best=cfg.keep_best, best_metric=best[0],
                                    best_mode=best[1], keep_every=cfg.keep_every, rollback_window=rollback_window,
                                    marked_in=run_dir)
        self.primary, self.replicas = primary, replicas
        self.writer = AsyncCheckpointer(primary, replicas, retention, log=say) if dist_info.is_main else None
        if dist_info.is_main:
            lineage.complete_moves(primary)  # a rollback a crash interrupted: set its abandoned manifests aside
        self.cfg, self.say = cfg, say
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None

    # -- saving --------------------------------------------------------------------
    def save(self, step: int, capture: Callable[[], tuple[dict, dict] | None], metrics: dict | None = None) -> None:
        """Take the snapshot (a collective under torchrun) and, on rank 0, hand it to the writer."""
        captured = capture()
        if self.writer is not None and captured is not None:
            self.writer.snapshot_and_save(step, *captured, metrics or {})
        self._last_save_time, self._last_saved_step = time.monotonic(), step

    def busy(self) -> bool:
        """Whether rank 0's previous save is still being written."""
        return self.writer is not None and self.writer.busy()

    def mark_saved(self, step: int) -> None:
        """A resumed run's starting step is already in the store."""
        self._last_saved_step = step

    def due(self, step: int) -> bool:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        return bool(self.cfg.every_seconds and time.monotonic() - self._last_save_time >= self.cfg.every_seconds)

    def after_step(self, step: int, capture: Callable[[], tuple[dict, dict] | None], metrics: dict,
                   force: bool = False) -> None:
        """Called at every step boundary: scheduled (or `force`d) saves, and the emergency save on a signal."""
        stop, due = distributed.any_rank([STOP.signal_name is not None, force or self.due(step)])
        if stop:
            self.emergency_save(step, capture, metrics)
            raise TrainingInterrupted(STOP.signal_name or "SIGTERM (another rank)", step)
        if due:
            self.save(step, capture, metrics)

    def emergency_save(self, step: int, capture: Callable[[], tuple[dict, dict] | None],
                       metrics: dict | None = None, what: str | None = None) -> None:
        """Save `step` and wait for the commit; `EmergencySaveFailed` (exit 143) when it cannot be written."""
        try:
            self.save(step, capture, metrics)
            self.wait()
        except Exception as exc:
            raise EmergencySaveFailed(f"{STOP.signal_name or 'SIGTERM'}: the emergency checkpoint "
                                      f"{what or f'of step {step}'} could not be written ({exc}); "
                                      "the older checkpoints are intact") from exc

    def finish(self, step: int, capture: Callable[[], tuple[dict, dict] | None], metrics: dict) -> None:
        """The final checkpoint (unless this step was just saved), then wait for the writer."""
        if self._last_saved_step != step:
            self.save(step, capture, metrics)
        self.close()

    def wait(self) -> None:
        """Until the save in flight (rank 0's) is committed."""
        if self.writer is not None:
            self.writer.wait()

    def load_before(self, step: int) -> LoadedCheckpoint:
        """The newest checkpoint at or before `step` (a divergence rollback's target); every rank calls it."""
        self.wait()
        distributed.barrier()  # no rank reads the store before rank 0's last save is committed
        candidates = [s.step for s in self.primary.list() if s.valid and s.step <= step]  # abandoned left out
        if not candidates:
            raise CheckpointError(f"training diverged at step {step} and no checkpoint precedes it; lower "
                                  "train.learning_rate or set checkpoint.every_steps so a rollback has a target")
        return self.primary.load(step=max(candidates), fallbacks=self.replicas)

    def stores(self) -> list[CheckpointStore]:
        return [self.primary, *self.replicas]

    def commit_rollback(self, record: lineage.RollbackRecord) -> None:
        """Rank 0: the rollback's record into the primary (errors raise) and each replica (best effort;
        a replica that misses it gets it with the next save's sync)."""
        lineage.commit(self.primary, record)
        for replica in self.replicas:
            try:
                lineage.commit(replica, record)
            except Exception as exc:  # a failing replica never stops training
                self.say(f"checkpoint: replica {replica.location} did not take the rollback record ({exc!r}); "
                         "the next save brings it")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = ["EmergencySaveFailed", "RunCheckpointer", "TrainingInterrupted", "find_resume", "open_stores", "train_state"]
