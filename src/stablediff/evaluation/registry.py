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

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from stablediff.config import RunConfig
from stablediff.errors import ConfigError, ModelFileError
from stablediff.evaluation.context import EvalContext, EvalSettings, reference_features
from stablediff.evaluation.val_loss import VALIDATION_SAMPLES
from stablediff.run_schema import METRIC_MODES

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
BPD_VARIANCE = "beta"
DIGIT_SPACE = "digits-cnn"  # the built-in digit feature network (evaluation/digit_features.py)


@dataclass(frozen=True)
class MetricResult:
    """One metric of one model: the eval.json entry's fields, `details` metric-specific (adherence: macro
    and per-class precision/recall/F1, accuracy, confusion; fd/kid: reference_count, feature_dim,
    warning; bpd: its unit and parts; val_loss: per_timestep)."""

    name: str
    value: float
    spread: float | None  # KID's std over subsets, bpd's standard error, CLIP's std; None for one number
    count: int  # samples the value rests on (generated images, held-out images)
    seconds: float
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"value": self.value, "spread": self.spread, "count": self.count, "seconds": self.seconds,
                "settings": self.settings, **self.details}

    @classmethod
    def from_json(cls, name: str, entry: dict) -> MetricResult:
        core = ("value", "spread", "count", "seconds", "settings")
        return cls(name, entry["value"], entry.get("spread"), entry.get("count", 0), entry.get("seconds", 0.0),
                   dict(entry.get("settings") or {}), {k: v for k, v in entry.items() if k not in core})


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


def check_requirements(names: Sequence[str], config: RunConfig, settings: EvalSettings) -> None:
    """One error naming what to provide, for the first metric that cannot be computed here."""
    unknown = [n for n in names if n not in METRIC_MODES]
    if unknown:
        raise ConfigError(f"unknown metric {', '.join(map(repr, unknown))}; the metrics are "
                          f"{', '.join(METRIC_MODES)} (--metrics takes a comma-separated list of them)")
    digits = config.data.source.startswith("builtin:digits")
    if any(n in ("fd", "kid") for n in names) and not digits and settings.inception is None:
        from stablediff.evaluation.inception import WHAT_TO_PROVIDE

        raise ModelFileError(f"fd and kid compare features of generated and real images; for data "
                             f"{config.data.source!r} (not builtin:digits, which has its own feature network) they "
                             f"need Inception features: give --inception PATH. {WHAT_TO_PROVIDE}")
    if "adherence" in names and not digits:
        raise ConfigError(f"adherence reads generated digits with a digit classifier, so it needs builtin:digits "
                          f"data; this model was trained on {config.data.source!r}. Leave adherence out of "
                          "--metrics (clip measures prompt adherence for any data, with --clip FOLDER)")
    if "clip" in names and settings.clip is None:
        from stablediff.evaluation.clip_score import WHAT_TO_PROVIDE as CLIP_FOLDER

        raise ConfigError(f"the clip metric needs a local CLIP model: give --clip FOLDER. {CLIP_FOLDER}")


def available_metrics(config: RunConfig, settings: EvalSettings) -> list[str]:
    """The metrics that can be computed for this data with these settings (the default --metrics)."""
    names = []
    for name in METRIC_MODES:
        try:
            check_requirements([name], config, settings)
        except (ConfigError, ModelFileError):
            continue
        names.append(name)
    return names


def metric_settings(name: str, settings: EvalSettings, config: RunConfig) -> dict:
    """Everything besides the weights that `name`'s number depends on: a cached result is reused only
    when these are equal."""
    return {**_metric_settings(name, settings, config), "weights": settings.weights}


def _metric_settings(name: str, settings: EvalSettings, config: RunConfig) -> dict:
    generation = {"num_samples": settings.num_samples, "seed": settings.seed, "sample_steps": settings.sample_steps,
                  "guidance_scale": settings.guidance_scale}
    if name == "val_loss":
        return {"timesteps": config.train.validation_timesteps, "samples": VALIDATION_SAMPLES}
    if name == "bpd":
        return {"num_samples": settings.num_samples, "seed": settings.seed, "timesteps": settings.bpd_timesteps,
                "variance": BPD_VARIANCE}
    if name in ("fd", "kid"):
        features = DIGIT_SPACE if settings.inception is None else f"inception:{_file_digest(settings.inception)}"
        extra = {"num_subsets": KID_SUBSETS, "subset_size": KID_SUBSET_SIZE} if name == "kid" else {}
        return {**generation, "features": features, **extra}
    if name == "clip":
        return {**generation, "clip": _folder_identity(settings.clip)}
    return generation


def _file_digest(path: str) -> str:
    stat = os.stat(path) if os.path.isfile(path) else None
    return _digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns) if stat else f"missing:{path}"


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """BLAKE3 of the file (what InceptionModel.fingerprint holds), memoised by its size and time."""
    import blake3

    hasher = blake3.blake3()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _folder_identity(folder: str | None) -> str:
    """The folder and the size and time of its files: a changed model is not confused with the old one."""
    root = os.path.abspath(folder or "")
    entries = sorted((n, os.stat(os.path.join(root, n))) for n in os.listdir(root)) if os.path.isdir(root) else []
    return root + "|" + ",".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in entries)


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
