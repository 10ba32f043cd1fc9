"""One step's inputs from the encoded dataset: latents drawn from cached posteriors, and captions.

A pure function of (data, indices, seed, step, rank): the posterior sample (then
the crop variant), the flip and the caption dropout come from step generators,
so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stablediff.training.encoded_dataset import EncodedDataset
from stablediff.training.seeding import step_generator


def draw_batch(data: EncodedDataset, indices: torch.Tensor, scaling_factor: float, caption_dropout: float,
               seed: int, step: int, rank: int, flip_probability: float = 0.0,
               embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, h, w), scaled, and text embeddings (B, L, D) for one step.

    `embed(rows)` encodes the chosen caption rows now (textual inversion: with gradients to the new
    token) instead of reading the cached embeddings.

    All `indices` must share a bucket (`BucketBatchOrder` guarantees it): a batch is one tensor.
    """
    buckets = data.bucket_of[indices].unique()
    if len(buckets) != 1:
        raise ValueError(f"a batch must hold samples of one bucket, got buckets {buckets.tolist()}; "
                         "draw bucketed data with BucketBatchOrder")
    group, rows = data.buckets[int(buckets[0])], data.row_of[indices]
    g_post = step_generator(seed, step, rank, "posterior")
    eps = torch.randn((len(indices), *group.mean.shape[2:]), generator=g_post)
    variant = torch.zeros(len(indices), dtype=torch.long)
    if group.mean.shape[0] > 1:  # random-crop variants were cached: pick one per sample (after eps, so
        variant = torch.randint(0, group.mean.shape[0], (len(indices),), generator=g_post)  # V=1 is unchanged)
    mean, std = group.mean[variant, rows], group.std[variant, rows]
    if flip_probability > 0:  # mirrored images' posteriors were cached alongside
        flipped = (torch.rand(len(indices), generator=step_generator(seed, step, rank, "flip"))
                   < flip_probability).view(-1, 1, 1, 1)
        mean = torch.where(flipped, group.flip_mean[variant, rows], mean)
        std = torch.where(flipped, group.flip_std[variant, rows], std)
    latents = (mean + std * eps) * scaling_factor
    rows = caption_rows(data.caption_ids, indices, caption_dropout, seed, step, rank)
    return latents, data.embeddings[rows] if embed is None else embed(rows)


def caption_rows(caption_ids: list[list[int]], indices: torch.Tensor, caption_dropout: float, seed: int, step: int,
                 rank: int) -> torch.Tensor:
    """Per sample, one of its captions' embedding rows, or row 0 ("") with probability `caption_dropout`."""
    g_drop = step_generator(seed, step, rank, "dropout")
    choice = torch.rand(len(indices), generator=g_drop)
    dropped = torch.rand(len(indices), generator=g_drop) < caption_dropout
    rows = []
    for i, sample in enumerate(indices.tolist()):
        options = caption_ids[sample]
        rows.append(0 if dropped[i] else options[int(choice[i] * len(options))])
    return torch.tensor(rows)


def batch_weights(data: EncodedDataset, indices: torch.Tensor) -> torch.Tensor | None:
    """The batch's per-sample loss weights (B,), or None when the data carries none (every weight 1)."""
    return None if data.weights is None else data.weights[indices]
