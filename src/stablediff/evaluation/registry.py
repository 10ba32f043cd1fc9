"""The metric registry: how each metric of `run_schema.METRIC_MODES` is computed from an EvalContext.

Public API (the CLI's `stablediff eval` and train-time evaluation both call it):

    check_requirements(names, config, settings)   # fails fast, before any model is loaded
    evaluate(context, names) -> {name: MetricResult}
    metric_settings(name, settings, config) -> dict   # what a cached result is keyed by

`evaluate` computes the metrics in the order given, sharing the context's lazy parts (the
generated images, the held-out set, the reference features), under a forked torch RNG so the
caller's random stream is as it was. Every metric is deterministic: the same weights, data and
settings give the same numbers. A MetricResult's `seconds` is the wall time of that metric
including shared work it was the first to need (the first of fd/kid/adherence/clip pays for the
generation). The directions (lower or higher is better) live in METRIC_MODES alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from stablediff.evaluation.context import EvalContext, reference_features
from stablediff.evaluation.metric_result import MetricResult
from stablediff.evaluation.settings import BPD_VARIANCE, DIGIT_SPACE, KID_SUBSET_SIZE, KID_SUBSETS, EvalSettings, \
    available_metrics, check_requirements, metric_settings
from stablediff.run_schema import METRIC_MODES

# The public API, importable from here (the settings and requirements live in the light settings.py).
__all__ = ["EvalContext", "EvalSettings", "MetricResult", "available_metrics", "check_requirements", "evaluate",
           "metric_settings"]


@dataclass(frozen=True)
class _Measured:
    value: float
    spread: float | None
    count: int
    details: dict


def evaluate(context: EvalContext, names: Sequence[str]) -> dict[str, MetricResult]:
    """{name: MetricResult} for each of `names`, in that order; see the module docstring."""
    check_requirements(names, context.config, context.settings)
    device = context.pipe.unet.device
    results = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name in dict.fromkeys(names):
            started = time.perf_counter()
            measured = _COMPUTE[name](context)
            results[name] = MetricResult(name, float(measured.value), measured.spread, int(measured.count),
                                         time.perf_counter() - started,
                                         metric_settings(name, context.settings, context.config), measured.details)
    return results


# -- the metrics ---------------------------------------------------------------------------------

def _val_loss(context: EvalContext) -> _Measured:
    from stablediff.evaluation.val_loss import validation_loss

    vset = context.validation()
    device = context.pipe.unet.device
    result = validation_loss(context.pipe.unet, context.noise_scheduler(), vset.latents.to(device),
                             vset.text_embeddings.to(device), context.prediction_type,
                             timesteps=context.config.train.validation_timesteps)
    return _Measured(result["loss"], None, len(vset.latents),
                     {"per_timestep": {str(t): v for t, v in result["per_timestep"].items()}})


def _feature_pair(context: EvalContext) -> tuple[str, np.ndarray, np.ndarray]:
    """(feature space, generated features, real held-out features) in the digit or Inception space."""
    if context.settings.inception is not None:
        from stablediff.evaluation import inception

        model = context.once("inception", lambda: inception.load_inception(context.settings.inception)
                             .to(context.pipe.unet.device))
        space: str = f"inception:{model.fingerprint}"
        compute: Callable[[np.ndarray], np.ndarray] = lambda pixels: inception.features(pixels, model)
    else:
        from stablediff.evaluation import digit_features

        space, compute = DIGIT_SPACE, digit_features.features
    generated = context.once(f"features:{space}", lambda: compute(context.generated().images))
    return space, generated, reference_features(space, context.held_out().pixels(), compute)


def _frechet(context: EvalContext) -> _Measured:
    from stablediff.evaluation.frechet import SampleCountWarning, frechet_distance

    space, generated, real = _feature_pair(context)
    with warnings.catch_warnings():  # the message is kept in the result: the CLI prints it once
        warnings.simplefilter("ignore", SampleCountWarning)
        score = frechet_distance(generated, real)
    return _score(score, space)


def _kid(context: EvalContext) -> _Measured:
    from stablediff.evaluation.frechet import kernel_inception_distance

    space, generated, real = _feature_pair(context)
    score = kernel_inception_distance(generated, real, num_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                                      seed=context.settings.seed)
    return _score(score, space)


def _score(score: Any, space: str) -> _Measured:
    return _Measured(score.value, score.spread, score.count,
                     {"reference_count": score.reference_count, "feature_dim": score.feature_dim,
                      "warning": score.warning, "feature_space": space})


def _adherence(context: EvalContext) -> _Measured:
    from stablediff.evaluation.adherence import adherence

    generated = context.generated()
    report = adherence(generated.images, generated.digits, resolution=generated.images.shape[1])
    details = report.to_json()
    details.pop("value")
    details.pop("count")
    details["accuracy"] = report.adherence
    return _Measured(report.adherence, None, report.count, details)


def _bpd(context: EvalContext) -> _Measured:
    from stablediff.evaluation.likelihood import bits_per_dim

    encoded = context.encoded_held_out(context.settings.num_samples)
    result = bits_per_dim(context.pipe.unet, context.noise_scheduler(), encoded.latents, encoded.text_embeddings,
                          context.prediction_type, num_timesteps=context.settings.bpd_timesteps,
                          seed=context.settings.seed, space="latent", variance=BPD_VARIANCE)
    details = {k: v for k, v in result.to_json().items() if k not in ("value", "standard_error", "num_images")}
    return _Measured(result.value, result.standard_error, result.num_images, details)


def _clip(context: EvalContext) -> _Measured:
    from stablediff.evaluation.clip_score import load_clip

    scorer = context.once("clip", lambda: load_clip(context.settings.clip, device=context.pipe.unet.device))
    generated = context.generated()
    result = scorer.score(generated.images, generated.prompts)
    return _Measured(result.mean, result.std, result.count,
                     {"truncated_prompts": result.truncated, "clip_model": str(scorer.folder)})


_COMPUTE: dict[str, Callable[[EvalContext], _Measured]] = {
    "val_loss": _val_loss, "fd": _frechet, "kid": _kid, "adherence": _adherence, "bpd": _bpd, "clip": _clip}
assert set(_COMPUTE) == set(METRIC_MODES), "every metric of METRIC_MODES needs its computation here"
