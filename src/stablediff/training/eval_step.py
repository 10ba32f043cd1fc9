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

GENERATING = {"fd", "kid", "adherence", "clip"}  # the metrics scored on generated images


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
        self.images = None  # the evaluation's generated images, when it generated any

    def evaluate(self, stage, step: int) -> dict[str, float]:
        """{name: value} of train.eval_metrics for the EMA weights as they are at `step`."""
        with isolated_rng():
            context = EvalContext(stage.pipeline(), self.config, self.settings,
                                  held_out_data=held_out_of(stage), train_scheduler=stage.noise_scheduler)
            self.results = evaluate(context, self.config.train.eval_metrics)
        self.step = step
        generating = set(self.config.train.eval_metrics) & GENERATING
        self.images = context.generated() if generating else None  # already made: the metrics shared them
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

    def write_grid(self, step: int) -> None:
        """The evaluation's images as this step's sample grid (one row per prompt, the same seeds at every
        evaluation), so the report can set checkpoints side by side without generating them again."""
        from PIL import Image

        from stablediff.inference.pipeline import image_grid

        if self.images is None or self.step != step:
            return
        rows: dict[str, list] = {}
        for pixels, prompt in zip(self.images.images, self.images.prompts):
            rows.setdefault(prompt, []).append(Image.fromarray(pixels))
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(list(rows.values())).save(path)

    def write_report(self) -> str | None:
        """RUN_DIR/report.html rewritten with this evaluation; a message when it failed (training goes on)."""
        from stablediff.evaluation.report import write_report

        try:
            write_report(self.run_dir)
        except Exception as exc:  # a figure that cannot be drawn must not end an hour of training
            return f"eval: report.html could not be rewritten ({exc!r}); `stablediff report {self.run_dir}` retries"
        return None


def held_out_of(stage) -> HeldOut:
    """The training's held-out images and captions, as the registry takes them (no second read of the data)."""
    captions = list(stage.held_out_captions or [])
    captions += [""] * (len(stage.held_out) - len(captions))
    return HeldOut(stage.held_out, captions)
