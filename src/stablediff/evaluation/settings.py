"""What an evaluation's numbers depend on besides the weights, and what each metric needs to be computed.

Light on purpose (no torch): `stablediff eval` decides from these alone whether a cached result
can be reused, and refuses a metric it cannot compute, before any model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from stablediff.config import RunConfig
from stablediff.errors import ConfigError, ModelFileError
from stablediff.run_schema import METRIC_MODES

DEFAULT_NUM_SAMPLES = 100
DEFAULT_SEED = 1000
DEFAULT_SAMPLE_STEPS = 20
DEFAULT_GUIDANCE = 3.0
DEFAULT_BPD_TIMESTEPS = 32
VALIDATION_SAMPLES = 64  # held-out images in the validation loss (fixed: comparable across checkpoints)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
BPD_VARIANCE = "beta"
DIGIT_SPACE = "digits-cnn"  # the built-in digit feature network (evaluation/digit_features.py)


@dataclass(frozen=True)
class EvalSettings:
    """What the numbers depend on besides the weights: part of each cached result's key."""

    num_samples: int = DEFAULT_NUM_SAMPLES  # generated images (fd, kid, adherence, clip); held-out images for bpd
    seed: int = DEFAULT_SEED  # generation seeds seed, seed + 1, ... per prompt; bpd's and KID's draws
    sample_steps: int = DEFAULT_SAMPLE_STEPS  # sampling steps of each generated image
    guidance_scale: float = DEFAULT_GUIDANCE
    bpd_timesteps: int = DEFAULT_BPD_TIMESTEPS  # importance-sampled KL terms per image
    inception: str | None = None  # FID Inception weights file: fd/kid in Inception space
    clip: str | None = None  # local CLIP model folder: the clip metric
    weights: str = "ema"  # which of a checkpoint's UNets the pipeline holds ("ema" or "raw"): recorded only

    def __post_init__(self) -> None:
        for name in ("num_samples", "sample_steps", "bpd_timesteps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval: {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


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
