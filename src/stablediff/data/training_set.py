"""Turn any data source into training tensors: validate, quarantine, frame (bucket and crop), split.

Every sample is judged; rejects go to RUN_DIR/quarantine.jsonl with their
reason and the run goes on, unless rejects exceed `data.max_reject_fraction`.
One sample in twenty (chosen by content hash, so stable across runs) is held
out for evaluation. Decoding runs in `data.num_workers` processes
(`ingest.py`); the result does not depend on how many.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stablediff.config.schema import DataConfig
from stablediff.data.buckets import resolve_buckets
from stablediff.data.captions import shuffled_variants
from stablediff.data.digits import load_digits
from stablediff.data.crop_policy import CropPolicy
from stablediff.data.ingest import IngestTask, default_num_workers, ingest
from stablediff.data.sources import open_source
from stablediff.data.transforms import pixels_to_tensor
from stablediff.data.validate import (
    DEFAULT_VALIDATION,
    Quarantine,
    ValidationConfig,
    Validator,
    check_reject_fraction,
    content_hash,
)
from stablediff.errors import DataError

HELD_OUT_EVERY = 20


@dataclass
class BucketedCrops:
    """The training images as the VAE will see them: per sample, its bucket and crop variants."""

    crop_policy: CropPolicy
    keys: list[str]  # per sample, the BLAKE3 of its file's bytes (the feature cache's key)
    bucket_ids: list[int]  # per sample, an index into crop_policy.sizes
    # Per sample, per crop variant: (3, h, w), h x w its bucket's; float in [-1, 1], or uint8 (a quarter
    # of the memory, which matters with several crops per image), converted when stacked.
    crops: list[list[torch.Tensor]]

    @classmethod
    def square(cls, images: torch.Tensor, keys: list[str]) -> BucketedCrops:
        """Bucketing and random crop off: each (N, 3, R, R) image is its only crop."""
        return cls(CropPolicy.square(images.shape[-1]), list(keys), [0] * len(images), [[image] for image in images])

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, bucket: int) -> list[int]:
        """The samples in a bucket, in sample order."""
        return [i for i, b in enumerate(self.bucket_ids) if b == bucket]

    def stack(self, bucket: int, variant: int) -> tuple[list[int], torch.Tensor]:
        """(sample indices, their crops (n, 3, h, w) in [-1, 1]) for one bucket and crop variant."""
        members = self.members(bucket)
        crops = torch.stack([self.crops[i][variant] for i in members])
        return members, crops.float().div(127.5).sub(1.0) if crops.dtype == torch.uint8 else crops


@dataclass
class CaptionedImages:
    images: torch.Tensor  # (N, 3, R, R) centre crops in [-1, 1]: the VAE stage trains on these
    captions: list[list[str]]  # per sample, its caption variants
    held_out: torch.Tensor  # (M, 3, R, R)
    prepared: BucketedCrops  # the same samples, bucketed and cropped for the latents
    held_out_captions: list[str] | None = None  # one per held-out image (the validation loss's prompts)

    @property
    def keys(self) -> list[str]:
        return self.prepared.keys


def load_captioned_images(spec: str, resolution: int, run_dir: Path, max_reject_fraction: float,
                          caption_policy: str = "error", limit: int | None = None,
                          crop_policy: CropPolicy | None = None, num_workers: int = 0,
                          validation: ValidationConfig = DEFAULT_VALIDATION, allow_outside_paths: bool = False,
                          stop: Callable[[], None] | None = None) -> CaptionedImages:
    """Every sample of `spec` judged (rejects to RUN_DIR/quarantine.jsonl), prepared and split.

    `crop_policy` buckets and crops the images for the latents (default: the `resolution`
    square, centre crop); `num_workers` decode in that many processes (same result).
    `stop` is called before each sample and may raise to end ingestion there (SIGTERM).
    """
    crop_policy = crop_policy or CropPolicy.square(resolution)
    task = IngestTask(validation, crop_policy, resolution)
    validator = Validator(task.validation)
    kept = _Kept()
    judged = ingest(open_source(spec, caption_policy, allow_outside_paths), validator, task, num_workers)
    with Quarantine(run_dir) as quarantine, closing(judged):  # closing: a `limit` stops the workers at once
        for sample, verdict, prepared in judged:
            if stop is not None:
                stop()
            if prepared is None:
                quarantine.add(sample, verdict)
            elif kept.add(sample, verdict, prepared) and limit and len(kept.squares) >= limit:
                break
    check_reject_fraction(dict(validator.rejects), validator.total, max_reject_fraction, quarantine.path)
    if not kept.squares:
        raise DataError(f"data.source {spec!r}: no usable training samples")
    return kept.images(crop_policy, resolution)


@dataclass
class _Kept:
    """The accepted samples so far: every HELD_OUT_EVERY-th (by content hash) held out, the rest for training."""

    squares: list = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    crops: list = field(default_factory=list)
    held: list = field(default_factory=list)
    held_captions: list[str] = field(default_factory=list)

    def add(self, sample, verdict, prepared) -> bool:
        """Keep one accepted sample; True when it went to the training set."""
        if int(verdict.content_hash[:8], 16) % HELD_OUT_EVERY == 0:
            self.held.append(prepared.square)
            self.held_captions.append(sample.caption or "")
            return False
        self.squares.append(prepared.square)
        self.captions.append([sample.caption or ""])
        self.keys.append(verdict.content_hash)
        self.buckets.append(prepared.bucket)
        self.crops.append(prepared.crops)
        return True

    def images(self, crop_policy: CropPolicy, resolution: int) -> CaptionedImages:
        images = pixels_to_tensor(np.stack(self.squares))
        held_out = pixels_to_tensor(np.stack(self.held)) if self.held else images[:1]
        held_captions = self.held_captions if self.held else self.captions[0][:1]
        prepared = _bucketed_crops(images, crop_policy, resolution, self.keys, self.buckets, self.crops)
        return CaptionedImages(images, self.captions, held_out, prepared, held_captions)


def _bucketed_crops(images: torch.Tensor, crop_policy: CropPolicy, resolution: int, keys: list[str], buckets: list[int],
            crops: list[list[np.ndarray]]) -> BucketedCrops:
    if crop_policy.is_square_center(resolution):  # the crops are the images: share their memory
        return BucketedCrops(crop_policy, keys, buckets, [[image] for image in images])
    return BucketedCrops(crop_policy, keys, buckets, [[torch.from_numpy(c).permute(2, 0, 1) for c in variants]
                                                 for variants in crops])


def crop_policy_for(cfg: DataConfig, seed: int, bucket_step: int) -> CropPolicy:
    """The `CropPolicy` a data config asks for; `bucket_step` is 8 x the VAE's downscale."""
    sizes = resolve_buckets(cfg.buckets, cfg.resolution, bucket_step) or [(cfg.resolution, cfg.resolution)]
    return CropPolicy(tuple(sizes), cfg.crop, cfg.crop_variants, seed)


