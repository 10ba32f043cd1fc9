"""Training objectives: min-SNR weights, offset noise, timestep sampling, the loss (schedules and targets:
tests/models/test_diffusion.py)."""

import math

import pytest
import torch

from stablediff.models.diffusion import make_noise_scheduler, per_sample_loss, snr, training_target
from stablediff.training.objectives import diffusion_loss, loss_weights, offset_noise, sample_timesteps
from tests.tiny_models import PREDICTIONS, SCHEDULES, fixed_batch, tiny_unet

def x0_from_prediction(scheduler, noisy, prediction, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean sample a prediction implies (closed form; the same formulas as DDPMScheduler.step)."""
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * prediction
    return prediction


# --- loss weights ----------------------------------------------------------------------------------

def test_uniform_weighting_gives_every_sample_weight_one():
    scheduler = make_noise_scheduler()
    assert torch.equal(loss_weights(scheduler, torch.tensor([0, 500, 999]), "epsilon"), torch.ones(3))


@pytest.mark.parametrize("prediction_type, expected", [
    ("epsilon", lambda s, g: torch.minimum(s, g) / s),
    ("v_prediction", lambda s, g: torch.minimum(s, g) / (s + 1)),
    ("sample", lambda s, g: torch.minimum(s, g)),
])
def test_min_snr_weights_follow_hang_et_al_for_each_target(prediction_type, expected):
    scheduler = make_noise_scheduler()
    t = torch.tensor([0, 100, 300, 999])
    s = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    weights = loss_weights(scheduler, t, prediction_type, "min_snr", snr_gamma=5.0)
    assert torch.allclose(weights, expected(s, torch.tensor(5.0)))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_min_snr_weighted_error_equals_min_snr_gamma_times_the_x0_error(prediction_type):
    scheduler = make_noise_scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, _, noise, t = fixed_batch()
    noisy = scheduler.add_noise(latents, noise, t)
    target = training_target(scheduler, latents, noise, t, prediction_type)
    prediction = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    target_error = ((prediction - target) ** 2).mean((1, 2, 3))
    weighted = loss_weights(scheduler, t, prediction_type, "min_snr", 5.0) * target_error
    x0_error = ((x0_from_prediction(scheduler, noisy, prediction, t, prediction_type) - latents) ** 2).mean((1, 2, 3))
    assert torch.allclose(weighted, snr(scheduler, t).clamp(max=5.0) * x0_error, rtol=1e-3)


def test_min_snr_epsilon_weight_at_zero_terminal_snr_is_one_not_nan():
    scheduler = make_noise_scheduler(prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    assert loss_weights(scheduler, torch.tensor([999]), "epsilon", "min_snr").tolist() == [1.0]


def test_unknown_weighting_and_non_positive_gamma_are_refused():
    scheduler = make_noise_scheduler()
    with pytest.raises(ValueError, match="min_snr"):
        loss_weights(scheduler, torch.tensor([1]), "epsilon", "p2")
    with pytest.raises(ValueError, match="snr_gamma"):
        loss_weights(scheduler, torch.tensor([1]), "epsilon", "min_snr", snr_gamma=0)


# --- offset noise ----------------------------------------------------------------------------------

def test_offset_noise_adds_offset_times_a_per_channel_normal_drawn_from_the_generator():
    noise = torch.randn(2, 4, 8, 8)
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(7))
    expected_shift = 0.1 * torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(shifted - noise, expected_shift.expand_as(noise), atol=1e-6)


def test_zero_offset_leaves_the_noise_unchanged():
    noise = torch.randn(2, 4, 8, 8)
    assert offset_noise(noise, 0.0, torch.Generator().manual_seed(0)) is noise


# --- timestep sampling -----------------------------------------------------------------------------

def test_uniform_timesteps_are_randint_from_the_generator():
    drawn = sample_timesteps(16, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(drawn, torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(5)))


def test_timestep_sampling_draws_only_from_the_given_generator():
    rng = torch.get_rng_state()
    first = sample_timesteps(64, 1000, torch.Generator().manual_seed(1), "logit_normal")
    second = sample_timesteps(64, 1000, torch.Generator().manual_seed(1), "logit_normal")
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), rng)


def test_logit_normal_timesteps_concentrate_on_the_middle_noise_levels():
    t = sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), "logit_normal", 0.0, 1.0)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    assert abs(middle - 0.728) < 0.02  # P(|N(0,1)| < logit(0.75)); uniform would give 0.5


def test_logit_mean_shifts_the_median_timestep_to_sigmoid_of_the_mean():
    t = sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), "logit_normal", 1.0, 1.0)
    assert abs(t.float().median().item() - 1000 / (1 + math.exp(-1.0))) < 10


def test_unknown_timestep_sampling_is_refused():
    with pytest.raises(ValueError, match="logit_normal"):
        sample_timesteps(4, 1000, torch.Generator(), "beta")


# --- the loss --------------------------------------------------------------------------------------

def test_uniform_loss_is_plain_mse_between_prediction_and_target():
    unet, scheduler = tiny_unet(), make_noise_scheduler(prediction_type="v_prediction")
    latents, text, noise, t = fixed_batch()
    with torch.no_grad():
        prediction = unet(scheduler.add_noise(latents, noise, t), t, text).sample
        loss = diffusion_loss(unet, scheduler, latents, text, noise, t, "v_prediction")
    target = training_target(scheduler, latents, noise, t, "v_prediction")
    assert torch.allclose(loss, torch.nn.functional.mse_loss(prediction, target), rtol=1e-6)


def test_weighted_loss_is_the_mean_of_weighted_per_sample_losses():
    unet, scheduler = tiny_unet(), make_noise_scheduler()
    latents, text, noise, t = fixed_batch()
    with torch.no_grad():
        per_sample = per_sample_loss(unet, scheduler, latents, text, noise, t, "epsilon")
        loss = diffusion_loss(unet, scheduler, latents, text, noise, t, "epsilon", "min_snr", 5.0)
    assert per_sample.shape == (4,)
    assert torch.allclose(loss, (per_sample * loss_weights(scheduler, t, "epsilon", "min_snr", 5.0)).mean())


COMBINATIONS = [(p, s, w, False) for p in PREDICTIONS for s in SCHEDULES for w in ("uniform", "min_snr")]
COMBINATIONS += [("v_prediction", "scaled_linear", w, True) for w in ("uniform", "min_snr")]


@pytest.mark.parametrize("prediction_type, beta_schedule, weighting, ztsnr", COMBINATIONS)
def test_every_objective_schedule_and_weighting_trains_with_finite_falling_loss(
        prediction_type, beta_schedule, weighting, ztsnr):
    unet = tiny_unet()
    scheduler = make_noise_scheduler(1000, beta_schedule, 0.00085, 0.012, prediction_type, ztsnr)
    latents, text, noise, t = fixed_batch()
    if ztsnr:
        t = torch.tensor([50, 300, 600, 999])  # include the zero-SNR step
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = diffusion_loss(unet, scheduler, latents, text, noise, t, prediction_type, weighting, 5.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
