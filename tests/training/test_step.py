"""One optimizer step: gradient accumulation, mixed precision, the guard's skip."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from stablediff.config.schema import TrainConfig
from stablediff.training.guard import DivergenceGuard
from stablediff.models.diffusion import make_noise_scheduler
from stablediff.training.precision import Precision
from stablediff.training.step import StepBatch, accumulate_gradients, draw_noise
from stablediff.training.unet_stage import UNetTrainState, make_train_state, optimizer_step
from tests.tiny_models import tiny_unet




def fixed_batch(n: int, cfg: TrainConfig, seed: int = 0) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, 4, 8, 8), generator=g)
    noise, timesteps = draw_noise(latents, 1000, cfg, seed=seed, step=0, rank=0)
    return StepBatch(latents, torch.randn((n, 6, 32), generator=g), noise, timesteps)


def gradients(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])


def test_four_micro_batches_give_the_gradient_of_one_batch_four_times_the_size():
    scheduler = make_noise_scheduler()
    batch = fixed_batch(16, TrainConfig())
    whole, split = tiny_unet(), tiny_unet()
    precision = Precision.create("no", torch.device("cpu"))
    loss_whole = accumulate_gradients(whole, scheduler, batch, TrainConfig(gradient_accumulation_steps=1), precision)
    loss_split = accumulate_gradients(split, scheduler, batch, TrainConfig(gradient_accumulation_steps=4), precision)
    assert loss_split == pytest.approx(loss_whole, rel=1e-5)
    torch.testing.assert_close(gradients(split), gradients(whole), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_gives_a_finite_loss_close_to_fp32(mode):
    scheduler = make_noise_scheduler()
    batch = fixed_batch(4, TrainConfig())
    reference = accumulate_gradients(tiny_unet(), scheduler, batch, TrainConfig(),
                                     Precision.create("no", torch.device("cpu")))
    loss = accumulate_gradients(tiny_unet(), scheduler, batch, TrainConfig(),
                                Precision.create(mode, torch.device("cpu")))
    assert math.isfinite(loss) and loss == pytest.approx(reference, rel=0.05)


def test_fp16_grad_scaler_state_survives_a_round_trip():
    precision = Precision.create("fp16", torch.device("cpu"))
    state = precision.state_dict()
    assert state["scale"] > 1
    other = Precision.create("fp16", torch.device("cpu"))
    other.load_state_dict({**state, "scale": 1024.0})
    assert other.state_dict()["scale"] == 1024.0


def make_state(cfg: TrainConfig, guard: DivergenceGuard | None = None) -> UNetTrainState:
    state = make_train_state(tiny_unet(), cfg, num_samples=16, seed=0)
    state.guard = guard
    return state


def test_a_nan_loss_is_skipped_and_leaves_weights_optimizer_and_ema_untouched():
    cfg = TrainConfig(warmup_steps=0)
    state = make_state(cfg, DivergenceGuard(window=10, min_history=2, max_events=3, within_steps=10))
    before = {k: v.clone() for k, v in state.unet.state_dict().items()}
    ema_before = {k: v.clone() for k, v in state.ema.state_dict().items()}
    poisoned = fixed_batch(4, cfg)
    poisoned.latents[0, 0, 0, 0] = float("nan")
    verdict = optimizer_step(state, make_noise_scheduler(), poisoned, cfg, global_batch=4)
    assert not verdict.ok and verdict.reason in ("nan_loss", "nan_grad") and not verdict.rollback
    for name, value in state.unet.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in state.ema.state_dict().items():
        assert torch.equal(value, ema_before[name]), name
    assert not state.optimizer.state  # AdamW never stepped
    verdict = optimizer_step(state, make_noise_scheduler(), fixed_batch(4, cfg, seed=1), cfg, global_batch=4)
    assert verdict.ok and state.optimizer.state


def test_repeated_bad_steps_ask_for_a_rollback_to_before_the_first_one():
    cfg = TrainConfig(warmup_steps=0)
    state = make_state(cfg, DivergenceGuard(window=10, min_history=2, max_events=2, within_steps=10))
    poisoned = fixed_batch(4, cfg)
    poisoned.latents[:] = float("nan")
    verdicts = []
    for step in range(5, 8):
        state.step = step
        verdicts.append(optimizer_step(state, make_noise_scheduler(), poisoned, cfg, global_batch=4))
    assert [v.rollback for v in verdicts] == [False, False, True]
    assert verdicts[-1].first_bad_step == 5


def test_scale_lr_lowers_the_rate_for_the_rest_of_the_schedule():
    cfg = TrainConfig(warmup_steps=0, lr_schedule="constant", learning_rate=1e-3)
    state = make_state(cfg)
    state.scale_lr(0.5)
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    with warnings.catch_warnings():  # torch notes that no optimizer step came first
        warnings.simplefilter("ignore", UserWarning)
        state.lr_scheduler.step()
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert state.lr_scale == 0.5
