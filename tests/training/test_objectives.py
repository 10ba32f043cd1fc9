"""Training objectives: targets, schedules, min-SNR weights, offset noise, timestep sampling, the loss."""

import math

import pytest
import torch

from stablediff.training.objectives import (
    diffusion_loss, evenly_spaced_timesteps, loss_weights, make_noise_scheduler, offset_noise, per_sample_loss,
    sample_timesteps, snr, training_target,
)
from tests.tiny_models import tiny_unet

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def fixed_batch(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 3, 32, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return latents, text, noise, torch.tensor([50, 300, 600, 900][:batch])


def x0_from_prediction(scheduler, noisy, prediction, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean sample a prediction implies (closed form; the same formulas as DDPMScheduler.step)."""
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * prediction
    return prediction


# --- targets ---------------------------------------------------------------------------------------

def test_epsilon_target_is_the_noise_and_sample_target_is_the_clean_latents():
    scheduler = make_noise_scheduler()
    latents, _, noise, t = fixed_batch()
    assert torch.equal(training_target(scheduler, latents, noise, t, "epsilon"), noise)
    assert torch.equal(training_target(scheduler, latents, noise, t, "sample"), latents)


def test_v_target_is_sqrt_alpha_bar_noise_minus_sqrt_one_minus_alpha_bar_x0():
    scheduler = make_noise_scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, _, noise, t = fixed_batch()
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    by_definition = a.sqrt() * noise - (1 - a).sqrt() * latents
    target = training_target(scheduler, latents, noise, t, "v_prediction")
    assert torch.allclose(target, by_definition, atol=1e-6)
    assert torch.allclose(target, scheduler.get_velocity(latents, noise, t), atol=0)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_a_perfect_prediction_of_each_target_lets_diffusers_step_recover_x0(prediction_type):
    scheduler = make_noise_scheduler(prediction_type=prediction_type)
    latents, _, noise, t = fixed_batch()
    noisy = scheduler.add_noise(latents, noise, t)
    target = training_target(scheduler, latents, noise, t, prediction_type)
    for i, timestep in enumerate(t.tolist()):
        out = scheduler.step(target[i:i + 1], timestep, noisy[i:i + 1], generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out.pred_original_sample, latents[i:i + 1], atol=2e-4), timestep


def test_unknown_prediction_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="v_prediction"):
        make_noise_scheduler(prediction_type="flow")


# --- noise schedules -------------------------------------------------------------------------------

def test_linear_and_scaled_linear_betas_run_from_beta_start_to_beta_end():
    linear = make_noise_scheduler(1000, "linear", 1e-4, 0.02)
    scaled = make_noise_scheduler(1000, "scaled_linear", 0.00085, 0.012)
    assert math.isclose(linear.betas[0], 1e-4, rel_tol=1e-5) and math.isclose(linear.betas[-1], 0.02, rel_tol=1e-5)
    assert math.isclose(scaled.betas[0], 0.00085, rel_tol=1e-5) and math.isclose(scaled.betas[-1], 0.012, rel_tol=1e-5)
    assert math.isclose(scaled.betas[500] ** 0.5, 0.00085 ** 0.5 + 500 / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5),
                        rel_tol=1e-5)


def test_cosine_schedule_follows_nichol_and_dhariwal_alpha_bar():
    scheduler = make_noise_scheduler(1000, "squaredcos_cap_v2")
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    for t in (0, 250, 500, 750, 900):
        assert math.isclose(scheduler.alphas_cumprod[t], f[t + 1] / f[0], rel_tol=1e-4), t


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_zero_terminal_snr_rescaling_makes_the_final_alpha_bar_zero(beta_schedule):
    plain = make_noise_scheduler(1000, beta_schedule, 0.00085, 0.012, "v_prediction")
    rescaled = make_noise_scheduler(1000, beta_schedule, 0.00085, 0.012, "v_prediction", rescale_zero_terminal_snr=True)
    assert plain.alphas_cumprod[-1] > 0
    assert rescaled.alphas_cumprod[-1] == 0
    assert snr(rescaled, torch.tensor([999])).item() == 0
    assert math.isclose(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], rel_tol=1e-5)  # x0 end kept
    assert rescaled.config.timestep_spacing == "trailing"  # inference starts at t = T (Lin et al. 2023)


def test_zero_terminal_snr_with_epsilon_prediction_is_refused_pointing_to_v_prediction():
    with pytest.raises(ValueError, match="prediction_type=v_prediction"):
        make_noise_scheduler(prediction_type="epsilon", rescale_zero_terminal_snr=True)


def test_unknown_beta_schedule_names_the_supported_ones():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        make_noise_scheduler(beta_schedule="cosine")


# --- loss weights ----------------------------------------------------------------------------------

def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    scheduler = make_noise_scheduler()
    t = torch.tensor([0, 10, 500, 999])
    a = scheduler.alphas_cumprod[t]
    assert torch.allclose(snr(scheduler, t), a / (1 - a))


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


def test_evenly_spaced_timesteps_are_slice_centres():
    assert evenly_spaced_timesteps(5, 1000) == (100, 300, 500, 700, 900)


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
