"""The run around the loop, at each step boundary: validation, samples, checkpoints, rollback.

`train_unet` only calls `after_step(state)` and, when the divergence guard asks
for it, `rollback(state, first_bad_step)`. This module decides what those do
for a real run: the order is validate -> sample -> checkpoint, so a checkpoint
taken at a validation step carries that step's `val_loss` (what keep_best ranks).
"""

from __future__ import annotations

import sys

import torch

from stablediff import run_schema as schema
from stablediff.io.run_files import update_eval
from stablediff.training.context import RunContext
from stablediff.training.early_stop import EarlyStopping
from stablediff.training.periodic import make_validation_set, run_validation, write_samples
from stablediff.training import distributed
from stablediff.training import state as train_state
from stablediff.training.rollback import logged_rollbacks, roll_back, rollback_event
from stablediff.training.rollback import message as rollback_message
from stablediff.training.unet_stage import LoopHooks, TrainingDiverged, UNetTrainState


class RunHooks(LoopHooks):
    def __init__(self, run: RunContext, stage, checkpointer, resume, tensorboard=None) -> None:
        super().__init__(after_step=self._after_step, rollback=self._rollback)
        self.config, self.run_dir, self.metrics, self.dist = run.config, run.run_dir, run.metrics, run.dist
        self.stage, self.checkpointer, self.resume = stage, checkpointer, resume
        self.tensorboard = tensorboard
        self._log_continued_rollback()
        self.early_stopping = self._restore_early_stopping(stage.state)
        self.val_loss: float | None = None
        self.validation_set = None
        if run.config.train.validate_every and run.dist.is_main:
            self.validation_set = make_validation_set(stage.vae, stage.held_out, stage.text_encoder,
                                                      stage.scaling_factor, stage.held_out_captions)

    def last_metrics(self, state: UNetTrainState) -> dict:
        metrics = {"train_loss": state.last_loss}
        if self.val_loss is not None:
            metrics["val_loss"] = self.val_loss
        return metrics

    def _after_step(self, state: UNetTrainState) -> None:
        if self.resume is not None and state.step == self.resume.step + 1 and self.metrics is not None:
            resumed, self.resume = self.resume.step, None  # once: a rollback to that step must not log it again
            self.metrics.write(event="resumed", step=resumed)
        validated = self._maybe_validate(state)
        improved = validated and self._track_best(state)
        self._maybe_sample(state)
        self.checkpointer.after_step(state.step, self.stage.capture, self.last_metrics(state), force=validated)
        if improved and self.dist.is_main:  # after the save is queued: the mark names a checkpoint being written
            update_eval(self.run_dir, best=self.early_stopping.best_mark())

    def _restore_early_stopping(self, state: UNetTrainState) -> EarlyStopping:
        tracker = EarlyStopping.from_config(self.config.early_stopping)
        saved = self.resume.meta.get(schema.EARLY_STOPPING) if self.resume is not None else None
        if saved:
            tracker.load_state_dict(saved)
        state.extra[schema.EARLY_STOPPING] = tracker.state_dict()
        if tracker.should_stop:
            state.stop_reason = tracker.reason()
        return tracker

    def _track_best(self, state: UNetTrainState) -> bool:
        """Feed the evaluation to early stopping; True when this step is the new best."""
        value = self.last_metrics(state).get(self.early_stopping.metric)
        if value is None:
            return False
        improved = self.early_stopping.update(state.step, float(value))
        state.extra[schema.EARLY_STOPPING] = self.early_stopping.state_dict()
        if self.early_stopping.should_stop:
            state.stop_reason = self.early_stopping.reason()
            if self.metrics is not None:
                self.metrics.write(event="early_stopping", step=state.step, reason=state.stop_reason,
                                   best_step=self.early_stopping.best_step)
        return improved

    def _maybe_validate(self, state: UNetTrainState) -> bool:
        every = self.config.train.validate_every
        if not every or state.step % every:
            return False
        if self.validation_set is not None:  # rank 0; the weights are the same on every rank
            if state.live_text is not None:  # the new token's vectors as they are now
                with torch.no_grad():
                    self.validation_set.text_embeddings = state.live_text.encode(self.validation_set.prompts)
            result = run_validation(state.unet, self.stage.noise_scheduler, self.validation_set,
                                    self.config.train.prediction_type, self.config.train.validation_timesteps)
            self.val_loss = result["loss"]
            self.metrics.write(stage="unet", step=state.step, val_loss=self.val_loss,
                               val_loss_per_timestep={str(t): v for t, v in result["per_timestep"].items()})
        if self.dist.enabled:  # every rank tracks the best and stops early on rank 0's number, or they deadlock
            self.val_loss = distributed.from_main(self.val_loss)
        return True

    def _maybe_sample(self, state: UNetTrainState) -> None:
        every = self.config.sample.every_steps
        if not every or state.step % every or not self.dist.is_main:
            return
        path = write_samples(self.stage, self.config, self.run_dir / "samples" / f"step-{state.step:07d}.png")
        if self.tensorboard is not None:
            from PIL import Image

            with Image.open(path) as grid:
                self.tensorboard.image("samples", grid, state.step)

    def _rollback(self, state: UNetTrainState, first_bad_step: int) -> None:
        guard_cfg, done = self.config.guard, state.guard.rollbacks - 1  # the guard counts this one already
        if done >= guard_cfg.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged again at step {state.step} after {done} rollbacks "
                f"(LR now x{state.lr_scale:g}). Lower train.learning_rate, raise train.warmup_steps or "
                "set train.grad_clip; the checkpoints before the divergence are intact.")
        record = roll_back(state, self.checkpointer, first_bad_step, guard_cfg, self.dist.rank, self.dist.is_main)
        self.checkpointer.mark_saved(state.step)
        if self.dist.is_main:  # the event first: a kill right after the message still finds it logged
            self.metrics.write(**rollback_event(record))
            print(rollback_message(record), file=sys.stderr, flush=True)

    def _log_continued_rollback(self) -> None:
        """A run killed between a rollback's commit and its event: log the event now, once."""
        pending = self.resume.meta.get(train_state.CONTINUE_ROLLBACK) if self.resume is not None else None
        if pending is not None and self.metrics is not None \
                and pending.number not in logged_rollbacks(self.metrics.path):
            self.metrics.write(**rollback_event(pending))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def make_hooks(run: RunContext, stage, checkpointer, resume) -> RunHooks:
    tensorboard = None
    if run.config.train.tensorboard and run.dist.is_main:
        from stablediff.training.tensorboard import TensorBoardLog

        tensorboard = TensorBoardLog(run.run_dir / "tb")

        def mirror(record: dict) -> None:  # per-step metrics only; events (resume, rollback) stay in the jsonl
            if "step" in record and "event" not in record:
                tensorboard.scalars(record["step"], record, prefix=record.get("stage", ""))

        run.metrics.mirror = mirror
    return RunHooks(run, stage, checkpointer, resume, tensorboard)
