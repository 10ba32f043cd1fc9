"""What `stablediff eval` does: evaluate a run's checkpoints (or one model), through eval.json's cache.

For a run directory every kept text-to-image checkpoint (or those `--steps` names) is
evaluated in step order; each one's results are written as soon as they exist, so an
interrupted evaluation keeps what it finished. A checkpoint whose every metric is cached
with the same settings is not even loaded. The best mark is then chosen among all kept
checkpoints that have a result for the ranking metric.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stablediff import run_schema as schema
from stablediff.errors import CheckpointError, ConfigError, MissingPathError
from stablediff.evaluation.metric_result import MetricResult
from stablediff.evaluation.settings import EvalSettings, available_metrics, check_requirements, metric_settings
from stablediff.evaluation.results import CHECKPOINTS, MODELS, best_mark, cached_result, computed_metrics, \
    record_results
from stablediff.io.run_files import read_eval


@dataclass
class Evaluated:
    """One checkpoint's (or model's) results and which of them came from the cache."""

    key: str
    results: dict[str, MetricResult]
    cached: set[str] = field(default_factory=set)
    seconds: float = 0.0


@dataclass
class EvalPlan:
    names: list[str] | None  # None: every metric available for the data and settings
    settings: EvalSettings
    out_dir: Path | None
    ema: bool = True
    trust_pickle: bool = False
    say: Callable[[str], None] = print

    def metrics_for(self, config) -> list[str]:
        names = self.names if self.names is not None else available_metrics(config, self.settings)
        check_requirements(names, config, self.settings)
        return names


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "config.yaml").is_file()


def kept_checkpoints(run_dir: Path) -> tuple[object, list, dict[int, str], dict[int, dict]]:
    """(store, replicas, {step: manifest checksum}, {step: config dict}) of the run's valid, not abandoned,
    text-to-image checkpoints."""
    from stablediff.checkpoint.run_stores import run_stores

    if not (run_dir / "checkpoints" / "manifests").is_dir():
        raise MissingPathError(f"{run_dir} has no checkpoints yet (no checkpoints/manifests/), so there is nothing "
                               "to evaluate; train it first (`stablediff train`), or give a diffusers folder")
    store, replicas = run_stores(run_dir)
    identities, configs = {}, {}
    for summary in store.list():
        if not summary.valid:
            continue
        manifest = store.read_manifest(summary.step)
        if schema.stage_of(manifest.meta) == schema.UNET_STAGE and schema.CONFIG in manifest.meta:
            identities[summary.step] = manifest.checksum
            configs[summary.step] = manifest.meta[schema.CONFIG]
    if not identities:
        raise CheckpointError(f"{run_dir} holds no text-to-image checkpoint yet (only the autoencoder's stage, or "
                              "none that verifies); let `stablediff train` reach its first UNet checkpoint")
    return store, replicas, identities, configs


def select_steps(identities: dict[int, str], steps: list[int] | None, run_dir: Path) -> list[int]:
    kept = sorted(identities)
    if steps is None:
        return kept
    unknown = [s for s in steps if s not in identities]
    if unknown:
        raise CheckpointError(f"--steps {','.join(map(str, unknown))}: {run_dir} keeps no checkpoint of "
                              f"{'that step' if len(unknown) == 1 else 'those steps'}; the kept steps are "
                              f"{', '.join(map(str, kept))} (`stablediff ckpt list {run_dir}`)")
    return sorted(set(steps))


def evaluate_run(run_dir: Path, plan: EvalPlan, steps: list[int] | None) -> tuple[list[Evaluated], dict]:
    """Every selected checkpoint's results, and the identities of all kept checkpoints."""
    from stablediff.config import RunConfig

    store, replicas, identities, configs = kept_checkpoints(run_dir)
    chosen = select_steps(identities, steps, run_dir)
    out_dir = plan.out_dir or run_dir
    plan.metrics_for(RunConfig.model_validate(configs[chosen[-1]]))  # fail before any checkpoint is loaded
    held_out: dict[str, object] = {}  # data config -> HeldOut: read once for every checkpoint
    evaluated = []
    for step in chosen:
        config = RunConfig.model_validate(configs[step])

        def load(step=step):
            from stablediff.models.run_export import pipeline_from_checkpoint

            loaded = store.load(step, fallbacks=replicas)
            return pipeline_from_checkpoint(loaded, plan.ema, plan.trust_pickle, f"{run_dir} step {step}", run_dir)

        evaluated.append(_evaluate_one(plan, config, out_dir, CHECKPOINTS, str(step), identities[step], load,
                                       held_out))
    return evaluated, identities


