"""Training throughput: stablediff's loop vs a loop written like diffusers' train_text_to_image.py.

    .venv/bin/python bench/train_throughput.py [--blocks 4] [--block-steps 5] [--threads N]

Same model (the `digits` recipe: VAE [16, 32, 64], UNet [64, 128, 128], MiniLM max_length
16), same data (the built-in digits, 32x32), same batch (64), same machine, one process.

- stablediff: the real `train_unet` loop on features cached once at start (VAE posteriors and
  caption embeddings; each step draws a fresh posterior sample), as `stablediff train` runs it.
- diffusers-style: what examples/text_to_image/train_text_to_image.py does every step: PIL
  images through the transforms (resize, center crop, random flip, to tensor, normalize),
  tokenize the captions, run the text encoder, `vae.encode(...).latent_dist.sample() *
  scaling_factor`, noise, uniform timesteps, UNet, MSE, backward, clip, AdamW, EMA.

The two are timed in interleaved blocks (drift in machine load hits both), after one
warm-up block each; the VAE is untrained (encode cost does not depend on its weights).
Prints images/s per mode and the ratio; writes bench/results/train_throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from _common import machine, write_result  # bench/ is on sys.path when a script runs
from stablediff.config import load_config
from stablediff.data.digits import load_digits
from stablediff.training.context import RunContext
from stablediff.training.ema import EMA
from stablediff.training.metrics import MetricsLog
from stablediff.training.run import build_stage2
from stablediff.training.unet_stage import train_unet


class DiffusersStyleLoop:
    """The per-step work of diffusers' text-to-image example, on our components."""

    def __init__(self, stage, config, pil_images: list[Image.Image], captions: list[list[str]]) -> None:
        self.vae, self.text_encoder = stage.vae, stage.text_encoder
        self.scheduler, self.config = stage.noise_scheduler, config
        self.pil_images, self.captions = pil_images, captions
        self.unet = type(stage.state.unet).from_config(stage.state.unet.config)
        self.unet.load_state_dict(stage.state.unet.state_dict())
        self.unet.train()
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.train.learning_rate,
                                           weight_decay=config.train.weight_decay)
        self.ema = EMA(self.unet, config.train.ema_decay)
        self.step_count = 0

    def transform(self, image: Image.Image) -> torch.Tensor:
        size = self.config.data.resolution
        image = image.convert("RGB").resize((size, size), Image.BILINEAR)  # Resize + CenterCrop at 1:1
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - 0.5) / 0.5

    def step(self, batch_size: int) -> None:
        picks = random.sample(range(len(self.pil_images)), batch_size)
        pixels = torch.stack([self.transform(self.pil_images[i]) for i in picks])
        prompts = [random.choice(self.captions[i]) for i in picks]
        tokens = self.text_encoder.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                                             max_length=self.text_encoder.tokenizer.model_max_length)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            text_embeddings = self.text_encoder.model(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,))
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, text_embeddings).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update(self.unet, self.step_count)
        self.step_count += 1


def time_block(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config overrides for stablediff's side (e.g. train.channels_last=true)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config("digits", ["vae.train_steps=0", "train.tensorboard=false", "train.log_every=1000",
                                    *args.overrides])
    batch = config.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        stage = build_stage2(RunContext(config, Path(tmp), MetricsLog(Path(tmp) / "metrics.jsonl")), None, False)
        train, _ = load_digits(config.data.resolution)
        baseline = DiffusersStyleLoop(stage, config, [Image.fromarray(a) for a in train.images], [train.captions_for(i)
                                                                          for i in range(len(train))])

        def ours(steps: int) -> None:
            config.train.max_steps = stage.state.step + steps
            train_unet(stage.state, stage.data, stage.noise_scheduler, stage.scaling_factor, RunContext(config))

        def theirs(steps: int) -> None:
            for _ in range(steps):
                baseline.step(batch)

        time_block(ours, 1), time_block(theirs, 1)  # warm-up: allocator, first-call overheads
        rates: dict[str, list[float]] = {"stablediff": [], "diffusers_style": []}
        for _ in range(args.blocks):
            rates["stablediff"].append(args.block_steps * batch / time_block(ours, args.block_steps))
            rates["diffusers_style"].append(args.block_steps * batch / time_block(theirs, args.block_steps))
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["stablediff"] / median["diffusers_style"]
    print(f"{'mode':<18}{'images/s (median)':>20}   blocks")
    for name, values in rates.items():
        print(f"{name:<18}{median[name]:>20.1f}   {', '.join(f'{v:.1f}' for v in values)}")
    print(f"speed-up: {ratio:.2f}x (goal >= 1.5x)   [{machine()}, {torch.get_num_threads()} threads]")
    write_result("train_throughput", {"images_per_second": median, "blocks": rates, "ratio": ratio,
                                      "batch_size": batch, "block_steps": args.block_steps,
                                      "threads": torch.get_num_threads(), "overrides": args.overrides})


if __name__ == "__main__":
    main()
