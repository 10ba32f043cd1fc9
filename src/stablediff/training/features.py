"""Encode a captioned image set once: VAE posteriors and the embeddings of each distinct caption.

Captions repeat (templates, tags), so each distinct caption is encoded once and
samples point into that table. Latent posteriors keep mean and std so each
step can draw a fresh sample, as training on the fly would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from stablediff.data.features import EncodeCounts, FeatureCache, encode_all
from stablediff.models.text_encoder import TextEncoder


@dataclass
class EncodedDataset:
    latent_mean: torch.Tensor  # (N, C, h, w), unscaled
    latent_std: torch.Tensor  # (N, C, h, w)
    embeddings: torch.Tensor  # (U, L, D): row 0 is the empty caption (for CFG dropout)
    caption_ids: list[list[int]]  # per sample, rows of `embeddings` it may be captioned with
    flip_mean: torch.Tensor | None = None  # posteriors of the mirrored images, when flip is on
    flip_std: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.caption_ids)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor, captions: list[list[str]],
                   text_encoder: TextEncoder, batch_size: int = 256) -> EncodedDataset:
    """images (N, 3, H, W) in [-1, 1]; captions: for each sample, its caption variants."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    distinct, caption_ids = caption_table(captions)
    return EncodedDataset(torch.cat(means), torch.cat(stds), text_encoder.encode(distinct), caption_ids)


def caption_table(captions: list[list[str]]) -> tuple[list[str], list[list[int]]]:
    """Distinct captions (row 0 is "", the CFG-dropout caption) and each sample's rows."""
    table: dict[str, int] = {"": 0}
    caption_ids = [[table.setdefault(c, len(table)) for c in variants] for variants in captions]
    return list(table), caption_ids


def encode_dataset_cached(vae: AutoencoderKL, images: torch.Tensor, captions: list[list[str]],
                          text_encoder: TextEncoder, keys: list[str], cache: FeatureCache, transform_id: str,
                          flip: bool = False, batch_size: int = 256) -> tuple[EncodedDataset, EncodeCounts]:
    """Like `encode_dataset`, through the on-disk cache: only what is not cached is encoded."""
    vae.eval()
    counts = encode_all(cache, vae, text_encoder, list(zip(keys, images, captions)), transform_id,
                        flip=flip, batch_size=batch_size)
    latents = cache.latents(vae, transform_id)
    mean, std = latents.get(keys)
    flip_mean, flip_std = latents.get(keys, flipped=True) if flip else (None, None)
    distinct, caption_ids = caption_table(captions)
    with cache.text(text_encoder) as text:
        text.add(text.missing(distinct))  # "" is usually no sample's caption
        embeddings = text.get(distinct)
    return EncodedDataset(mean, std, embeddings, caption_ids, flip_mean, flip_std), counts
