"""draw_batch: one bucket per batch, latents of that bucket's shape, crop variants chosen reproducibly."""

from __future__ import annotations

import pytest
import torch

from stablediff.training.batches import caption_rows, draw_batch
from stablediff.training.encoded_dataset import EncodedDataset, LatentBucket
from stablediff.training.seeding import step_generator

EMBEDDINGS = torch.randn(3, 2, 4)  # row 0 is ""


def two_buckets(variants: int = 1) -> EncodedDataset:
    """Samples 0-3 in a 4x2 latent bucket, 4-5 in a 2x4 one; each variant's mean is its number."""
    def group(size, n, h, w):
        mean = torch.arange(variants, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(variants, n, 1, h, w)
        return LatentBucket(size, mean.clone(), torch.zeros(variants, n, 1, h, w))

    buckets = [group((32, 16), 4, 2, 4), group((16, 32), 2, 4, 2)]
    return EncodedDataset(buckets, torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1]),
                          EMBEDDINGS, [[1], [2], [1], [2], [1], [2]], bucketed=True)


def test_latents_take_the_shape_of_their_bucket():
    data = two_buckets()
    wide, _ = draw_batch(data, torch.tensor([0, 2, 3]), 1.0, 0.0, 0, 0, 0)
    tall, _ = draw_batch(data, torch.tensor([5, 4]), 1.0, 0.0, 0, 0, 0)
    assert wide.shape == (3, 1, 2, 4) and tall.shape == (2, 1, 4, 2)


def test_a_batch_mixing_buckets_is_refused():
    with pytest.raises(ValueError, match="one bucket"):
        draw_batch(two_buckets(), torch.tensor([0, 4]), 1.0, 0.0, 0, 0, 0)


def test_crop_variants_are_chosen_per_step_reproducibly():
    data = two_buckets(variants=3)
    indices = torch.tensor([0, 1, 2, 3])
    chosen = [draw_batch(data, indices, 1.0, 0.0, 0, step, 0)[0][:, 0, 0, 0] for step in range(8)]
    assert torch.equal(chosen[5], draw_batch(data, indices, 1.0, 0.0, 0, 5, 0)[0][:, 0, 0, 0])
    assert {int(v) for c in chosen for v in c} == {0, 1, 2}  # every variant gets its turn


def test_one_variant_draws_the_posterior_exactly_as_before_bucketing():
    mean, std = torch.randn(6, 1, 2, 4), torch.rand(6, 1, 2, 4)
    data = EncodedDataset.single(mean, std, EMBEDDINGS, [[1]] * 6)
    indices = torch.tensor([4, 1, 3])
    latents, _ = draw_batch(data, indices, 0.5, 0.0, 7, 2, 0)
    eps = torch.randn((3, 1, 2, 4), generator=step_generator(7, 2, 0, "posterior"))
    assert torch.equal(latents, (mean[indices] + std[indices] * eps) * 0.5)


def test_caption_dropout_rate_matches_probability():
    # The one caption-dropout implementation: row 0 of the embeddings is "" (classifier-free guidance).
    indices = torch.arange(5000)
    rows = caption_rows([[1]] * 5000, indices, 0.1, seed=0, step=0, rank=0)
    assert 400 < int((rows == 0).sum()) < 600


def test_caption_dropout_zero_and_one_are_exact():
    indices = torch.arange(100)
    assert caption_rows([[1]] * 100, indices, 0.0, 0, 0, 0).tolist() == [1] * 100
    assert caption_rows([[1]] * 100, indices, 1.0, 0, 0, 0).tolist() == [0] * 100
