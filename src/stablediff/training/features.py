"""Encode a captioned image set once: VAE posteriors and the embeddings of each distinct caption.

Captions repeat (templates, tags), so each distinct caption is encoded once and
samples point into that table. Latent posteriors keep mean and std so each
step can draw a fresh sample, as training on the fly would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from stablediff.models.text_encoder import TextEncoder


@dataclass
class EncodedDataset:
    latent_mean: torch.Tensor  # (N, C, h, w), unscaled
    latent_std: torch.Tensor  # (N, C, h, w)
    embeddings: torch.Tensor  # (U, L, D): row 0 is the empty caption (for CFG dropout)
    caption_ids: list[list[int]]  # per sample, rows of `embeddings` it may be captioned with

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
    table: dict[str, int] = {"": 0}
    caption_ids = [[table.setdefault(c, len(table)) for c in variants] for variants in captions]
    embeddings = text_encoder.encode(list(table))
    return EncodedDataset(torch.cat(means), torch.cat(stds), embeddings, caption_ids)
