"""Training step time with cached features vs encoding every step; ingestion throughput.

    .venv/bin/python bench/data_cache.py [--steps 20] [--warmup 3] [--images 500]

Step time (and, apart, the time to produce its inputs) at the demo size (the `digits` recipe: 32x32 RGB digits, VAE [16, 32, 64],
the demo UNet, batch 64, MiniLM max_length 16), all modes in one process on the same
batches, timed in interleaved blocks so that machine-load drift hits every mode alike:
- cached: each step reads its batch's posteriors and caption embeddings through
  `FeatureCache` (filled once, in a temporary directory) and draws latents from them;
- in memory: the same features held as whole tensors (today's `EncodedDataset`), for reference;
- encode every step: VAE encode + text encoder forward on the batch at every step, as
  diffusers' examples/text_to_image/train_text_to_image.py does.
The VAE is untrained (random weights): encode cost does not depend on the weights.

Ingestion: `--images` generated 256x256 JPEGs with captions, read through the data
pipeline (FolderSource -> Validator.judge -> upright_rgb of the decoded image, as data/training_set.py does) and
through Validator.judge alone, vs a plain `Image.open(p).convert("RGB")` loop.

Prints tables; writes bench/results/data_cache-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import REPO, write_result  # bench/ is on sys.path when a script runs
from stablediff.config import load_config
from stablediff.data.digits import load_digits
from stablediff.data.cache_fill import encode_all
from stablediff.data.feature_cache import FeatureCache
from stablediff.data.sources import open_source
from stablediff.data.transforms import upright_rgb
from stablediff.data.validate import Validator, content_hash
from stablediff.models.build import build_noise_scheduler, build_unet, build_vae, vae_downscale
from stablediff.models.text_encoder import load_text_encoder
from stablediff.training.objectives import diffusion_loss
from stablediff.data.transforms import pixels_to_tensor

BLOCK = 5  # timed steps per mode before switching to the next


class Demo:
    """The digits demo's components and training data, as `stablediff demo` builds them."""

    def __init__(self) -> None:
        config = load_config("digits")
        self.config = config
        train, _ = load_digits(config.data.resolution)
        self.images = pixels_to_tensor(train.images)  # (N, 3, 32, 32) in [-1, 1]
        self.keys = [content_hash(image.tobytes()) for image in train.images]
        self.captions = [train.captions_for(i) for i in range(len(train))]
        self.text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length)
        torch.manual_seed(config.seed)
        self.vae = build_vae(config.vae, config.data.resolution).requires_grad_(False).eval()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        latent_size = config.data.resolution // vae_downscale(self.vae)
        self.unet = build_unet(config.unet, self.vae.config.latent_channels, latent_size,
                               self.text_encoder.hidden_size).train()
        self.scheduler = build_noise_scheduler(config.noise, config.train.prediction_type)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.train.learning_rate)
        self.batch_size = config.train.batch_size

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """The sample indices and one caption per sample for a step: the same in every mode."""
        g = torch.Generator().manual_seed(step)
        indices = torch.randint(0, len(self.keys), (self.batch_size,), generator=g)
        choice = torch.randint(0, 6, (self.batch_size,), generator=g).tolist()
        captions = [self.captions[i][c % len(self.captions[i])] for i, c in zip(indices.tolist(), choice)]
        return indices, captions

    def train_step(self, latents: torch.Tensor, text_embeddings: torch.Tensor, step: int) -> None:
        g = torch.Generator().manual_seed(10_000 + step)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        loss = diffusion_loss(self.unet, self.scheduler, latents, text_embeddings, noise, timesteps,
                              self.config.train.prediction_type)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def input_modes(demo: Demo, cache: FeatureCache) -> dict:
    """mode name -> function(step) returning that step's (latents (B, C, h, w), text embeddings (B, L, D))."""
    transform_id = f"digits-{demo.config.data.resolution}"
    latent_store, text_store = cache.latents(demo.vae, transform_id), cache.text(demo.text_encoder)
    mean_all, std_all = latent_store.get(demo.keys)
    table = sorted({c for captions in demo.captions for c in captions})
    row = {caption: i for i, caption in enumerate(table)}
    embeddings_all = text_store.get(table)

    def posterior_sample(mean, std, step):
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(20_000 + step))
        return (mean + std * eps) * demo.scaling_factor

    def cached(step):
        indices, captions = demo.batch(step)
        mean, std = latent_store.get([demo.keys[i] for i in indices.tolist()])
        return posterior_sample(mean, std, step), text_store.get(captions)

    def in_memory(step):
        indices, captions = demo.batch(step)
        latents = posterior_sample(mean_all[indices], std_all[indices], step)
        return latents, embeddings_all[torch.tensor([row[c] for c in captions])]

    @torch.no_grad()
    def encode_every_step(step):
        indices, captions = demo.batch(step)
        posterior = demo.vae.encode(demo.images[indices]).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(20_000 + step)) * demo.scaling_factor
        return latents, demo.text_encoder.encode(captions)

    return {"cached": cached, "in_memory": in_memory, "encode_every_step": encode_every_step}


