"""The diffusion forward process: targets, noise schedules, SNR, evenly spaced timesteps."""

import math

import pytest
import torch

from stablediff.models.diffusion import evenly_spaced_timesteps, make_noise_scheduler, snr, training_target
from tests.tiny_models import PREDICTIONS, SCHEDULES, fixed_batch

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


# --- SNR and timesteps ------------------------------------------------------------------------------

def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    scheduler = make_noise_scheduler()
    t = torch.tensor([0, 10, 500, 999])
    a = scheduler.alphas_cumprod[t]
    assert torch.allclose(snr(scheduler, t), a / (1 - a))


def test_evenly_spaced_timesteps_are_slice_centres():
    assert evenly_spaced_timesteps(5, 1000) == (100, 300, 500, 700, 900)