def load_training_data(cfg: DataConfig, seed: int, run_dir: Path, bucket_step: int,
                       log: Callable[[str], None] = print, stop: Callable[[], None] | None = None) -> CaptionedImages:
    """The digits' fixed split, or any source through validation; captions tag-shuffled if asked.
    `stop`: see `load_captioned_images`."""
    crop_policy = crop_policy_for(cfg, seed, bucket_step)
    if cfg.source == "builtin:digits":
        return _digits(cfg, crop_policy)
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    data = load_captioned_images(cfg.source, cfg.resolution, run_dir, cfg.max_reject_fraction, cfg.caption_policy,
                                 cfg.limit, crop_policy, workers, ValidationConfig(max_aspect=cfg.max_aspect),
                                 cfg.allow_outside_paths, stop)
    log(f"data: {len(data.captions)} training and {len(data.held_out)} held-out samples from {cfg.source}"
        + (f" in {len(set(data.prepared.bucket_ids))} buckets" if cfg.buckets else ""))
    if cfg.caption_shuffle_variants > 1:
        data.captions = [shuffled_variants(c[0], cfg.caption_shuffle_variants, seed, i, cfg.keep_tokens)
                         for i, c in enumerate(data.captions)]
    return data


def _digits(cfg: DataConfig, crop_policy: CropPolicy) -> CaptionedImages:
    train, held = load_digits(cfg.resolution)
    n = cfg.limit or len(train)
    pixels = train.images[:n]  # (n, R, R, 3) uint8
    images = pixels_to_tensor(pixels)
    keys = [content_hash(image.tobytes()) for image in pixels]
    captions = [train.captions_for(i) for i in range(n)]
    if crop_policy.is_square_center(cfg.resolution):
        prepared = BucketedCrops.square(images, keys)
    else:
        from PIL import Image

        buckets, crops = zip(*(crop_policy.frame(Image.fromarray(image), key) for image, key in zip(pixels, keys)))
        prepared = _bucketed_crops(images, crop_policy, cfg.resolution, keys, list(buckets), list(crops))
    held_captions = [held.captions_for(i)[0] for i in range(len(held))]
    return CaptionedImages(images, captions, pixels_to_tensor(held.images), prepared, held_captions)
