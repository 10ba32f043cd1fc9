"""The run around the loop, at each step boundary: validation, evaluation, samples, checkpoints, rollback.

`train_unet` only calls `after_step(state)` and, when the divergence guard asks
for it, `rollback(state, first_bad_step)`. This module decides what those do
for a real run: the order is validate -> evaluate -> sample -> checkpoint, so a
checkpoint taken at a validation or evaluation step carries that step's
`val_loss` and eval metrics (what keep_best ranks by), and only that step's.
"""

from __future__ import annotations

import sys

import torch

from stablediff import run_schema as schema
from stablediff.io.run_files import update_eval
from stablediff.training.context import RunContext
from stablediff.training.early_stop import EarlyStopping
from stablediff.training.eval_step import StepEvaluator
from stablediff.training.interrupt import TrainingInterrupted
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
        self.early_stopping = self._restore_tracker(stage.state, schema.EARLY_STOPPING,
                                                    EarlyStopping.from_config(self.config.early_stopping))
        self.best = self._best_tracker(stage.state)
        self.evaluated: dict[str, float] = {}  # this step's val_loss and eval metrics (empty on other steps)
        self.evaluated_at: int | None = None
        self.validation_set = None
        if run.config.train.validate_every and run.dist.is_main:
            self.validation_set = make_validation_set(stage.vae, stage.held_out, stage.text_encoder,
                                                      stage.scaling_factor, stage.held_out_captions)
        self.evaluator = StepEvaluator(run.config, run.run_dir) \
            if run.config.train.eval_every and run.dist.is_main else None

    def last_metrics(self, state: UNetTrainState) -> dict:
        """What the checkpoint of this step carries: its train loss, and what was evaluated at this step."""
        metrics = {"train_loss": state.last_loss}
        if self.evaluated_at == state.step:
            metrics.update(self.evaluated)
        return metrics

    def _after_step(self, state: UNetTrainState) -> None:
        if self.resume is not None and state.step == self.resume.step + 1 and self.metrics is not None:
            resumed, self.resume = self.resume.step, None  # once: a rollback to that step must not log it again
            self.metrics.write(event="resumed", step=resumed)
        self.evaluated, self.evaluated_at = {}, state.step
        validated = self._maybe_validate(state)
        evaluated = self._maybe_evaluate(state)
        improved = (validated or evaluated) and self._track_best(state)
        if evaluated and self.evaluator is not None:
            self.evaluator.write_grid(state.step)  # a configured sample grid of this step replaces it
        self._maybe_sample(state)
        try:
            self.checkpointer.after_step(state.step, self.stage.capture, self.last_metrics(state),
                                         force=validated or evaluated)
        except TrainingInterrupted:  # a signal during this step's work: its emergency checkpoint is committed
            self._record(state.step, evaluated, improved, report=False)  # a resume would not evaluate it again
            raise
        self._record(state.step, evaluated, improved)

    def _record(self, step: int, evaluated: bool, improved: bool, report: bool = True) -> None:
        if evaluated and self.evaluator is not None:
            self._after_evaluation(step, improved, report)
        elif improved and self.dist.is_main:  # after the save is queued: the mark names a checkpoint being written
            update_eval(self.run_dir, best=self.best.best_mark())

    def _after_evaluation(self, step: int, improved: bool, report: bool = True) -> None:
        """Rank 0, once the step's checkpoint is committed: eval.json's entries (they name it), the best mark
        and (unless stopping on a signal, when time is short) the report."""
        self.checkpointer.wait()
        problems = [self.evaluator.record(step, self.checkpointer.primary)]
        if improved:
            update_eval(self.run_dir, best=self.best.best_mark())
        if report:
            problems.append(self.evaluator.write_report())
        for problem in filter(None, problems):
            print(problem, file=sys.stderr, flush=True)

    def _restore_tracker(self, state: UNetTrainState, key: str, tracker: EarlyStopping) -> EarlyStopping:
        saved = self.resume.meta.get(key) if self.resume is not None else None
        if saved:
            tracker.load_state_dict(saved)
        state.extra[key] = tracker.state_dict()
        if key == schema.EARLY_STOPPING and tracker.should_stop:
            state.stop_reason = tracker.reason()
        return tracker

    def _best_tracker(self, state: UNetTrainState) -> EarlyStopping:
        """What the best mark follows: checkpoint.best_metric, early stopping's own tracker when the same."""
        metric, mode = self.config.checkpoint.ranked_by(self.config.early_stopping)
        if metric == self.early_stopping.metric:
            return self.early_stopping
        return self._restore_tracker(state, schema.BEST_TRACKER, EarlyStopping(metric, mode))

    def _track_best(self, state: UNetTrainState) -> bool:
        """Feed this step's evaluation to early stopping (and the best mark); True when it is the new best."""
        trackers = {schema.EARLY_STOPPING: self.early_stopping}
        if self.best is not self.early_stopping:
            trackers[schema.BEST_TRACKER] = self.best
        improved = False
        for key, tracker in trackers.items():
            value = self.evaluated.get(tracker.metric)
            if value is None:
                continue
            better = tracker.update(state.step, float(value))
            state.extra[key] = tracker.state_dict()
            improved = improved or (better and tracker is self.best)
        if self.early_stopping.should_stop and state.stop_reason is None:
            state.stop_reason = self.early_stopping.reason()
            if self.metrics is not None:
                self.metrics.write(event="early_stopping", step=state.step, reason=state.stop_reason,
                                   best_step=self.early_stopping.best_step)
        return improved

    def _maybe_validate(self, state: UNetTrainState) -> bool:
        every = self.config.train.validate_every
        if not every or state.step % every:
            return False
        val_loss = None
        if self.validation_set is not None:  # rank 0; the weights are the same on every rank
            if state.live_text is not None:  # the new token's vectors as they are now
                with torch.no_grad():
                    self.validation_set.text_embeddings = state.live_text.encode(self.validation_set.prompts)
            result = run_validation(state.unet, self.stage.noise_scheduler, self.validation_set,
                                    self.config.train.prediction_type, self.config.train.validation_timesteps)
            val_loss = result["loss"]
            self.metrics.write(stage="unet", step=state.step, val_loss=val_loss,
                               val_loss_per_timestep={str(t): v for t, v in result["per_timestep"].items()})
        if self.dist.enabled:  # every rank tracks the best and stops early on rank 0's number, or they deadlock
            val_loss = distributed.from_main(val_loss)
        if val_loss is not None:
            self.evaluated["val_loss"] = val_loss
        return True

    def _maybe_evaluate(self, state: UNetTrainState) -> bool:
        """train.eval_metrics on the EMA weights (rank 0), logged; every rank gets the values."""
        every = self.config.train.eval_every
        if not every or state.step % every:
            return False
        values = None
        if self.evaluator is not None:
            values = self.evaluator.evaluate(self.stage, state.step)
            self.metrics.write(stage="unet", step=state.step, **self.evaluator.record_fields())
        if self.dist.enabled:
            values = distributed.from_main(values)
        self.evaluated.update(values)
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
