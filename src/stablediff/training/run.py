"""A whole training run: data, text encoder, VAE stage, UNet stage, export, samples.

This is the one place that decides the order of stages; each stage is its own
module. The run directory layout is the one in DESIGN.md.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable
from pathlib import Path

import torch

from stablediff.config import RunConfig, dump_config
from stablediff.data.captions import shuffled_variants
from stablediff.data.digits import load_digits
from stablediff.data.loading import load_captioned_images
from stablediff.models.build import build_noise_scheduler, build_unet, build_vae, count_parameters, vae_downscale
from stablediff.models.text_encoder import load_text_encoder
from stablediff.training import state as train_state
from stablediff.training.checkpointing import RunCheckpointer, find_resume, open_stores
from stablediff.data.features import FeatureCache
from stablediff.data.validate import content_hash
from stablediff.training.features import encode_dataset_cached
from stablediff.training.metrics import MetricsLog
from stablediff.training.seeding import seed_everything
from stablediff.training.unet_stage import make_train_state, train_unet
from stablediff.training.vae_stage import VAEReport, images_to_tensor, train_vae


@dataclass
class RunResult:
    run_dir: Path
    export_dir: Path
    vae_report: VAEReport | None
    final_loss: float
    pipeline: object


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_run_dir(config: RunConfig, run_dir: Path, fresh: bool) -> None:
    if fresh and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"--fresh: {run_dir} is not empty; choose a new --run-dir or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("samples", "export"):
        (run_dir / sub).mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))


def load_training_images(config: RunConfig, run_dir: Path):
    """(images, held_out, captions, keys): the digits' fixed split, or any source through validation.

    `keys` name each image's content for the feature cache.
    """
    if config.data.source == "builtin:digits":
        train, held = load_digits(config.data.resolution)
        n = config.data.limit or len(train)
        captions = [train.captions_for(i) for i in range(n)]
        keys = [content_hash(image.tobytes()) for image in train.images[:n]]
        return images_to_tensor(train.images[:n]), images_to_tensor(held.images), captions, keys
    data = load_captioned_images(config.data.source, config.data.resolution, run_dir,
                                 config.data.max_reject_fraction, config.data.caption_policy, config.data.limit)
    say(f"data: {len(data.captions)} training and {len(data.held_out)} held-out samples from {config.data.source}")
    captions = data.captions
    if config.data.caption_shuffle_variants > 1:
        captions = [shuffled_variants(c[0], config.data.caption_shuffle_variants, config.seed, i,
                                      config.data.keep_tokens) for i, c in enumerate(captions)]
    return data.images, data.held_out, captions, data.keys


def encode_features(config: RunConfig, run_dir: Path, vae, images, captions, keys, text_encoder):
    """Latents and caption embeddings through the on-disk feature cache."""
    cache = FeatureCache(config.data.cache_dir or run_dir / "features")
    transform_id = f"cover-center-{config.data.resolution}"
    data, counts = encode_dataset_cached(vae, images, captions, text_encoder, keys, cache, transform_id,
                                         flip=config.data.flip_probability > 0)
    say(f"features: {counts.latents_encoded} images and {counts.text_encoded} captions encoded, "
        f"{counts.latents_reused} images and {counts.text_reused} captions reused from {cache.root}")
    return data


@dataclass
class Stage2:
    """Everything the UNet stage trains with, built fresh or restored from a checkpoint."""

    vae: object
    text_encoder: object
    data: object
    state: object
    noise_scheduler: object
    capture: Callable[[], tuple[dict, dict]]
    vae_report: VAEReport | None


def run_training(config: RunConfig, run_dir: Path, fresh: bool = False, trust_pickle: bool = False) -> RunResult:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    prepare_run_dir(config, run_dir, fresh)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    primary, replicas = open_stores(run_dir, config.checkpoint)
    timings = {"run_start": time.time()}
    resume = find_resume(primary, replicas, say, timings)
    stage = build_stage2(config, run_dir, resume, metrics, trust_pickle)
    timings["rebuilt"] = time.time()

    checkpointer = RunCheckpointer(primary, replicas, config.checkpoint, say)
    checkpointer.install_signal_handlers()
    try:
        if resume is None:  # protects stage 1's work before stage 2 starts
            checkpointer.save(*stage.capture(), {})
        else:
            checkpointer.mark_saved(resume.step)

        def after_step(s) -> None:
            if resume is not None and s.step == resume.step + 1:  # recovery timeline, for bench/recovery.py
                metrics.write(event="resumed", step=resume.step, **{f"t_{k}": v for k, v in timings.items()},
                              t_first_step=time.time())
            checkpointer.after_step(s.step, stage.capture, {"train_loss": s.last_loss})

        say(f"stage 2: text-to-image UNet, {count_parameters(stage.state.unet) / 1e6:.2f}M parameters, "
            f"{config.train.max_steps} steps of {config.train.batch_size} on {len(stage.data)} images")
        train_unet(stage.state, stage.data, stage.noise_scheduler, config.train, stage.vae.config.scaling_factor,
                   config.data, config.seed, metrics, on_step_end=after_step)
        checkpointer.finish(stage.state.step, stage.capture, {"train_loss": stage.state.last_loss})
    finally:
        checkpointer.close()
    return export_and_sample(config, run_dir, stage)


def build_stage2(config: RunConfig, run_dir: Path, resume, metrics: MetricsLog, trust_pickle: bool) -> Stage2:
    """Data, text encoder, VAE (stage 1), encoded features and the UNet train state."""
    seed_everything(config.seed)
    images, held_out, captions, keys = load_training_images(config, run_dir)
    text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length, trust_pickle)
    vae, vae_report = vae_stage(config, images, held_out, resume, metrics, trust_pickle)
    data = encode_features(config, run_dir, vae, images, captions, keys, text_encoder)
    seed_everything(config.seed)
    latent_size = config.data.resolution // vae_downscale(vae)
    unet = build_unet(config.unet, vae.config.latent_channels, latent_size, text_encoder.hidden_size)
    noise_scheduler = build_noise_scheduler(config.noise, config.train.prediction_type)
    state = make_train_state(unet, config.train, len(data), config.seed)
    state.extra = {"vae_scaling_factor": vae.config.scaling_factor,
                   "vae_report": asdict(vae_report) if vae_report else None}
    if resume is not None:
        train_state.restore(state, resume.tensors, resume.meta)
    fingerprints = {"code": train_state.code_fingerprint(), "data": train_state.data_fingerprint(images, captions),
                    "text_encoder": text_encoder.fingerprint}
    capture = partial(train_state.capture, state, vae, config.model_dump(mode="json"), fingerprints)
    return Stage2(vae, text_encoder, data, state, noise_scheduler, capture, vae_report)


def cache_features(config: RunConfig, run_dir: Path, trust_pickle: bool = False) -> None:
    """`stablediff data cache`: encode the data with the run's VAE (its checkpoint, or vae.pretrained)."""
    primary, replicas = open_stores(run_dir, config.checkpoint)
    resume = find_resume(primary, replicas, say)
    if resume is None and not config.vae.pretrained:
        raise ValueError(f"no VAE to encode with: {run_dir} has no checkpoint yet and vae.pretrained is not set. "
                         "Run `stablediff train` (stage 1 trains the VAE and then caches features itself), "
                         "or set vae.pretrained to a local diffusers VAE folder.")
    images, held_out, captions, keys = load_training_images(config, run_dir)
    text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length, trust_pickle)
    vae, _ = vae_stage(config, images, held_out, resume, MetricsLog(run_dir / "metrics.jsonl"), trust_pickle)
    encode_features(config, run_dir, vae, images, captions, keys, text_encoder)


