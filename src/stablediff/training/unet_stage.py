"""Stage 2: train the text-conditioned UNet on encoded latents and caption embeddings.

The loop reads top to bottom: draw a batch, compute the loss (a pure function
in `objectives`), step the optimizer, update the EMA, log, and let the
checkpoint hook look at the step. Everything a resumed run needs lives in
`UNetTrainState`.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from stablediff.config.schema import GuardConfig, TrainConfig
from stablediff.data.order import BatchOrder, BucketBatchOrder, make_batch_order
from stablediff.errors import UserError
from stablediff.training.ema import EMA
from stablediff.training.batches import batch_weights, draw_batch
from stablediff.training.context import RunContext
from stablediff.training.encoded_dataset import EncodedDataset
from stablediff.training.lr_schedule import lr_multiplier
from stablediff.training.distributed import mean_over_ranks
from stablediff.training.guard import DivergenceGuard
from stablediff.training.optim import make_optimizer
from stablediff.training.precision import Precision, prepare_unet
from stablediff.training.step import StepBatch, accumulate_gradients, draw_noise, grad_norm_and_clip
from stablediff.training.progress import StepProgress


@dataclass
class UNetTrainState:
    unet: UNet2DConditionModel
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    order: BatchOrder | BucketBatchOrder  # the data order
    precision: Precision
    guard: DivergenceGuard | None = None
    model: torch.nn.Module | None = None  # what the loop calls: the UNet, or its DDP/compiled wrapper
    step: int = 0
    images_seen: int = 0
    last_loss: float = float("nan")
    lr_scale: float = 1.0  # lowered by each divergence rollback; part of the checkpoint
    skipped_batches: int = 0  # batches rollbacks skipped: a step draws with (seed, step + this, rank); checkpointed
    pending_skip: int = 0  # batches the data order still has to pass over (set by a rollback, used at once)
    stop_reason: str | None = None  # set by early stopping: the loop ends after this step
    trained_only: bool = False  # a fine-tune: checkpoints hold only the parameters that train
    # Textual inversion or text-encoder LoRA: captions are encoded each step through the text encoder's
    # trainable part (finetune/live_captions.py: a module with encode_rows(rows) -> (B, L, D), encode(captions),
    # state_dict(), load_state_dict() and `group`, the checkpoint's tensor group of its state).
    live_text: object | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = self.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps (and gradient clipping sees): the UNet's trained weights and the text
        encoder's (textual inversion's vectors, a text-encoder LoRA's adapters)."""
        extra = [p for p in self.live_text.parameters() if p.requires_grad] if self.live_text is not None else []
        return [p for p in self.unet.parameters() if p.requires_grad] + extra

    def scale_lr(self, factor: float) -> None:
        """Multiply the LR for the rest of the run (the schedule's shape is kept)."""
        self.lr_scale *= factor
        self.lr_scheduler.base_lrs = [lr * factor for lr in self.lr_scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class TrainingDiverged(UserError, RuntimeError):
    """The divergence guard gave up (no rollback possible, or too many); checkpoints stay intact."""


@dataclass
class LoopHooks:
    """What the run around the loop does at step boundaries (checkpoints, validation, rollback)."""

    after_step: Callable[[UNetTrainState], None] | None = None
    rollback: Callable[[UNetTrainState, int], None] | None = None  # (state, first bad step)


def make_train_state(unet: UNet2DConditionModel, cfg: TrainConfig, num_samples: int, seed: int,
                     world_size: int = 1, rank: int = 0, device: torch.device | None = None,
                     guard_cfg: GuardConfig | None = None, bucket_ids: list[int] | None = None,
                     extra_groups: tuple = ()) -> UNetTrainState:
    """`extra_groups`: more (module, lr or None) for the optimizer, e.g. textual inversion's vectors or the
    text encoder's adapters (their requires_grad parameters train)."""
    device = device or torch.device("cpu")
    prepare_unet(unet, device, cfg.gradient_checkpointing, cfg.channels_last)
    optimizer = make_optimizer([(unet, None), *extra_groups], cfg)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule))
    order = make_batch_order(num_samples, seed, world_size, rank, bucket_ids)  # bucket_ids: one bucket per batch
    ema = EMA(unet, cfg.ema_decay, half_life_images=cfg.ema_half_life_images, warmup=cfg.ema_warmup)
    guard = None
    if guard_cfg is not None and guard_cfg.enabled:
        guard = DivergenceGuard(spike_factor=guard_cfg.spike_factor, window=guard_cfg.window,
                                min_history=guard_cfg.min_history, max_events=guard_cfg.max_events,
                                within_steps=guard_cfg.within_steps)
    model = torch.compile(unet) if cfg.compile else unet
    return UNetTrainState(unet, ema, optimizer, lr_scheduler, order, Precision.create(cfg.mixed_precision, device),
                          guard, model)


