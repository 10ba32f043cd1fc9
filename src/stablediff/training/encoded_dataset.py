"""Encode a captioned image set once: VAE posteriors per bucket and crop variant, caption embeddings.

Captions repeat (templates, tags), so each distinct caption is encoded once and
samples point into that table. Latent posteriors keep mean and std so each
step can draw a fresh sample, as training on the fly would. Latents of one
bucket share a shape, so they are held per bucket (`LatentBucket`); a sample is
found by (bucket, row).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from stablediff.data.cache_fill import EncodeCounts, encode_all
from stablediff.data.feature_cache import FeatureCache, vae_fingerprint
from stablediff.data.training_set import BucketedCrops
from stablediff.errors import ModelFileError
from stablediff.models.build import downscale_factor, vae_folder
from stablediff.models.text_encoder import TextEncoder

Posteriors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # mean, std, flip_*


@dataclass
class LatentBucket:
    """The posteriors of one bucket's samples, for each crop variant."""

    size: tuple[int, int]  # (width, height) of its images, in pixels
    mean: torch.Tensor  # (V, n, C, h, w): crop variants x samples, unscaled
    std: torch.Tensor  # (V, n, C, h, w)
    flip_mean: torch.Tensor | None = None  # posteriors of the mirrored crops, when flip is on
    flip_std: torch.Tensor | None = None


@dataclass
class EncodedDataset:
    buckets: list[LatentBucket]
    bucket_of: torch.Tensor  # (N,) long: each sample's bucket
    row_of: torch.Tensor  # (N,) long: each sample's row within its bucket
    embeddings: torch.Tensor  # (U, L, D): row 0 is the empty caption (for CFG dropout)
    caption_ids: list[list[int]]  # per sample, rows of `embeddings` it may be captioned with
    bucketed: bool = False  # batches must be drawn one bucket at a time (`BucketBatchOrder`)
    weights: torch.Tensor | None = None  # (N,) per-sample loss weights (DreamBooth's prior); None: all 1

    @classmethod
    def single(cls, latent_mean: torch.Tensor, latent_std: torch.Tensor, embeddings: torch.Tensor,
               caption_ids: list[list[int]], flip_mean: torch.Tensor | None = None,
               flip_std: torch.Tensor | None = None) -> EncodedDataset:
        """One bucket, one crop variant, from (N, C, h, w) tensors (e.g. pixels for a pixel-space model)."""
        size = (latent_mean.shape[-1], latent_mean.shape[-2])
        group = LatentBucket(size, latent_mean[None], latent_std[None],
                             None if flip_mean is None else flip_mean[None], None if flip_std is None else flip_std[None])
        n = len(latent_mean)
        return cls([group], torch.zeros(n, dtype=torch.long), torch.arange(n), embeddings, caption_ids)

    def __len__(self) -> int:
        return len(self.caption_ids)

    @property
    def order_bucket_ids(self) -> list[int] | None:
        """Each sample's bucket, for `make_batch_order`; None when batches may mix samples freely."""
        return self.bucket_of.tolist() if self.bucketed else None

    @property
    def num_variants(self) -> int:
        return self.buckets[0].mean.shape[0]

    def _single(self, name: str) -> torch.Tensor | None:
        if len(self.buckets) != 1 or self.num_variants != 1:
            raise AttributeError(f"{name} is (N, C, h, w) only for one bucket and one crop variant; "
                                 f"this set has {len(self.buckets)} buckets: read .buckets instead")
        tensor = getattr(self.buckets[0], name)
        return None if tensor is None else tensor[0]

    # The whole set as (N, C, h, w), when it has one shape (bucketing and random crop off).
    latent_mean = property(lambda self: self._single("mean"))
    latent_std = property(lambda self: self._single("std"))
    flip_mean = property(lambda self: self._single("flip_mean"))
    flip_std = property(lambda self: self._single("flip_std"))


def bucket_step(vae_cfg) -> int:
    """Bucket sides are multiples of 8 x the VAE's downscale (64 for SD), so every latent side is a
    multiple of 8, as the UNet's downsamplings need. Read from the config: buckets are chosen
    while loading the data, before the VAE is built."""
    if not getattr(vae_cfg, "enabled", True):  # pixel space
        return 8
    channels = vae_cfg.block_out_channels
    if vae_cfg.pretrained:
        config_file = vae_folder(vae_cfg.pretrained) / "config.json"
        try:
            channels = json.loads(config_file.read_text())["block_out_channels"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"vae.pretrained: cannot read block_out_channels from {config_file} ({exc}); "
                                 "point it at a diffusers AutoencoderKL folder") from exc
    return 8 * downscale_factor(channels)


