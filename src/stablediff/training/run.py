"""A whole training run: data, text encoder, VAE stage, UNet stage, export, samples.

This is the one place that decides the order of stages; each stage is its own
module. The run directory layout is the one in DESIGN.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable
from pathlib import Path

import torch

from stablediff import run_schema as schema
from stablediff.checkpoint.lock import has_run_content
from stablediff.config import RunConfig, dump_config
from stablediff.data.training_set import CaptionedImages, load_training_data
from stablediff.models.build import build_noise_scheduler, build_unet, count_parameters, vae_downscale
from stablediff.models.text_encoder import load_text_encoder
from stablediff.training import state as train_state
from stablediff.training.checkpointing import RunCheckpointer, find_resume, open_stores
from stablediff.data.feature_cache import FeatureCache
from stablediff.training.encoded_dataset import bucket_step, encode_dataset_cached
from stablediff.errors import ConfigError, PathExistsError
from stablediff.training.context import RunContext
from stablediff.training.finished import completed_step, outputs_up_to_date
from stablediff.training.metrics import MetricsLog
from stablediff.training.resume_check import ResumeCheck, explain_load_errors, start_resume_check
from stablediff.training.run_configs import write_run_config
from stablediff.training.seeding import seed_everything
from stablediff.training import distributed
from stablediff.training.interrupt import STOP, handles_signals, safe_point
from stablediff.training.hooks import make_hooks
from stablediff.training.precision import resolve_device
from stablediff.training.unet_stage import make_train_state, train_unet, unwrap_data_parallel, wrap_data_parallel
from stablediff.training.stage1 import Stage1Saves, vae_stage
from stablediff.training.vae_stage import VAEReport


@dataclass
class RunResult:
    run_dir: Path
    export_dir: Path
    vae_report: VAEReport | None
    final_loss: float
    pipeline: object
    complete_at: int | None = None  # the run had already reached max_steps at this step when started
    stop_reason: str | None = None  # why early stopping ended the run


def say(message: str) -> None:
    """Progress for the user, from rank 0 only under torchrun (the other ranks do the same work)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def prepare_run_dir(config: RunConfig, run_dir: Path, fresh: bool) -> None:
    """The folders; config.yaml is written by `commit_run_files` once a resume has been checked."""
    if fresh and run_dir.exists() and has_run_content(run_dir):  # the lock and owner file are no content
        raise PathExistsError(f"--fresh: {run_dir} is not empty; choose a new --run-dir or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("samples", "export"):
        (run_dir / sub).mkdir(exist_ok=True)


def commit_run_files(config: RunConfig, run_dir: Path, resume, check: ResumeCheck | None, metrics: MetricsLog,
                     state_extra: dict) -> None:
    """After the resume checks pass: drop the metrics of steps to be redone, keep every config, record changes."""
    if resume is None:  # no checkpoint: the run starts over, and so does its log
        metrics.rewind(None, None)
    else:
        stage = schema.stage_of(resume.meta)
        # A stage-1 checkpoint is manifest step 0; the autoencoder's own step is in its meta.
        step = resume.meta.get("vae_step", resume.step) if stage == schema.VAE_STAGE else resume.step
        metrics.rewind(stage, step)
    write_run_config(run_dir, dump_config(config), resume.step if resume else 0, keep_previous=resume is not None)
    if check is not None:
        check.record(metrics, state_extra)


def load_training_images(config: RunConfig, run_dir: Path) -> CaptionedImages:
    """The digits' fixed split, or any source through validation: `.images`, `.held_out`, `.captions`,
    `.keys` (content hashes, for the feature cache) and `.prepared` (bucketed, cropped: for the latents)."""
    return load_training_data(config.data, config.seed, run_dir, bucket_step(config.vae), say,
                              stop=safe_point("while reading the data", "nothing needed saving yet"))


def encode_features(config: RunConfig, run_dir: Path, vae, loaded: CaptionedImages, text_encoder):
    """Latents (per bucket and crop variant) and caption embeddings through the on-disk feature cache."""
    cache = FeatureCache(config.data.cache_dir or run_dir / "features")
    stop = safe_point("while encoding features", f"what was encoded is kept in {cache.root} (and stage 1 "
                                                 "in its checkpoint)")
    stop()
    data, counts = encode_dataset_cached(vae, loaded.prepared, loaded.captions, text_encoder, cache,
                                         flip=config.data.flip_probability > 0,
                                         bucketed=config.data.buckets is not None, on_batch=stop)
    say(f"features: {counts.latents_encoded} images and {counts.text_encoded} captions encoded, "
        f"{counts.latents_reused} images and {counts.text_reused} captions reused from {cache.root}")
    return data


@dataclass
class Stage2:
    """Everything the UNet stage trains with, built fresh or restored from a checkpoint."""

    vae: object  # None for a pixel-space model
    text_encoder: object
    data: object
    state: object
    noise_scheduler: object
    capture: Callable[..., tuple[dict, dict] | None]
    vae_report: VAEReport | None
    held_out: torch.Tensor
    held_out_captions: list[str] | None
    scaling_factor: float
    complete_at: int | None = None  # set when the resumed checkpoint already reached train.max_steps
    # This start's metrics.jsonl events (the data counts, a fine-tune's trainable report), written once a
    # resume has rewound the log: written before, a step-less event would count as the rewind's anchor and
    # keep the records of the steps about to be redone.
    events: list[dict] = field(default_factory=list)

    def pipeline(self):
        """A diffusers pipeline around the EMA weights (latent models only)."""
        from stablediff.models.pipeline_assembly import assemble_pipeline  # heavy; not needed to resume training

        pipe = assemble_pipeline(self.vae, self.text_encoder.model, self.text_encoder.tokenizer,
                                 self.state.ema.model, dict(self.noise_scheduler.config))
        return pipe.to(self.state.precision.device)


@handles_signals  # before any work: each stage stops at its next safe point (training/interrupt.py)
def run_training(config: RunConfig, run_dir: Path, fresh: bool = False, trust_pickle: bool = False,
                 allow_config_change: bool = False) -> RunResult:
    """A whole run; under torchrun every rank calls this and rank 0 writes the run directory."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    dist_info = distributed.from_environment()
    device = resolve_device(config.train.device, dist_info.local_rank)
    distributed.init(dist_info, device)
    try:
        run = open_run(config, run_dir, fresh, dist_info)
        stage = train_stage2(run, trust_pickle, device, allow_config_change)
        distributed.shutdown(synchronize=True)  # the export and samples are rank 0's alone
        return export_and_sample(config, run_dir, stage) if dist_info.is_main else None
    finally:
        distributed.shutdown()


def open_run(config: RunConfig, run_dir: Path, fresh: bool, dist_info: distributed.DistInfo) -> RunContext:
    """The run directory made ready (by rank 0; the others wait for it) and the run's context."""
    if dist_info.is_main:
        prepare_run_dir(config, run_dir, fresh)
    else:  # the other ranks restore the checkpoint rank 0 commits after stage 1
        distributed.barrier()
    metrics = MetricsLog(run_dir / "metrics.jsonl") if dist_info.is_main else None
    return RunContext(config, run_dir, metrics, dist_info)


def train_stage2(run: RunContext, trust_pickle: bool, device, allow_config_change: bool = False,
                 build: Callable[..., Stage2] | None = None) -> Stage2:
    """Build (or restore) stage 2 and run its loop with checkpoints, validation and rollback.

    `build(run, resume, trust_pickle, device, check)` makes the Stage2: `build_stage2` for a
    training run, the fine-tune's own for `stablediff finetune` (finetune/run.py)."""
    config, run_dir, metrics, is_main = run.config, run.run_dir, run.metrics, run.dist.is_main
    primary, replicas = open_stores(run_dir, config.checkpoint)
    resume = find_resume(primary, replicas, say, announce=False)
    check = start_resume_check(config, run_dir, resume, allow_config_change, say)  # before any work
    if resume is None and is_main:
        commit_run_files(config, run_dir, None, None, metrics, {})
    with explain_load_errors(check):
        stage = (build or build_stage2)(run, resume, trust_pickle, device, check)
    if resume is not None and is_main:
        commit_run_files(config, run_dir, resume, check, metrics, stage.state.extra)
    stage.complete_at = completed_step(train_state.unet_resume(resume), config.train.max_steps)
    for event in stage.events if metrics is not None and stage.complete_at is None else ():
        metrics.write(**event)  # a finished run started again logs nothing: it trains nothing
    resume = train_state.unet_resume(resume)  # a stage-1 checkpoint was resumed by build_stage2
    checkpointer = RunCheckpointer(primary, replicas, config.checkpoint, say, run.dist,
                                   rollback_window=config.guard.within_steps if config.guard.enabled else None,
                                   best=config.checkpoint.ranked_by(config.early_stopping), run_dir=run_dir)
    hooks = make_hooks(run, stage, checkpointer, resume)
    try:
        loop_stage2(run, stage, checkpointer, hooks, resume)
    finally:
        checkpointer.close()
        hooks.close()
    return stage


def loop_stage2(run: RunContext, stage: Stage2, checkpointer: RunCheckpointer, hooks, resume) -> None:
    """From the first checkpoint (stage 1's work, or the resumed step) through the loop to the final one."""
    if resume is None:  # protects stage 1's work before stage 2 starts
        checkpointer.save(0, partial(stage.capture, gather=False), {})
        checkpointer.wait()
    else:
        checkpointer.mark_saved(resume.step)
    if run.dist.is_main:
        distributed.barrier()  # releases the other ranks: the checkpoint they restore is committed
        say(f"stage 2: text-to-image UNet, {count_parameters(stage.state.unet) / 1e6:.2f}M parameters, "
            f"{run.config.train.max_steps} steps of {describe_batch(run.config, run.dist)} on {len(stage.data)} "
            "images")
    if run.dist.enabled:
        wrap_data_parallel(stage.state)
    try:
        train_unet(stage.state, stage.data, stage.noise_scheduler, stage.scaling_factor, run, hooks)
    finally:
        unwrap_data_parallel(stage.state)
    if stage.state.stop_reason and stage.complete_at is None:
        say(f"stopped early at step {stage.state.step}: {stage.state.stop_reason}")
    checkpointer.finish(stage.state.step, stage.capture, hooks.last_metrics(stage.state))


def describe_batch(config: RunConfig, dist_info) -> str:
    parts = [str(config.train.batch_size)]
    if config.train.gradient_accumulation_steps > 1:
        parts.append(f"{config.train.gradient_accumulation_steps} micro-batches")
    if dist_info.enabled:
        parts.append(f"{dist_info.world_size} ranks")
    return " x ".join(parts)


def build_stage2(run: RunContext, resume, trust_pickle: bool, device=torch.device("cpu"),
                 check: ResumeCheck | None = None) -> Stage2:
    """Data, text encoder, VAE (stage 1), encoded features and the UNet train state.

    `check` compares the data and text-encoder fingerprints with the resumed checkpoint's
    as soon as both are loaded, before anything is restored."""
    config, run_dir, dist_info = run.config, run.run_dir, run.dist
    seed_everything(config.seed)
    loaded, text_encoder, fingerprints = load_inputs(run, trust_pickle, check)
    images, held_out, captions = loaded.images, loaded.held_out, loaded.captions
    if config.vae.enabled:
        saves = Stage1Saves(run_dir, config.model_dump(mode="json"), fingerprints, dist_info, say)
        vae, vae_report = vae_stage(config, images, held_out, resume, run.metrics, trust_pickle, saves)
        data = encode_features(config, run_dir, vae, loaded, text_encoder)
        scaling_factor, latent_channels = vae.config.scaling_factor, vae.config.latent_channels
        latent_size = config.data.resolution // vae_downscale(vae)
    else:
        from stablediff.training.pixel_space import encode_pixels

        vae, vae_report = None, None
        data = encode_pixels(images, captions, text_encoder, flip=config.data.flip_probability > 0)
        scaling_factor, latent_channels, latent_size = 1.0, 3, config.data.resolution
    seed_everything(config.seed)
    unet = build_unet(config.unet, latent_channels, latent_size, text_encoder.hidden_size)
    noise_scheduler = build_noise_scheduler(config.noise, config.train.prediction_type)
    state = make_train_state(unet, config.train, len(data), config.seed, dist_info.world_size, dist_info.rank,
                             device, config.guard, bucket_ids=data.order_bucket_ids)
    state.extra = {"vae_scaling_factor": scaling_factor,
                   "vae_report": asdict(vae_report) if vae_report else None}
    if train_state.unet_resume(resume) is not None:
        meta = check.restorable_meta(state.order) if check is not None else resume.meta
        train_state.restore(state, resume.tensors, meta, rank=dist_info.rank)
    capture = partial(capture_all_ranks, state, vae, config.model_dump(mode="json"), fingerprints, dist_info)
    return Stage2(vae, text_encoder, data, state, noise_scheduler, capture, vae_report, held_out,
                  loaded.held_out_captions, scaling_factor, events=[data_event(config, loaded)])


def load_inputs(run: RunContext, trust_pickle: bool, check: ResumeCheck | None):
    """(the training images, the text encoder, their fingerprints), checked against the resumed checkpoint's."""
    config = run.config
    # Only rank 0 writes the run's quarantine file; the others judge the same samples silently.
    data_dir = run.run_dir if run.dist.is_main else Path(tempfile.mkdtemp(prefix="stablediff-rank"))
    loaded = load_training_images(config, data_dir)
    STOP.check("after reading the data", "nothing needed saving yet")
    text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length, trust_pickle)
    fingerprints = {"code": train_state.code_fingerprint(),
                    "data": train_state.data_fingerprint(loaded.images, loaded.captions),
                    "text_encoder": text_encoder.fingerprint}
    if check is not None:
        check.check_fingerprints(fingerprints)
    return loaded, text_encoder, fingerprints


