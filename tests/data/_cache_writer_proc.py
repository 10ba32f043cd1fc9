"""Fill a latents cache with `encode_all` in small batches and shards, printing progress, until done or killed.

    python tests/data/_cache_writer_proc.py CACHE_ROOT NUM_SAMPLES

tests/data/test_feature_cache.py SIGKILLs this process part-way and checks that the
cache it leaves behind verifies and resumes. The tiny VAE and the images are
built from fixed seeds here and in the test, so both sides agree on them.
"""

from __future__ import annotations

import sys

import blake3
import torch
from diffusers import AutoencoderKL

from stablediff.data.cache_fill import encode_all
from stablediff.data.feature_cache import FeatureCache

TRANSFORM_ID = "test-16x16"
SHARD_SIZE = 8
BATCH_SIZE = 4


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                         sample_size=16).eval()


def sample_images(num: int, seed: int = 1) -> tuple[list[str], torch.Tensor]:
    """(content-hash keys, images (num, 3, 16, 16) in [-1, 1])."""
    images = torch.rand(num, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    keys = [blake3.blake3(image.numpy().tobytes()).hexdigest() for image in images]
    return keys, images


def fill(root: str, num: int, progress=None):
    """The fill both the killed writer and the test's uninterrupted reference run."""
    keys, images = sample_images(num)
    samples = [(key, image, []) for key, image in zip(keys, images)]
    return encode_all(FeatureCache(root, shard_size=SHARD_SIZE), tiny_vae(), None, samples, TRANSFORM_ID,
                      flip=True, batch_size=BATCH_SIZE, progress=progress)


def main(root: str, num: int) -> None:
    torch.set_num_threads(1)  # as the test does: the same kernels on both sides, and no thread contention
    fill(root, num, progress=lambda done, total: print(f"encoded {done}", flush=True))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
