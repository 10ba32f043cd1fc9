"""A whole fine-tune: the base copied into the run, what trains made trainable, the training loop, outputs.

The loop, checkpoints, lock, guard, resume checks, validation and early stopping
are the training run's (training/run.py `train_stage2`); what differs is how the
Stage2 is built: the VAE, text encoder, noise schedule and UNet come from the
base (RUN_DIR/base), there is no VAE stage, and checkpoints hold only what trains.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from stablediff import run_schema as schema
from stablediff.errors import ConfigError
from stablediff.finetune.base import BASE_FOLDER, Base, load_saved_base, save_base
from stablediff.finetune.dreambooth import add_class_images, with_prior_weights
from stablediff.finetune.live_captions import make_live_captions
from stablediff.finetune.freeze import format_report, trainable_report
from stablediff.finetune.plan import FinetunePlan
from stablediff.finetune.trainable import make_trainable
from stablediff.models.text_encoder import pipeline_text_encoder
from stablediff.training import distributed
from stablediff.training import state as train_state
from stablediff.training.context import RunContext
from stablediff.training.interrupt import handles_signals
from stablediff.training.precision import resolve_device
from stablediff.training.run import (RunResult, Stage2, capture_all_ranks, encode_features, load_training_images,
                                     data_event, open_run, say, train_stage2)
from stablediff.training.seeding import seed_everything
from stablediff.training.unet_stage import make_train_state


@handles_signals
def run_finetune(plan: FinetunePlan, run_dir: Path, trust_pickle: bool = False,
                 allow_config_change: bool = False) -> RunResult:
    config = plan.config
    dist_info = distributed.from_environment()
    if dist_info.enabled:
        raise ConfigError("stablediff finetune runs in one process; start it without torchrun")
    run = open_run(config, run_dir, False, dist_info)
    base = plan.base  # on a resume, plan_finetune loaded it from RUN_DIR/base already
    if not plan.saved:  # the first start: the base becomes part of the run (atomic: a kill leaves none)
        say(f"base: copying {plan.base.record['path']} into {run_dir / BASE_FOLDER}")
        save_base(plan.base, run_dir)
        base = load_saved_base(run_dir)  # every start trains on the same copy, so a resume is exact
    device = resolve_device(config.train.device)
    stage = train_stage2(run, trust_pickle, device, allow_config_change, build=partial(build_finetune, base=base))
    return finish(run, stage)


def build_finetune(run: RunContext, resume, trust_pickle: bool, device, check, *, base: Base) -> Stage2:
    """Data and features through the base's VAE and text encoder, then what trains made trainable."""
    config, run_dir = run.config, run.run_dir
    seed_everything(config.seed)
    loaded = with_instance_prompt(load_training_images(config, run_dir), config.instance_prompt)
    loaded, prior = add_class_images(config, run_dir, loaded, base, device, say)  # DreamBooth: + class images
    events = [data_event(config, loaded)]
    text_encoder = pipeline_text_encoder(base.pipe, run_dir / BASE_FOLDER)
    fingerprints = {"code": train_state.code_fingerprint(),
                    "data": train_state.data_fingerprint(loaded.images, loaded.captions),
                    "text_encoder": text_encoder.fingerprint}
    if check is not None:
        check.check_fingerprints(fingerprints)
    vae = base.pipe.vae.eval().requires_grad_(False)
    data = with_prior_weights(encode_features(config, run_dir, vae, loaded, text_encoder), prior)
    state = trainable_state(run, base, loaded, len(data), data.order_bucket_ids, device, events)
    started = resume.meta.get(schema.TRAINING_STARTED_AT) if resume is not None else None
    state.extra[schema.TRAINING_STARTED_AT] = started or time.time()
    if train_state.unet_resume(resume) is not None:
        meta = check.restorable_meta(state.order) if check is not None else resume.meta
        train_state.restore(state, resume.tensors, meta)
    capture = partial(capture_all_ranks, state, None, config.model_dump(mode="json"), fingerprints, run.dist)
    return Stage2(vae, text_encoder, data, state, base.training_scheduler(), capture, None, loaded.held_out,
                  loaded.held_out_captions, vae.config.scaling_factor, events=events)


def trainable_state(run: RunContext, base: Base, loaded, num_samples: int, bucket_ids, device, events: list):
    """The train state of what trains: adapters or unfrozen weights (reported, also as an event appended to
    `events`), or the new token's vectors; and the text encoder's adapters (their own learning rate) with
    finetune.text_encoder.lora."""
    config, ft = run.config, run.config.finetune
    lora = make_trainable(base.pipe.unet, ft, config.seed)
    # after the features were cached: the cache never sees the token or the adapters
    live = make_live_captions(base.pipe, ft, loaded.captions, config.train.gradient_accumulation_steps, config.seed)
    if ft.method == "textual_inversion":
        say(f"textual inversion: the {ft.num_vectors} vector(s) of {ft.token!r} train (from {ft.init_token!r}); "
            "the UNet and text encoder are frozen")
    else:
        report = trainable_report(base.pipe.unet)
        say(format_report(report))
        events.append({"event": "trainable", "blocks": report})
    text_lr = None  # textual inversion's vectors: train.learning_rate
    if ft.text_encoder.lora:  # the adapters' LoraConfig goes into the checkpoint with the UNet's
        text_lr, lora[schema.TEXT_ENCODER] = ft.text_encoder.learning_rate, live.encoder.config
        base.pipe.text_encoder.to(device)  # it runs forward and backward every step now
        count = sum(p.numel() for p in live.parameters() if p.requires_grad)
        say(f"text encoder LoRA: {count:,} adapter parameters train (rank {live.encoder.config['r']}, learning "
            f"rate {text_lr if text_lr is not None else config.train.learning_rate:g})")
    state = make_train_state(base.pipe.unet, config.train, num_samples, config.seed, 1, 0, device, config.guard,
                             bucket_ids=bucket_ids, extra_groups=((live, text_lr),) if live else ())
    state.trained_only, state.live_text = True, live
    inversion = {"token": ft.token, "num_vectors": ft.num_vectors} if ft.method == "textual_inversion" else None
    state.extra = {schema.VAE_SCALING_FACTOR: base.pipe.vae.config.scaling_factor, schema.VAE_REPORT: None,
                   schema.FINETUNE_BASE: base.record, schema.LORA_CONFIG: lora, schema.TEXTUAL_INVERSION: inversion}
    return state


def with_instance_prompt(loaded, prompt: str | None):
    """Every training and held-out image captioned `prompt` (DreamBooth's and textual inversion's captions)."""
    if prompt is not None:
        loaded.captions = [[prompt] for _ in loaded.captions]
        loaded.held_out_captions = [prompt] * len(loaded.held_out)
    return loaded


def finish(run: RunContext, stage: Stage2) -> RunResult:
    """The final sample grid (from the EMA weights as trained); exports come from `ckpt export` (best by default)."""
    from stablediff.training.periodic import write_samples

    final_grid = run.run_dir / "samples" / "final.png"
    if stage.complete_at is None or not final_grid.is_file():
        write_samples(stage, run.config, final_grid)
    return RunResult(run.run_dir, run.run_dir / "export", None, stage.state.last_loss, None, stage.complete_at,
                     stage.state.stop_reason)
