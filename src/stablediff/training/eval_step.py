"""Evaluation during training: train.eval_metrics on the EMA weights every train.eval_every steps (rank 0).

The pipeline is the one export and the sample grids use (Stage2.pipeline: the
EMA UNet with the run's VAE and text encoder), evaluated by the same registry
and with the same settings as `stablediff eval RUN_DIR --num-samples
<train.eval_samples>`, so that command finds these results in eval.json and
does not compute them again. Evaluation runs under `isolated_rng`: a run that
evaluates trains bitwise like one that does not.
"""

from __future__ import annotations

from pathlib import Path

from stablediff.config import RunConfig
from stablediff.evaluation.context import EvalContext, EvalSettings, HeldOut
from stablediff.evaluation.registry import MetricResult, evaluate
from stablediff.training.seeding import isolated_rng


def eval_settings(config: RunConfig) -> EvalSettings:
    """What train-time evaluation computes with: the eval command's defaults, train.eval_samples images."""
    return EvalSettings(num_samples=config.train.eval_samples)


def record_fields(results: dict[str, MetricResult]) -> dict:
    """The metrics.jsonl record's fields: `<name>`, `<name>_spread`, `<name>_count` (and the seconds it took)."""
    fields: dict = {}
    for name, result in results.items():
        fields |= {name: result.value, f"{name}_spread": result.spread, f"{name}_count": result.count}
    fields["eval_seconds"] = round(sum(r.seconds for r in results.values()), 3)
    return fields


class StepEvaluator:
    """Held by rank 0: evaluates a step, then records it in eval.json once its checkpoint is committed."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        self.config, self.run_dir = config, run_dir
        self.settings = eval_settings(config)
        self.results: dict[str, MetricResult] = {}
        self.step: int | None = None

    def evaluate(self, stage, step: int) -> dict[str, float]:
        """{name: value} of train.eval_metrics for the EMA weights as they are at `step`."""
        with isolated_rng():
            context = EvalContext(stage.pipeline(), self.config, self.settings,
                                  held_out_data=held_out_of(stage), train_scheduler=stage.noise_scheduler)
            self.results = evaluate(context, self.config.train.eval_metrics)
        self.step = step
        return {name: result.value for name, result in self.results.items()}

    def record_fields(self) -> dict:
        return record_fields(self.results)

    def record(self, step: int, store) -> str | None:
        """This step's results into eval.json under its committed checkpoint; a message when it could not be."""
        from stablediff.evaluation.results import CHECKPOINTS, record_results

        if self.step != step:
            return None
        try:
            identity = store.read_manifest(step).checksum
        except Exception as exc:  # the save failed (the writer said why): nothing in the store to attach them to
            return f"eval: step {step}'s metrics are in metrics.jsonl but not eval.json: no checkpoint ({exc})"
        record_results(self.run_dir, CHECKPOINTS, str(step), identity, self.results)
        return None


def held_out_of(stage) -> HeldOut:
    """The training's held-out images and captions, as the registry takes them (no second read of the data)."""
    captions = list(stage.held_out_captions or [])
    captions += [""] * (len(stage.held_out) - len(captions))
    return HeldOut(stage.held_out, captions)
