"""Validation loss: fixed timesteps and noise, a function of the weights alone."""

import math

import pytest
import torch

from stablediff.evaluation.val_loss import validation_loss
from stablediff.models.diffusion import make_noise_scheduler
from tests.tiny_models import tiny_unet




def held_out(n: int = 6):
    g = torch.Generator().manual_seed(42)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 3, 32, generator=g)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler(prediction_type="v_prediction")


def test_reports_the_mean_and_one_loss_per_timestep(unet, scheduler):
    latents, text = held_out()
    result = validation_loss(unet, scheduler, latents, text, "v_prediction")
    assert list(result["per_timestep"]) == [100, 300, 500, 700, 900]
    assert all(math.isfinite(v) and v > 0 for v in result["per_timestep"].values())
    assert result["loss"] == pytest.approx(sum(result["per_timestep"].values()) / 5)


def test_a_count_asks_for_evenly_spaced_timesteps(unet, scheduler):
    latents, text = held_out()
    assert list(validation_loss(unet, scheduler, latents, text, "v_prediction", timesteps=4)["per_timestep"]) == \
        [125, 375, 625, 875]


def test_same_weights_give_the_identical_loss_twice(unet, scheduler):
    latents, text = held_out()
    assert validation_loss(unet, scheduler, latents, text, "v_prediction") == \
        validation_loss(unet, scheduler, latents, text, "v_prediction")


def test_the_global_rng_is_left_untouched(unet, scheduler):
    latents, text = held_out()
    before = torch.get_rng_state()
    validation_loss(unet, scheduler, latents, text, "v_prediction")
    assert torch.equal(torch.get_rng_state(), before)


def test_the_batch_size_does_not_change_the_loss(unet, scheduler):
    latents, text = held_out()
    whole = validation_loss(unet, scheduler, latents, text, "v_prediction", batch_size=64)
    in_pairs = validation_loss(unet, scheduler, latents, text, "v_prediction", batch_size=2)
    assert in_pairs["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_different_weights_give_a_different_loss(unet, scheduler):
    latents, text = held_out()
    other = tiny_unet(seed=1)
    assert validation_loss(other, scheduler, latents, text, "v_prediction")["loss"] != \
        validation_loss(unet, scheduler, latents, text, "v_prediction")["loss"]


def test_a_different_seed_draws_different_noise(unet, scheduler):
    latents, text = held_out()
    assert validation_loss(unet, scheduler, latents, text, "v_prediction", seed=1)["loss"] != \
        validation_loss(unet, scheduler, latents, text, "v_prediction", seed=2)["loss"]


@pytest.mark.parametrize("was_training", [True, False])
def test_the_model_is_evaluated_in_eval_mode_and_returned_to_its_mode(unet, scheduler, was_training):
    latents, text = held_out()
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    unet.train(was_training)
    try:
        validation_loss(unet, scheduler, latents, text, "v_prediction", timesteps=(500,))
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert unet.training is was_training


def test_no_autograd_graph_is_built(unet, scheduler):
    latents, text = held_out()
    grad_enabled = []
    hook = unet.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    try:
        validation_loss(unet, scheduler, latents, text, "v_prediction", timesteps=(500,))
    finally:
        hook.remove()
    assert grad_enabled == [False]


def test_timesteps_outside_the_schedule_are_refused(unet, scheduler):
    latents, text = held_out()
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        validation_loss(unet, scheduler, latents, text, "v_prediction", timesteps=(500, 1000))
