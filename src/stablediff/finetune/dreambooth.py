"""DreamBooth with prior preservation (Ruiz et al. 2023): instance images plus class images.

The instance images (data.source) are captioned finetune.instance_prompt; the class
images (finetune.prior.class_data, or num_class_images the base model generates:
finetune/class_images.py) are captioned prior.class_prompt and train alongside them with
their loss multiplied by prior.loss_weight, so the model learns the subject without
forgetting what its class looks like.

The weight is per sample (EncodedDataset.weights, multiplied into each sample's loss
before the batch mean), and the instance samples repeat so that an epoch holds about as
many of them as class samples: diffusers pairs each instance image with a class image,
and kohya repeats the instance images for the same balance. Both are pure functions of
the data and the config, so a resumed run draws exactly what an uninterrupted one would.
The data fingerprint is taken over instance and class images together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from stablediff.config import RunConfig
from stablediff.data.training_set import BucketedCrops, CaptionedImages, load_training_data
from stablediff.finetune.class_images import ensure_class_images
from stablediff.training.encoded_dataset import EncodedDataset, bucket_step
from stablediff.training.interrupt import safe_point


@dataclass(frozen=True)
class PriorSamples:
    """How the training set splits: samples [0, num_instance) are instance images, the rest class images."""

    num_instance: int
    num_class: int
    loss_weight: float

    @property
    def instance_repeats(self) -> int:
        """Each instance sample's copies per epoch: about as many instance as class samples, at least one."""
        return max(1, round(self.num_class / self.num_instance))


def add_class_images(config: RunConfig, run_dir: Path, loaded: CaptionedImages, base, device=None,
                     say: Callable[[str], None] = print) -> tuple[CaptionedImages, PriorSamples | None]:
    """The instance images followed by the class images (generated first if need be); unchanged without a prior."""
    prior = config.finetune.prior if config.finetune is not None else None
    if prior is None:
        return loaded, None
    spec = prior.class_data
    if spec is None:
        folder = ensure_class_images(base.pipe, prior, config.seed, config.data.resolution, run_dir, base.record,
                                     device, say)
        spec = str(folder)
    classes = load_class_images(config, run_dir, spec, prior.num_class_images)
    classes.captions = [[prior.class_prompt] for _ in classes.captions]
    samples = PriorSamples(len(loaded.captions), len(classes.captions), prior.loss_weight)
    say(f"prior preservation: {samples.num_instance} instance images (each {samples.instance_repeats}x per epoch) "
        f"and {samples.num_class} class images ({prior.class_prompt!r}, loss weight {prior.loss_weight})")
    return concatenate(loaded, classes), samples


def load_class_images(config: RunConfig, run_dir: Path, spec: str, limit: int | None) -> CaptionedImages:
    """The class images through the data pipeline (validated, quarantined, framed like the instance images);
    none held out: the validation loss stays the instance images'."""
    data_cfg = config.data.model_copy(update={
        "source": spec, "validation_source": None, "held_out_fraction": 0.0, "caption_policy": "empty",
        "caption_shuffle_variants": 1, "limit": limit})
    quiet = lambda _line: None  # noqa: E731 - its data summary would talk of held-out images; ours says it
    return load_training_data(data_cfg, config.seed, run_dir, bucket_step(config.vae), quiet,
                              stop=safe_point("while reading the class images", "nothing needed saving yet"))


def concatenate(first: CaptionedImages, second: CaptionedImages) -> CaptionedImages:
    """`first`'s samples then `second`'s, with `first`'s held-out images (both framed by the same crop policy)."""
    a, b = first.prepared, second.prepared
    prepared = BucketedCrops(a.crop_policy, a.keys + b.keys, a.bucket_ids + b.bucket_ids, a.crops + b.crops)
    return CaptionedImages(torch.cat([first.images, second.images]), first.captions + second.captions,
                           first.held_out, prepared, first.held_out_captions, first.held_out_is_training)


def with_prior_weights(data: EncodedDataset, samples: PriorSamples | None) -> EncodedDataset:
    """The encoded set with the instance samples repeated and the class samples weighted (unchanged without)."""
    if samples is None:
        return data
    if len(data) != samples.num_instance + samples.num_class:
        raise AssertionError(f"{len(data)} encoded samples, expected {samples.num_instance} + {samples.num_class}")
    instance = torch.arange(samples.num_instance).repeat(samples.instance_repeats)
    chosen = torch.cat([instance, torch.arange(samples.num_instance, len(data))])
    weights = torch.cat([torch.ones(len(instance)), torch.full((samples.num_class,), float(samples.loss_weight))])
    return replace(data, bucket_of=data.bucket_of[chosen], row_of=data.row_of[chosen],
                   caption_ids=[data.caption_ids[i] for i in chosen.tolist()], weights=weights)
