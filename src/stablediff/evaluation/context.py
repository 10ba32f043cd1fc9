"""What every metric of one model is computed from: built once, filled in lazily, shared by the metrics.

An `EvalContext` wraps one in-memory StableDiffusionPipeline (a checkpoint of a run, an exported
folder, a single file, or the pipeline a training loop holds) and the RunConfig that says what it
was trained on. Nothing is computed until a metric asks for it, and then only once per context:

- `generated()`: `settings.num_samples` images from the same prompts and seeds for every model (the
  ten digit prompts for builtin:digits, else the run's held-out captions), shared by fd, kid,
  adherence and clip; a DreamBooth or textual-inversion fine-tune of one digit is prompted with its
  instance prompt, the words it learned the digit by;
- `held_out()`: the run's real held-out images and captions (the training's own split; a fine-tune's
  instance prompt replaces the captions, as in its training);
- `validation()`: their latents and caption embeddings (val_loss), unless the caller passes the
  training's ValidationSet in;
- reference features of the real images: once per process (a module-level cache keyed by the
  images' bytes and the feature network), so evaluating ten checkpoints computes them once.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from stablediff.config import RunConfig
from stablediff.data.digits import NUMBER_WORDS
from stablediff.evaluation.settings import VALIDATION_SAMPLES, EvalSettings

DIGIT_PROMPT = "a handwritten digit {word}"


class ValidationLike(Protocol):
    """training.periodic.ValidationSet, or what `EvalContext.validation` builds itself."""

    latents: torch.Tensor
    text_embeddings: torch.Tensor


@dataclass
class HeldOut:
    images: torch.Tensor  # (M, 3, R, R) in [-1, 1]
    captions: list[str]  # one per image ("" where the source has none)

    def pixels(self) -> np.ndarray:
        """(M, R, R, 3) uint8: the exact bytes the data was read as (inverse of pixels_to_tensor)."""
        return ((self.images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8) \
            .permute(0, 2, 3, 1).contiguous().numpy()


@dataclass
class Generated:
    images: np.ndarray  # (N, R, R, 3) uint8
    prompts: list[str]  # of each image
    digits: np.ndarray | None  # (N,) the digit each image asked for (builtin:digits), else None


@dataclass
class _Validation:
    latents: torch.Tensor
    text_embeddings: torch.Tensor


@dataclass
class EvalContext:
    """One model, what it was trained on, and the settings; see the module docstring.

    `validation_set` and `held_out_data` may be given by a training loop that has them already;
    `data_dir` receives the quarantine log should reading a non-builtin source reject images
    (default: a temporary folder, so evaluation never writes into a run)."""

    pipe: Any  # diffusers StableDiffusionPipeline
    config: RunConfig
    settings: EvalSettings = field(default_factory=EvalSettings)
    validation_set: ValidationLike | None = None
    held_out_data: HeldOut | None = None
    data_dir: Path | None = None
    train_scheduler: Any = None  # the training noise schedule (default: built from config.noise)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_digits(self) -> bool:
        return self.config.data.source.startswith("builtin:digits")

    @property
    def prediction_type(self) -> str:
        return self.config.train.prediction_type

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """The value of `make()`, computed on the first call for `key` only."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def held_out(self) -> HeldOut:
        return self.once("held_out", lambda: self.held_out_data or _load_held_out(self.config, self.data_dir))

    def generated(self) -> Generated:
        return self.once("generated", self._generate)

    def validation(self) -> ValidationLike:
        return self.once("validation", lambda: self.validation_set or self._encode(VALIDATION_SAMPLES))

    def noise_scheduler(self):
        from stablediff.models.build import build_noise_scheduler

        return self.once("noise_scheduler", lambda: self.train_scheduler or
                         build_noise_scheduler(self.config.noise, self.config.train.prediction_type))

    def encoded_held_out(self, count: int) -> _Validation:
        """Latents (scaled posterior means, on the UNet's device) and caption embeddings of the first
        `count` held-out images."""
        return self.once(f"encoded:{count}", lambda: self._encode(count))

    @torch.no_grad()
    def _encode(self, count: int) -> _Validation:
        from stablediff.models.text_encoder import encode_captions

        held = self.held_out()
        vae = self.pipe.vae
        images = held.images[:count].to(vae.device, vae.dtype)
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        text = encode_captions(self.pipe.tokenizer, self.pipe.text_encoder, held.captions[:count])
        return _Validation(latents.to(self.pipe.unet.device), text.to(self.pipe.unet.device))

    def _generate(self) -> Generated:
        from stablediff.inference.pipeline import images_to_array, txt2img

        prompts, digits = self._prompts()
        s = self.settings
        images, image_prompts, image_digits = [], [], []
        for index, prompt in enumerate(prompts):
            count = s.num_samples // len(prompts) + (1 if index < s.num_samples % len(prompts) else 0)
            if count == 0:
                continue
            # seeded generators; registry.evaluate, the one caller, already keeps the caller's stream as it was
            batch = txt2img(self.pipe, prompt, steps=s.sample_steps, guidance_scale=s.guidance_scale,
                            seed=s.seed, num=count)
            images += batch
            image_prompts += [prompt] * len(batch)
            image_digits += [digits[index]] * len(batch) if digits is not None else []
        return Generated(images_to_array(images), image_prompts,
                         np.array(image_digits, dtype=np.int64) if digits is not None else None)

    def _prompts(self) -> tuple[list[str], list[int] | None]:
        """(distinct prompts, the digit of each or None): the selected digits for builtin:digits, else
        the held-out captions in the split's order (the first num_samples of them)."""
        if self.is_digits:
            digits = list(digit_selection(self.config.data.source))
            instance = self.config.instance_prompt
            if instance is not None and len(digits) == 1:  # e.g. "a handwritten digit <nine>": what it learned
                return [instance], digits
            return [DIGIT_PROMPT.format(word=NUMBER_WORDS[d]) for d in digits], digits
        captions = self.held_out().captions[: self.settings.num_samples]
        return captions, None