def data_event(config: RunConfig, loaded: CaptionedImages) -> dict:
    """The metrics.jsonl event of what this start trains and validates on (the report's data summary)."""
    held_out = 0 if loaded.held_out_is_training else len(loaded.held_out)
    return {"event": "data", "source": config.data.source, "train_images": len(loaded.captions),
            "held_out_images": held_out}


def capture_all_ranks(state, vae, config_dump: dict, fingerprints: dict, dist_info, gather: bool = True):
    """The checkpoint's (tensors, meta) on rank 0 (None elsewhere); gathers every rank's RNG."""
    rng = train_state.local_rng()
    gathered = distributed.gather_to_all(rng) if gather else [rng]
    if not dist_info.is_main:
        return None
    return train_state.capture(state, vae, config_dump, fingerprints, gathered[1:])


@handles_signals
def cache_features(config: RunConfig, run_dir: Path, trust_pickle: bool = False) -> None:
    """`stablediff data cache`: encode the data with the run's VAE (its checkpoint, or vae.pretrained)."""
    primary, replicas = open_stores(run_dir, config.checkpoint)
    resume = find_resume(primary, replicas, say)
    if resume is None and not config.vae.pretrained:
        raise ConfigError(f"no VAE to encode with: {run_dir} has no checkpoint yet and vae.pretrained is not set. "
                          "Run `stablediff train` (stage 1 trains the VAE and then caches features itself), "
                          "or set vae.pretrained to a local diffusers VAE folder.")
    loaded = load_training_images(config, run_dir)
    text_encoder = load_text_encoder(config.text_encoder.name, config.text_encoder.max_length, trust_pickle)
    vae, _ = vae_stage(config, loaded.images, loaded.held_out, resume, MetricsLog(run_dir / "metrics.jsonl"),
                       trust_pickle)
    encode_features(config, run_dir, vae, loaded, text_encoder)