def wrap_data_parallel(state: UNetTrainState) -> None:
    """DDP around the model (a collective: every rank calls it, with identical weights)."""
    device = state.precision.device
    state.model = torch.nn.parallel.DistributedDataParallel(
        state.model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_data_parallel(state: UNetTrainState) -> None:
    """The model without its DDP wrapper, once the loop is done. DDP's reducer holds the process group:
    left alive until interpreter exit, it is destroyed after `destroy_process_group`, in whatever order
    the interpreter tears objects down, and that aborted a rank (SIGABRT, "terminate called without an
    active exception", seen under torchrun in the full test suite)."""
    if isinstance(state.model, torch.nn.parallel.DistributedDataParallel):
        state.model = state.model.module
        gc.collect()  # DDP's reference cycles: freed now, while the process group is still alive


def train_unet(state: UNetTrainState, data: EncodedDataset, noise_scheduler: DDPMScheduler, scaling_factor: float,
               run: RunContext, hooks: LoopHooks | None = None) -> UNetTrainState:
    """Step until `train.max_steps`; every step is a pure function of the state and (seed, step, rank)."""
    hooks = hooks or LoopHooks()
    cfg, world_size = run.config.train, run.dist.world_size
    state.model.train()
    step_size = cfg.batch_size * cfg.gradient_accumulation_steps
    with StepProgress("unet", cfg.max_steps, start=state.step, log_every=cfg.log_every,
                      enabled=run.dist.rank == 0) as progress:
        while state.step < cfg.max_steps and state.stop_reason is None:
            t0 = time.perf_counter()
            batch, drawn = next_step_batch(state, data, noise_scheduler, scaling_factor, run)
            verdict = optimizer_step(state, noise_scheduler, batch, cfg, step_size * world_size)
            state.step += 1
            state.images_seen += drawn * world_size  # a bucket's last batch may be short
            progress.update(state.step, state.last_loss, drawn * world_size)
            log_step(run, state, verdict, drawn * world_size, t0)
            if verdict.rollback:
                if hooks.rollback is None:
                    raise TrainingDiverged(f"training diverged at step {state.step}: {verdict.reason}")
                hooks.rollback(state, verdict.first_bad_step)
                continue
            if hooks.after_step is not None:
                hooks.after_step(state)
    state.model.eval()
    return state


def next_step_batch(state: UNetTrainState, data: EncodedDataset, noise_scheduler: DDPMScheduler,
                    scaling_factor: float, run: RunContext) -> tuple[StepBatch, int]:
    """The step's batch and noise on the training device, and how many images it holds (this rank's)."""
    cfg, data_cfg, seed, rank = run.config.train, run.config.data, run.config.seed, run.dist.rank
    step_size = cfg.batch_size * cfg.gradient_accumulation_steps
    for _ in range(state.pending_skip):  # after a rollback the data order moves on (PaLM)
        state.order.next_batch(step_size)
    state.pending_skip = 0
    draw_step = state.step + state.skipped_batches  # and so do the step's random draws
    indices = torch.from_numpy(state.order.next_batch(step_size))
    embed = state.live_text.encode_rows if state.live_text is not None else None
    latents, text_embeddings = draw_batch(data, indices, scaling_factor, data_cfg.caption_dropout, seed,
                                          draw_step, rank, data_cfg.flip_probability, embed)
    noise, timesteps = draw_noise(latents, noise_scheduler.config.num_train_timesteps, cfg, seed, draw_step, rank)
    batch = StepBatch(latents, text_embeddings, noise, timesteps, batch_weights(data, indices))
    batch = batch.to(state.precision.device, cfg.channels_last)
    return batch, len(indices)


def log_step(run: RunContext, state: UNetTrainState, verdict: "StepVerdict", images: int, started: float) -> None:
    """The step's record in metrics.jsonl: every `log_every` steps, at the last step, and for each skipped step."""
    cfg = run.config.train
    if run.metrics is None or not (state.step % cfg.log_every == 0 or state.step == cfg.max_steps or not verdict.ok):
        return
    run.metrics.write(stage="unet", step=state.step, loss=state.last_loss, grad_norm=verdict.grad_norm,
                      lr=state.optimizer.param_groups[0]["lr"],
                      images_per_second=round(images / (time.perf_counter() - started), 1),
                      **({} if verdict.ok else {"skipped": verdict.reason}))


def optimizer_step(state: UNetTrainState, noise_scheduler: DDPMScheduler, batch: StepBatch,
                   cfg: TrainConfig, global_batch: int) -> "StepVerdict":
    """Gradients, the divergence check, and the update (or its skip). Sets state.last_loss."""
    state.optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(state.model, noise_scheduler, batch, cfg, state.precision)
    state.precision.unscale(state.optimizer)
    grad_norm = grad_norm_and_clip(state.trainable_parameters(), cfg.grad_clip)
    loss, = mean_over_ranks([loss])  # every rank judges the same numbers
    state.last_loss = loss
    overflow = state.precision.scaler is not None and not math.isfinite(grad_norm)
    verdict = StepVerdict(grad_norm=grad_norm)
    if state.guard is not None and not overflow:  # fp16 overflows are the grad scaler's business
        judged = state.guard.check(loss, grad_norm, step=state.step)
        verdict = StepVerdict(judged.ok, judged.reason, judged.action == "rollback", judged.first_event, grad_norm)
    if verdict.ok:
        state.precision.step(state.optimizer)
        state.ema.update(state.unet, state.step, global_batch)
        state.lr_scheduler.step()
    else:
        state.precision.skip(state.optimizer)
        with warnings.catch_warnings():  # torch warns when the schedule moves without an optimizer step
            warnings.simplefilter("ignore", UserWarning)
            state.lr_scheduler.step()
    return verdict


@dataclass
class StepVerdict:
    ok: bool = True
    reason: str = ""
    rollback: bool = False
    first_bad_step: int = 0
    grad_norm: float = 0.0