def digit_selection(source: str) -> tuple[int, ...]:
    """The digits a builtin:digits source trains on (all ten unless it selects some)."""
    from stablediff.data.sources.builtin import parse_builtin

    return tuple(parse_builtin(source).selection.digits)


def _load_held_out(config: RunConfig, data_dir: Path | None) -> HeldOut:
    """The training's own held-out split, read as training reads it (buckets do not change it)."""
    from stablediff.data.training_set import load_training_data

    data_cfg = config.data.model_copy(update={"buckets": None})
    with tempfile.TemporaryDirectory(prefix="stablediff-eval-") as scratch:
        data = load_training_data(data_cfg, config.seed, Path(data_dir or scratch), 8, log=lambda _: None)
    if data.held_out_is_training or len(data.held_out) == 0:
        from stablediff.errors import DataError

        raise DataError(f"data.source {config.data.source!r} holds out no images, and fd, kid, bpd and val_loss "
                        "compare with held-out ones; raise data.held_out_fraction or give data.validation_source")
    if config.instance_prompt is not None:  # as the fine-tune captioned them (finetune/run.with_instance_prompt)
        return HeldOut(data.held_out, [config.instance_prompt] * len(data.held_out))
    captions = list(data.held_out_captions or [])
    captions += [""] * (len(data.held_out) - len(captions))
    return HeldOut(data.held_out, captions)


_REFERENCE_FEATURES: dict[tuple[str, str], np.ndarray] = {}


def reference_features(space: str, pixels: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`compute(pixels)`, once per process for the same feature space (`space` names the network and
    its weights) and the same images."""
    key = (space, hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest())
    if key not in _REFERENCE_FEATURES:
        _REFERENCE_FEATURES[key] = compute(pixels)
    return _REFERENCE_FEATURES[key]