def export_and_sample(config: RunConfig, run_dir: Path, stage: Stage2) -> RunResult:
    """The EMA weights as a diffusers pipeline folder, and the final sample grid."""
    from stablediff.inference.pipeline import assemble_pipeline  # heavy; not needed to resume training

    pipe = assemble_pipeline(stage.vae, stage.text_encoder.model, stage.text_encoder.tokenizer,
                             stage.state.ema.model, dict(stage.noise_scheduler.config))
    export_dir = run_dir / "export" / "diffusers"
    pipe.save_pretrained(export_dir, safe_serialization=True)
    write_sample_grid(pipe, config, run_dir / "samples" / "final.png")
    return RunResult(run_dir, export_dir, stage.vae_report, stage.state.last_loss, pipe)


def vae_stage(config: RunConfig, images, held_out, resume, metrics: MetricsLog, trust_pickle: bool = False):
    """Stage 1: the autoencoder from a checkpoint, a pretrained folder, or trained here."""
    vae = build_vae(config.vae, config.data.resolution, trust_pickle)
    vae_report = None
    if resume is not None:
        vae.load_state_dict(train_state.vae_weights(resume.tensors))
        vae.register_to_config(scaling_factor=resume.meta["vae_scaling_factor"])
        if resume.meta.get("vae_report"):
            vae_report = VAEReport(**resume.meta["vae_report"])
    elif not config.vae.pretrained and config.vae.train_steps > 0:
        say(f"stage 1: autoencoder, {count_parameters(vae) / 1e6:.2f}M parameters, {config.vae.train_steps} steps")
        vae_report = train_vae(vae, images, held_out, config.vae, config.seed, log=metrics.write)
        say(f"autoencoder held-out reconstruction: MSE {vae_report.held_out_mse:.4f}, "
            f"PSNR {vae_report.held_out_psnr:.1f} dB")
        metrics.write(stage="vae", held_out_mse=vae_report.held_out_mse, held_out_psnr=vae_report.held_out_psnr)
    return vae.requires_grad_(False).eval(), vae_report


def write_sample_grid(pipe, config: RunConfig, path: Path) -> list:
    """One row per configured prompt, `per_prompt` seeds each; returns the rows."""
    from stablediff.inference.pipeline import image_grid, txt2img

    rows = [txt2img(pipe, prompt, steps=config.sample.steps, guidance_scale=config.sample.guidance_scale,
                    seed=config.sample.seed, num=config.sample.per_prompt) for prompt in config.sample.prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(path)
    return rows
