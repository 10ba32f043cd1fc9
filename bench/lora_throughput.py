"""LoRA fine-tune throughput and peak memory: stablediff's loop vs one written like diffusers'
train_text_to_image_lora.py.

    .venv/bin/python bench/lora_throughput.py --base RUN_DIR [--repeats 5] [--steps 30] [--threads N]

Same base (a digits run: MiniLM text encoder, VAE [16, 32, 64], UNet [64, 128, 128]), same data (the
20 nines of the digits-lora-nine recipe, 32x32), same batch (20), same LoRA (rank 8 on attn+ff,
alpha 8), same optimizer (AdamW, lr 2e-3, weight decay 0.01), fp32 on the CPU.

- stablediff: the real fine-tune stage (finetune/run.py build_finetune) and `train_unet`: features
  cached once (VAE posteriors and caption embeddings; each step draws a fresh posterior sample).
- diffusers-style: every step tokenizes the captions, runs the text encoder and
  `vae.encode(pixels).latent_dist.sample() * scaling_factor`, then noise, timesteps, UNet with
  peft adapters, MSE, backward, clip, AdamW: what the example script does (no EMA; it has none).
Each side runs in its own process per repeat (so peak RSS is its own), the sides alternate, the
first steps of each process are a warm-up; the steps/s and the peak RSS are reported as median
and min-max over the repeats, with the ratio. Writes bench/results/lora_throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result  # noqa: E402

SETTINGS = ["train.tensorboard=false", "train.log_every=100000", "train.validate_every=null",
            "early_stopping.patience=null", "train.lr_schedule=constant", "train.warmup_steps=0"]
WARMUP = 3


def build(base: Path, run_dir: Path):
    from stablediff.config import load_config
    from stablediff.finetune.plan import plan_finetune
    from stablediff.finetune.base import save_base, load_saved_base
    from stablediff.finetune.run import build_finetune
    from stablediff.training.context import RunContext
    from stablediff.training.metrics import MetricsLog

    config = load_config("digits-lora-nine", [f"finetune.base={base}", *SETTINGS])
    plan = plan_finetune(config, run_dir)
    save_base(plan.base, run_dir)
    run = RunContext(plan.config, run_dir, MetricsLog(run_dir / "metrics.jsonl"))
    return run, build_finetune(run, None, False, None, None, base=load_saved_base(run_dir))


def ours(base: Path, run_dir: Path, steps: int) -> float:
    from stablediff.training.unet_stage import train_unet

    run, stage = build(base, run_dir)
    timed = {}
    for name, count in (("warmup", WARMUP), ("timed", steps)):
        run.config.train.max_steps = stage.state.step + count
        started = time.perf_counter()
        train_unet(stage.state, stage.data, stage.noise_scheduler, stage.scaling_factor, run)
        timed[name] = time.perf_counter() - started
    return steps / timed["timed"]


def theirs(base: Path, run_dir: Path, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from stablediff.models.adapters import attach_lora
    from stablediff.training.run import load_training_images

    run, stage = build(base, run_dir)  # the same base, data and LoRA config; its cached features go unused
    vae, encoder, scheduler = stage.vae, stage.text_encoder, stage.noise_scheduler
    unet = type(stage.state.unet).from_config(stage.state.unet.config)
    unet.load_state_dict({k.replace(".base_layer.", "."): v for k, v in stage.state.unet.state_dict().items()
                          if "lora_" not in k})
    attach_lora(unet, stage.state.extra["lora_config"])
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.config.train.learning_rate, weight_decay=0.01)
    loaded = load_training_images(run.config, run.run_dir)  # the images themselves, not their cached latents
    images, captions = loaded.images, [c[0] for c in loaded.captions]
    batch = run.config.train.batch_size

    def step() -> None:
        picks = torch.randperm(len(images))[:batch]
        tokens = encoder.tokenizer([captions[i] for i in picks], padding="max_length", truncation=True,
                                   max_length=encoder.tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            latents = vae.encode(images[picks]).latent_dist.sample() * vae.config.scaling_factor
            text = encoder.model(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(picks),))
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(WARMUP):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - started)


def one_side(side: str, base: Path, steps: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        rate = (ours if side == "stablediff" else theirs)(base, Path(tmp) / "run", steps)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"steps_per_second": rate, "peak_rss_mib": peak_mib}))


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a digits run (e.g. runs/digits-0to8); needed to measure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--side", choices=["stablediff", "diffusers_style"], help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, default=None, help="print the RESULTS.md table of a results JSON")
    args = parser.parse_args()
    if args.markdown:
        return print(markdown(json.loads(args.markdown.read_text())))
    if args.base is None:
        parser.error("--base RUN_DIR is needed to measure")
    if args.side:
        return one_side(args.side, args.base.resolve(), args.steps, args.threads)
    runs: dict[str, list[dict]] = {"stablediff": [], "diffusers_style": []}
    for _ in range(args.repeats):
        for side in runs:  # interleaved: drift in the machine's load hits both sides
            command = [sys.executable, __file__, "--side", side, "--base", str(args.base), "--steps", str(args.steps)]
            command += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    result = {side: {key: spread([r[key] for r in records]) for key in ("steps_per_second", "peak_rss_mib")}
              for side, records in runs.items()}
    ratios = [a["steps_per_second"] / b["steps_per_second"] for a, b in zip(runs["stablediff"],
                                                                            runs["diffusers_style"])]
    result["throughput_ratio"] = spread(ratios)
    result.update(repeats=args.repeats, steps=args.steps, batch=20, threads=args.threads)
    write_result("lora_throughput", result)
    for side in runs:
        sps, rss = result[side]["steps_per_second"], result[side]["peak_rss_mib"]
        print(f"{side:<16} {sps['median']:.2f} steps/s ({sps['min']:.2f}-{sps['max']:.2f}), "
              f"peak RSS {rss['median']:.0f} MiB ({rss['min']:.0f}-{rss['max']:.0f})")
    r = result["throughput_ratio"]
    print(f"ratio {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}; goal >= 1.3x)")


def markdown(result: dict) -> str:
    def cell(stats: dict, digits: int) -> str:
        return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

    r = result["throughput_ratio"]
    return "\n".join([
        f"Machine: {result['machine']}; {result['date']}; {result['repeats']} interleaved repeats of "
        f"{result['steps']} steps, batch {result['batch']}.", "",
        "| side | steps/s, median (min-max) | peak RSS MiB, median (min-max) |", "|---|---|---|",
        *(f"| {side} | {cell(result[side]['steps_per_second'], 2)} | {cell(result[side]['peak_rss_mib'], 0)} |"
          for side in ("stablediff", "diffusers_style")),
        f"| **ratio** | **{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f}); goal >= 1.3x | |"])


render = markdown  # what bench/render_results.py calls for this benchmark's RESULTS.md section


if __name__ == "__main__":
    main()