def time_steps(demo: Demo, modes: dict, steps: int, warmup: int) -> tuple[dict, dict]:
    """(seconds per training step, seconds for its inputs alone) per mode, in interleaved blocks."""
    for name, inputs in modes.items():
        for step in range(warmup):
            demo.train_step(*inputs(step), step)
    whole: dict[str, list[float]] = {name: [] for name in modes}
    prepare: dict[str, list[float]] = {name: [] for name in modes}
    for start in range(0, steps, BLOCK):
        for name, inputs in modes.items():
            for step in range(warmup + start, warmup + min(steps, start + BLOCK)):
                t0 = time.perf_counter()
                latents, text_embeddings = inputs(step)
                t1 = time.perf_counter()
                demo.train_step(latents, text_embeddings, step)
                whole[name].append(time.perf_counter() - t0)
                prepare[name].append(t1 - t0)
    return whole, prepare


def fill_cache(demo: Demo, cache: FeatureCache) -> dict:
    samples = [(key, image, captions) for key, image, captions in zip(demo.keys, demo.images, demo.captions)]
    transform_id = f"digits-{demo.config.data.resolution}"
    t0 = time.perf_counter()
    first = encode_all(cache, demo.vae, demo.text_encoder, samples, transform_id, batch_size=256)
    fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = encode_all(FeatureCache(cache.root), demo.vae, demo.text_encoder, samples, transform_id, batch_size=256)
    reuse_s = time.perf_counter() - t0  # a later run's start: fingerprint, index, verify every shard
    assert again.latents_encoded == 0 and again.text_encoded == 0, again
    return {"samples": len(samples), "distinct_captions": first.text_encoded,
            "fill_s": round(fill_s, 3), "warm_start_s": round(reuse_s, 3)}


def write_jpegs(folder: Path, count: int) -> None:
    """Smooth colour gradients with noise: real-photo-like JPEG sizes (~10-20 KB at 256x256)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    for i in range(count):
        base = rng.uniform(0, 255, 3) * ramp[:, None, None] + rng.uniform(0, 255, 3) * ramp[None, :, None]
        pixels = np.clip(base / 2 + rng.normal(0, 12, (256, 256, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a generated picture number {i}")


def ingestion(count: int, repeats: int = 2) -> dict:
    """Images per second, best of `repeats`, with the files already in the page cache."""
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        folder = Path(tmp)
        write_jpegs(folder, count)
        paths = sorted(folder.glob("*.jpg"))

        def plain():
            for path in paths:
                Image.open(path).convert("RGB")

        def judge_only():
            validator = Validator()
            assert all(validator.judge(sample).ok for sample in open_source(str(folder)))

        def pipeline():  # what data/training_set.py does per sample before the resize/crop
            validator = Validator()
            for sample in open_source(str(folder)):
                if validator.judge(sample).ok:
                    upright_rgb(validator.last_image)  # the validator's decode is reused

        best = {}
        for name, run in (("plain_pil", plain), ("validate", judge_only), ("validate_and_decode", pipeline)):
            run()  # warm the page cache and imports
            best[name] = min(_seconds(run) for _ in range(repeats))
    return {name: round(count / seconds, 1) for name, seconds in best.items()}


def _seconds(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    demo = Demo()
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        cache = FeatureCache(tmp)
        cache_result = fill_cache(demo, cache)
        times, input_times = time_steps(demo, input_modes(demo, cache), args.steps, args.warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    input_median = {name: statistics.median(values) for name, values in input_times.items()}
    ratio = median["encode_every_step"] / median["cached"]
    print(f"training step, digits demo size (batch {demo.batch_size}), median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'mode':24}{'ms/step':>10}{'vs cached':>11}{'inputs ms':>11}")
    for name, seconds in median.items():
        print(f"{name:24}{seconds * 1e3:>10.1f}{seconds / median['cached']:>11.2f}{input_median[name] * 1e3:>11.1f}")
    print(f"cache fill {cache_result['fill_s']:.1f} s for {cache_result['samples']} samples; "
          f"warm start {cache_result['warm_start_s']:.2f} s")
    rates = ingestion(args.images)
    print(f"\ningestion, {args.images} JPEGs 256x256")
    print(f"{'reader':24}{'images/s':>10}{'vs PIL':>11}")
    for name, rate in rates.items():
        print(f"{name:24}{rate:>10.1f}{rate / rates['plain_pil']:>11.2f}")
    write_result("data_cache", {
        "batch_size": demo.batch_size, "steps": args.steps, "warmup": args.warmup,
        "step_ms_median": {k: round(v * 1e3, 2) for k, v in median.items()},
        "step_ms_mean": {k: round(statistics.mean(v) * 1e3, 2) for k, v in times.items()},
        "inputs_ms_median": {k: round(v * 1e3, 2) for k, v in input_median.items()},
        "encode_every_step_over_cached": round(ratio, 3),
        "cache": cache_result,
        "ingestion_images_per_s": rates,
        "ingestion_ratio_vs_pil": {k: round(v / rates["plain_pil"], 3) for k, v in rates.items()},
    })


if __name__ == "__main__":
    main()