def _evaluate_one(plan: EvalPlan, config, out_dir: Path, section: str, key: str, identity: str,
                  load: Callable[[], object], held_out: dict, train_scheduler=None) -> Evaluated:
    """One model's metrics: cached ones read back, the others computed and recorded at once."""
    started = time.perf_counter()
    names = plan.metrics_for(config)
    data = read_eval(out_dir)
    results = {n: cached_result(data, section, key, identity, n, metric_settings(n, plan.settings, config))
               for n in names}
    cached = {n for n, r in results.items() if r is not None}
    missing = [n for n in names if n not in cached]
    if missing:
        from stablediff.evaluation.context import EvalContext
        from stablediff.evaluation.registry import evaluate

        pipe = _to_device(load())
        data_key = config.data.model_dump_json()
        context = EvalContext(pipe, config, plan.settings, held_out_data=held_out.get(data_key),
                              train_scheduler=train_scheduler)
        new = evaluate(context, missing)
        held_out.setdefault(data_key, context.held_out())
        record_results(out_dir, section, key, identity, new)
        results.update(new)
    done = Evaluated(key, {n: results[n] for n in names}, cached, time.perf_counter() - started)
    plan.say(_progress(done, section))
    return done


def _progress(done: Evaluated, section: str) -> str:
    what = f"step {done.key}" if section == CHECKPOINTS else done.key
    computed = [n for n in done.results if n not in done.cached]
    parts = []
    if computed:
        parts.append(f"{', '.join(computed)} computed")
    if done.cached:
        parts.append(f"{', '.join(n for n in done.results if n in done.cached)} cached")
    return f"{what}: {'; '.join(parts)} ({done.seconds:.1f} s)"


def _to_device(pipe):
    import torch

    return pipe.to("cuda") if torch.cuda.is_available() else pipe


def mark_best(out_dir: Path, identities: dict[int, str], best_metric: str | None) -> dict | None:
    """Choose and write the best mark (default: fd where some checkpoint has it, else val_loss)."""
    from stablediff.io.run_files import update_eval

    data = read_eval(out_dir)
    if best_metric is not None and best_metric not in schema.METRIC_MODES:
        raise ConfigError(f"--best-metric {best_metric!r} is no metric; the metrics are "
                          f"{', '.join(schema.METRIC_MODES)}")
    metric = best_metric or ("fd" if "fd" in computed_metrics(data, identities) else "val_loss")
    mark = best_mark(data, metric, identities)
    if mark is None:
        if best_metric is not None:
            raise ConfigError(f"--best-metric {metric}: no kept checkpoint has a {metric} result; add {metric} to "
                              "--metrics so it is computed")
        return None
    update_eval(out_dir, best=mark)
    return mark


def evaluate_model(model: Path, plan: EvalPlan, data_source: str) -> Evaluated:
    """A diffusers folder or single file, as trained on `data_source`; recorded under "models" with --out."""
    from diffusers import DDPMScheduler

    from stablediff.config import RunConfig
    from stablediff.inference.metadata import file_short_hash
    from stablediff.inference.pipeline import model_default_size
    from stablediff.inference.resolve import load_source, resolve_model

    source = resolve_model(model)
    plan.metrics_for(RunConfig.model_validate({"data": {"source": data_source}}))
    pipe = load_source(source, plan.trust_pickle)
    scheduler_config = dict(pipe.scheduler.config)
    config = RunConfig.model_validate({
        "data": {"source": data_source, "resolution": model_default_size(pipe)[0]},
        "train": {"prediction_type": scheduler_config.get("prediction_type", "epsilon")}})
    weights = source.weights_file()
    identity = f"autov2:{file_short_hash(weights)}" if weights is not None else f"path:{source.path}"
    scheduler = DDPMScheduler.from_config(scheduler_config)  # the model's own noise schedule (val_loss, bpd)
    if plan.out_dir is not None:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        return _evaluate_one(plan, config, plan.out_dir, MODELS, str(source.path), identity, lambda: pipe, {},
                             scheduler)
    with tempfile.TemporaryDirectory(prefix="stablediff-eval-") as scratch:  # no --out: print, keep nothing
        return _evaluate_one(plan, config, Path(scratch), MODELS, str(source.path), identity, lambda: pipe, {},
                             scheduler)
