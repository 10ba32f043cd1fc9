"""Generation latency: stablediff's API vs a plain diffusers StableDiffusionPipeline.

    .venv/bin/python bench/generate_latency.py [--steps 20] [--num 4] [--reps 7] [--sampler dpmpp_2m]

The digits-demo model shape (the `digits` recipe: 32x32 images, ~7M-parameter UNet,
MiniLM text encoder) with random weights, saved as a diffusers folder. Ours is
`stablediff.load_pipeline(folder).txt2img(...)` — sampler set per call, LoRA
bookkeeping, A1111 metadata on every image; the baseline is diffusers'
StableDiffusionPipeline built from the *same* modules with the same scheduler class,
steps, guidance and CPU generators. Calls alternate (ours, theirs, ours, ...) so
machine load hits both alike; the medians are compared. Goal: ratio <= 1.05.
Prints a table; writes bench/results/generate_latency-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import write_result  # bench/ is on sys.path when a script runs

PROMPT = "a handwritten digit seven"


def build_digits_folder(folder: Path) -> Path:
    from stablediff.config import load_config
    from stablediff.models.pipeline_assembly import assemble_pipeline
    from stablediff.models.build import build_noise_scheduler, build_unet, build_vae, vae_downscale
    from stablediff.models.text_encoder import load_text_encoder

    config = load_config("digits")
    torch.manual_seed(0)
    text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length)
    vae = build_vae(config.vae, config.data.resolution)
    unet = build_unet(config.unet, config.vae.latent_channels, config.data.resolution // vae_downscale(vae),
                      text_encoder.hidden_size)
    noise = build_noise_scheduler(config.noise, config.train.prediction_type)
    pipe = assemble_pipeline(vae, text_encoder.model, text_encoder.tokenizer, unet, dict(noise.config))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sampler", default="dpmpp_2m")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    import stablediff
    from stablediff.inference.pipeline import generators_for
    from stablediff.inference.schedulers import make_scheduler

    with tempfile.TemporaryDirectory() as tmp:
        ours = stablediff.load_pipeline(build_digits_folder(Path(tmp) / "digits"))
        theirs = StableDiffusionPipeline(**ours.pipe.components, requires_safety_checker=False)
        theirs.scheduler = make_scheduler(args.sampler, ours.pipe.scheduler.config)
        theirs.set_progress_bar_config(disable=True)

        def run_ours(seed: int):
            ours.txt2img(PROMPT, steps=args.steps, sampler=args.sampler, seed=seed, num=args.num)

        def run_theirs(seed: int):
            with torch.no_grad():
                theirs(PROMPT, num_inference_steps=args.steps, guidance_scale=3.0, num_images_per_prompt=args.num,
                       generator=generators_for(seed, args.num), output_type="pil")

        times = {"stablediff": [], "diffusers": []}
        run_ours(0), run_theirs(0)  # warm-up: first-call allocations and lazy imports
        for rep in range(args.reps):
            for name, run in (("stablediff", run_ours), ("diffusers", run_theirs)):
                start = time.perf_counter()
                run(rep)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["stablediff"] / medians["diffusers"]
    print(f"txt2img, digits-shaped model, {args.num} images x {args.steps} steps ({args.sampler}), "
          f"median of {args.reps} interleaved calls; shared 2-core machine, timings taken under contention")
    print(f"{'pipeline':<12} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, values in times.items():
        print(f"{name:<12} {medians[name]:>9.3f} {min(values):>7.3f} {max(values):>7.3f}")
    print(f"ratio stablediff / diffusers: {ratio:.3f} (goal <= 1.05)")
    write_result("generate_latency", {"steps": args.steps, "num": args.num, "reps": args.reps,
                                      "sampler": args.sampler, "seconds": times, "median_s": medians,
                                      "ratio": ratio, "goal": 1.05, "note": "shared machine, under contention"})


if __name__ == "__main__":
    main()