def export_and_sample(config: RunConfig, run_dir: Path, stage: Stage2) -> RunResult:
    """The EMA weights as a diffusers pipeline folder, and the final sample grid."""
    from stablediff.models.atomic_output import save_folder, save_pipeline_folder
    from stablediff.training.periodic import write_samples

    pixel = stage.vae is None  # no StableDiffusionPipeline without a VAE: the UNet and scheduler alone
    export_dir = run_dir / "export" / ("pixel" if pixel else "diffusers")
    pipe = None if pixel else stage.pipeline()
    result = RunResult(run_dir, export_dir, stage.vae_report, stage.state.last_loss, pipe, stage.complete_at,
                       stage.state.stop_reason)
    final_grid = run_dir / "samples" / "final.png"
    if stage.complete_at is not None and outputs_up_to_date(stage.complete_at, export_dir, final_grid,
                                                            run_dir / "checkpoints", pixel, say):
        return result
    kept = f"training is complete and checkpointed (step {stage.state.step})"
    STOP.check("before the export", kept)
    # Atomic (models/atomic_output.py): a crash or full disk leaves the previous export whole.
    if pixel:
        def write_pixel(tmp: Path) -> None:
            stage.state.ema.model.save_pretrained(tmp / "unet", safe_serialization=True)
            stage.noise_scheduler.save_pretrained(tmp / "scheduler")

        save_folder(write_pixel, export_dir, replace=True, step=stage.state.step)
    else:
        save_pipeline_folder(pipe, export_dir, replace=True, step=stage.state.step)
    STOP.check("before the final samples", f"{kept} and exported to {export_dir}")
    write_samples(stage, config, final_grid)
    return result
