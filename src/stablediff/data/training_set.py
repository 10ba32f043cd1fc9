"""Turn any data source into training tensors: validate, quarantine, frame (bucket and crop), split.

Every sample is judged; rejects go to RUN_DIR/quarantine.jsonl with their
reason and the run goes on, unless rejects exceed `data.max_reject_fraction`.
`data.held_out_fraction` of the samples (chosen by content hash, so stable
across runs; one in twenty by default) is held out for evaluation, or, with
`data.validation_source`, none is and that source's images are the held-out
set. The built-in digits keep their fixed 20% split. Decoding runs in
`data.num_workers` processes (`ingest.py`); the result does not depend on how
many.
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
from stablediff.data.sources.builtin import BUILTIN_PREFIX, DigitSelection, parse_builtin
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

DEFAULT_HELD_OUT_FRACTION: float = DataConfig.model_fields["held_out_fraction"].default  # one in twenty
_HASH_QUOTIENTS = 2**32 // 20 + 1  # more than the largest 32-bit value // 20: scales it into [0, 1)


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
    held_out_is_training: bool = False  # nothing was held out: `held_out` is a training image (see _without_held_out)

    @property
    def keys(self) -> list[str]:
        return self.prepared.keys


def load_captioned_images(spec: str, resolution: int, run_dir: Path, max_reject_fraction: float,
                          caption_policy: str = "error", limit: int | None = None,
                          crop_policy: CropPolicy | None = None, num_workers: int = 0,
                          validation: ValidationConfig = DEFAULT_VALIDATION, allow_outside_paths: bool = False,
                          stop: Callable[[], None] | None = None,
                          held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> CaptionedImages:
    """Every sample of `spec` judged (rejects to RUN_DIR/quarantine.jsonl), prepared and split.

    `crop_policy` buckets and crops the images for the latents (default: the `resolution`
    square, centre crop); `num_workers` decode in that many processes (same result).
    `stop` is called before each sample and may raise to end ingestion there (SIGTERM).
    `held_out_fraction` of the samples (by content hash, see `is_held_out`) are held out.
    """
    crop_policy = crop_policy or CropPolicy.square(resolution)
    reader = SourceReader(run_dir, max_reject_fraction, IngestTask(validation, crop_policy, resolution),
                          caption_policy, num_workers, allow_outside_paths, stop)
    return _training_set(reader.read(spec, _Kept(held_out_fraction), limit), spec, crop_policy, resolution)


def _training_set(kept: _Kept, spec: str, crop_policy: CropPolicy, resolution: int) -> CaptionedImages:
    if not kept.squares:
        raise DataError(f"data.source {spec!r}: no usable training samples"
                        + (" (every accepted one was held out: lower data.held_out_fraction)" if kept.held else ""))
    return kept.images(crop_policy, resolution)


def load_held_out_images(reader: SourceReader, spec: str) -> tuple[torch.Tensor, list[str]]:
    """Every accepted sample of `spec` as held-out images (M, 3, R, R) in [-1, 1] and their captions."""
    kept = reader.read(spec, _Kept(held_out_fraction=1.0), what="data.validation_source")
    if not kept.held:
        raise DataError(f"data.validation_source {spec!r}: no usable validation samples; every one was "
                        f"rejected (see {Path(reader.run_dir) / 'quarantine.jsonl'})")
    return pixels_to_tensor(np.stack(kept.held)), kept.held_captions


def is_held_out(content_hash: str, fraction: float) -> bool:
    """Whether the sample with this BLAKE3 hex digest is held out when `fraction` of a source is."""
    h = int(content_hash[:8], 16)
    # (h % 20 + the rest of h scaled into [0, 1)) / 20 is uniform in [0, 1), and below 0.05 exactly when
    # h % 20 == 0: the one-in-twenty rule from before data.held_out_fraction, so older runs keep their split.
    # A larger fraction holds out a superset of a smaller one's samples.
    return (h % 20 + (h // 20) / _HASH_QUOTIENTS) / 20 < fraction


@dataclass
class SourceReader:
    """How a run reads a source: where rejects go, the reject limit, the decoding and validation."""

    run_dir: Path
    max_reject_fraction: float
    task: IngestTask
    caption_policy: str = "error"
    num_workers: int = 0
    allow_outside_paths: bool = False
    stop: Callable[[], None] | None = None

    def read(self, spec: str, kept: _Kept, limit: int | None = None, what: str = "data.source") -> _Kept:
        """Judge the samples of `spec` into `kept` (rejects quarantined) until `limit` training samples."""
        validator = Validator(self.task.validation)
        judged = ingest(open_source(spec, self.caption_policy, self.allow_outside_paths), validator, self.task,
                        self.num_workers)
        with Quarantine(self.run_dir) as quarantine, closing(judged):  # closing: a `limit` stops the workers
            for sample, verdict, prepared in judged:
                if self.stop is not None:
                    self.stop()
                if prepared is None:
                    quarantine.add(sample, verdict)
                elif kept.add(sample, verdict, prepared) and limit and len(kept.squares) >= limit:
                    break
        if validator.total == 0:
            raise DataError(f"{what} {spec!r} yielded no samples; check it (`stablediff data check SOURCE` "
                            "lists what it finds)")
        check_reject_fraction(dict(validator.rejects), validator.total, self.max_reject_fraction, quarantine.path)
        return kept


@dataclass
class _Kept:
    """The accepted samples so far: `held_out_fraction` of them (by content hash) held out, the rest for training."""

    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION
    squares: list = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    crops: list = field(default_factory=list)
    held: list = field(default_factory=list)
    held_captions: list[str] = field(default_factory=list)

    def add(self, sample, verdict, prepared) -> bool:
        """Keep one accepted sample; True when it went to the training set."""
        if is_held_out(verdict.content_hash, self.held_out_fraction):
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
        prepared = _bucketed_crops(images, crop_policy, resolution, self.keys, self.buckets, self.crops)
        if not self.held:
            return _without_held_out(images, self.captions, prepared)
        return CaptionedImages(images, self.captions, pixels_to_tensor(np.stack(self.held)), prepared,
                               self.held_captions)


def _without_held_out(images: torch.Tensor, captions: list[list[str]], prepared: BucketedCrops) -> CaptionedImages:
    # Nothing held out (held_out_fraction 0, a validation_source still to come, or too few samples for the
    # hash to pick one): the autoencoder stage still reports its reconstruction error on held-out images, so
    # it gets one training image. A validation loss on it would mean nothing: RunConfig refuses
    # train.validate_every when nothing can be held out, and the data log says when none was.
    return CaptionedImages(images, captions, images[:1], prepared, captions[0][:1], held_out_is_training=True)


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
    """The digits' fixed split (or a selection of it), or any source through validation; its held-out images
    `data.validation_source`'s when that is given; captions tag-shuffled if asked. `stop`: see
    `load_captioned_images`."""
    crop_policy = crop_policy_for(cfg, seed, bucket_step)
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    reader = SourceReader(run_dir, cfg.max_reject_fraction,
                          IngestTask(ValidationConfig(max_aspect=cfg.max_aspect), crop_policy, cfg.resolution),
                          cfg.caption_policy, workers, cfg.allow_outside_paths, stop)
    builtin = parse_builtin(cfg.source) if cfg.source.startswith(BUILTIN_PREFIX) else None
    if builtin is not None and builtin.split == "train":
        data = _digits(cfg, crop_policy, builtin.selection)
    else:
        fraction = 0.0 if cfg.validation_source else cfg.held_out_fraction  # 20 images must not lose one
        data = _training_set(reader.read(cfg.source, _Kept(fraction), cfg.limit), cfg.source, crop_policy,
                             cfg.resolution)
        if cfg.caption_shuffle_variants > 1:
            data.captions = [shuffled_variants(c[0], cfg.caption_shuffle_variants, seed, i, cfg.keep_tokens)
                             for i, c in enumerate(data.captions)]
    if cfg.validation_source:
        data.held_out, data.held_out_captions = load_held_out_images(reader, cfg.validation_source)
        data.held_out_is_training = False
    log(_summary(cfg, data))
    return data


def _summary(cfg: DataConfig, data: CaptionedImages) -> str:
    held = 0 if data.held_out_is_training else len(data.held_out)
    buckets = f" in {len(set(data.prepared.bucket_ids))} buckets" if cfg.buckets else ""
    note = (f" (the held-out ones from {cfg.validation_source})" if cfg.validation_source else
            " (for a validation loss, raise data.held_out_fraction or give data.validation_source)" if not held
            else "")
    return f"data: {len(data.captions)} training and {held} held-out samples from {cfg.source}{buckets}{note}"


def _digits(cfg: DataConfig, crop_policy: CropPolicy, selection: DigitSelection) -> CaptionedImages:
    """The selected digits of the fixed train split (the first `count`, then `data.limit`), and every held-out
    image of those digits: the same images whatever the run's seed."""
    train, held = load_digits(cfg.resolution)
    selection.check_available(train.labels, cfg.source)
    chosen = selection.train_indices(train.labels)[: cfg.limit]
    pixels = train.images[chosen]  # (n, R, R, 3) uint8
    images = pixels_to_tensor(pixels)
    keys = [content_hash(image.tobytes()) for image in pixels]
    captions = [train.captions_for(int(i)) for i in chosen]
    if crop_policy.is_square_center(cfg.resolution):
        prepared = BucketedCrops.square(images, keys)
    else:
        from PIL import Image

        buckets, crops = zip(*(crop_policy.frame(Image.fromarray(image), key) for image, key in zip(pixels, keys)))
        prepared = _bucketed_crops(images, crop_policy, cfg.resolution, keys, list(buckets), list(crops))
    held_indices = selection.held_out_indices(held.labels)
    held_captions = [held.captions_for(int(i))[0] for i in held_indices]
    return CaptionedImages(images, captions, pixels_to_tensor(held.images[held_indices]), prepared, held_captions)