def caption_table(captions: list[list[str]]) -> tuple[list[str], list[list[int]]]:
    """Distinct captions (row 0 is "", the CFG-dropout caption) and each sample's rows."""
    table: dict[str, int] = {"": 0}
    caption_ids = [[table.setdefault(c, len(table)) for c in variants] for variants in captions]
    return list(table), caption_ids


def assemble(prepared: BucketedCrops, embeddings: torch.Tensor, caption_ids: list[list[int]], bucketed: bool,
             encode: Callable[[int, int, list[int], torch.Tensor], Posteriors]) -> EncodedDataset:
    """Per bucket, stack `encode(bucket, variant, members, crops)` over the crop variants."""
    bucket_of = torch.tensor(prepared.bucket_ids, dtype=torch.long)
    row_of = torch.zeros(len(prepared), dtype=torch.long)
    groups = []
    for bucket in sorted(set(prepared.bucket_ids)):
        per_variant = []
        for variant in range(prepared.crop_policy.variants):
            members, crops = prepared.stack(bucket, variant)
            per_variant.append(encode(bucket, variant, members, crops))
        row_of[members] = torch.arange(len(members))
        bucket_of[members] = len(groups)  # buckets no sample fell in are left out
        stacked = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_variant)]
        groups.append(LatentBucket(prepared.crop_policy.sizes[bucket], *stacked))
    return EncodedDataset(groups, bucket_of, row_of, embeddings, caption_ids, bucketed)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, prepared: BucketedCrops, captions: list[list[str]], text_encoder: TextEncoder,
                   flip: bool = False, bucketed: bool = False, batch_size: int = 256) -> EncodedDataset:
    """Encode in memory, no cache: the reference the cached path must equal."""
    vae.eval()

    def encode(bucket: int, variant: int, members: list[int], crops: torch.Tensor) -> Posteriors:
        mean, std = _encode(vae, crops, batch_size)
        return (mean, std, *_encode(vae, crops.flip(-1), batch_size)) if flip else (mean, std, None, None)

    distinct, caption_ids = caption_table(captions)
    return assemble(prepared, text_encoder.encode(distinct), caption_ids, bucketed, encode)


def _encode(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def encode_dataset_cached(vae: AutoencoderKL, prepared: BucketedCrops, captions: list[list[str]],
                          text_encoder: TextEncoder, cache: FeatureCache, flip: bool = False, bucketed: bool = False,
                          batch_size: int = 256,
                          on_batch: Callable[[], None] | None = None) -> tuple[EncodedDataset, EncodeCounts]:
    """Like `encode_dataset`, through the on-disk cache: only what is not cached is encoded.

    Each (bucket, crop variant) is its own latents namespace (`CropPolicy.transform_id`).
    `on_batch` is called after each encoded batch and may raise to stop (SIGTERM): the rows
    encoded so far are flushed into the cache on the way out.
    """
    progress = (lambda done, total: on_batch()) if on_batch is not None else None
    vae.eval()
    fingerprint = vae_fingerprint(vae)  # once: hashing a large VAE takes a while
    counts = EncodeCounts()

    def encode(bucket: int, variant: int, members: list[int], crops: torch.Tensor) -> Posteriors:
        transform_id = prepared.crop_policy.transform_id(bucket, variant)
        keys = [prepared.keys[i] for i in members]
        with cache.latents(vae, transform_id, fingerprint) as latents:  # one store: shards verified once
            done = encode_all(cache, vae, None, [(k, image, ()) for k, image in zip(keys, crops)], transform_id,
                              flip=flip, batch_size=batch_size, fingerprint=fingerprint, latents=latents,
                              progress=progress)
            flipped = latents.get(keys, flipped=True) if flip else (None, None)
            mean_std = latents.get(keys)
        counts.latents_encoded += done.latents_encoded
        counts.latents_reused += done.latents_reused
        return (*mean_std, *flipped)

    distinct, caption_ids = caption_table(captions)
    if on_batch is not None:
        on_batch()
    with cache.text(text_encoder) as text:
        missing = text.missing(distinct)
        text.add(missing)
        embeddings = text.get(distinct)
    used = {c for variants in captions for c in variants}  # "" counts only when a sample uses it
    counts.text_encoded = sum(c in used for c in missing)
    counts.text_reused = len(used) - counts.text_encoded
    return assemble(prepared, embeddings, caption_ids, bucketed, encode), counts
