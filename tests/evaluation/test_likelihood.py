"""Bits per dimension from the variational bound: the exact T-term sum, the importance-sampled
estimator and its standard error, on a tiny pixel-space UNet (3 x 8 x 8, T = 50)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from stablediff.evaluation import gaussian_math as gm
from stablediff.evaluation.likelihood import bits_per_dim, timestep_proposal
from stablediff.models.diffusion import make_noise_scheduler, per_sample_loss
from tests.tiny_models import tiny_unet

T = 50
TRAIN_STEPS = 40


def pixel_unet(seed: int = 0) -> UNet2DConditionModel:
    """A pixel-space UNet: 3-channel 8 x 8 images in and out, 32-wide text embeddings."""
    return tiny_unet(seed, channels=3, widths=(8, 16), groups=4)


def images(n: int = 4) -> torch.Tensor:
    """n fixed 8-bit stripe images scaled to [-1, 1] like a pixel-space run's data, (n, 3, 8, 8)."""
    columns = torch.arange(8).expand(8, 8)
    levels = torch.stack([((columns * 30 + i * 40) % 256).expand(3, 8, 8) for i in range(n)])
    return levels.double() / 127.5 - 1.0


def captions(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler(num_train_timesteps=T, beta_end=0.2)


@pytest.fixture(scope="module")
def untrained():
    return pixel_unet()


@pytest.fixture(scope="module")
def trained(scheduler):
    """The same UNet after a few dozen Adam steps on the four images (a few seconds)."""
    unet = pixel_unet()
    x0, text = images().float(), captions()
    optimizer = torch.optim.Adam(unet.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, T, (len(x0),), generator=g)
        loss = per_sample_loss(unet, scheduler, x0, text, noise, t, "epsilon").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval()


def bpd(unet, scheduler, **options):
    return bits_per_dim(unet, scheduler, images(), captions(), "epsilon", **options)


def test_an_untrained_model_scores_worse_than_raw_8_bit_pixels(untrained, scheduler):
    assert bpd(untrained, scheduler).value > 8.0


def test_training_lowers_bits_per_dim(untrained, trained, scheduler):
    assert bpd(trained, scheduler).value < bpd(untrained, scheduler).value - 1.0


def test_the_importance_sampled_estimate_lands_within_a_few_standard_errors_of_the_exact_sum(trained, scheduler):
    # The exact sum draws one noise per t, so it too is random: with the default beta variance its
    # spread over seeds (~0.1 bits here) is near the estimator's; with "posterior" it is ~2 bits.
    exact = bpd(trained, scheduler, num_timesteps=None)
    estimate = bpd(trained, scheduler, num_timesteps=16)
    assert 0 < estimate.standard_error < 0.05 * estimate.value
    assert abs(estimate.value - exact.value) < 3 * estimate.standard_error


def test_the_estimator_costs_k_plus_one_model_calls_per_image_and_the_exact_sum_t(trained, scheduler):
    estimate, exact = bpd(trained, scheduler, num_timesteps=16), bpd(trained, scheduler, num_timesteps=None)
    assert (estimate.model_calls_per_image, estimate.model_calls, estimate.num_timesteps) == (17, 4 * 17, 16)
    assert (exact.model_calls_per_image, exact.model_calls, exact.num_timesteps) == (T, 4 * T, T - 1)
    assert exact.estimator == "exact" and exact.standard_error == 0.0
    assert estimate.estimator == "importance-sampled"


def test_the_same_checkpoint_gives_identical_numbers_twice(trained, scheduler):
    assert bpd(trained, scheduler) == bpd(trained, scheduler)


def test_a_different_seed_draws_different_timesteps_and_noise(trained, scheduler):
    assert bpd(trained, scheduler, seed=1).value != bpd(trained, scheduler, seed=2).value


def test_the_global_rng_is_left_untouched(trained, scheduler):
    before = torch.get_rng_state()
    bpd(trained, scheduler, num_timesteps=4)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_batch_size_does_not_change_the_draws(trained, scheduler):
    whole = bpd(trained, scheduler, num_timesteps=8, batch_size=64)
    assert bpd(trained, scheduler, num_timesteps=8, batch_size=5).value == pytest.approx(whole.value, rel=1e-6)


@pytest.mark.parametrize("was_training", [True, False])
def test_the_model_runs_in_eval_mode_without_autograd_and_is_put_back(untrained, scheduler, was_training):
    seen = []
    hook = untrained.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    untrained.train(was_training)
    try:
        bpd(untrained, scheduler, num_timesteps=2)
        mode_after = untrained.training
    finally:
        hook.remove()
        untrained.eval()
    assert seen and set(seen) == {(False, False)}
    assert mode_after is was_training


def test_the_result_is_the_sum_of_its_parts_and_carries_its_unit_into_json(trained, scheduler):
    result = bpd(trained, scheduler, num_timesteps=4)
    assert result.value == pytest.approx(result.prior + result.decoder + result.kl_terms, rel=1e-12)
    row = json.loads(json.dumps(result.to_json()))
    assert row["unit"] == "bits/dim" and row["space"] == "pixel" and row["variance"] == "beta"
    assert "discretised" in row["decoder_kind"] and str(result).endswith("bits/dim")


class KnowsTheImage(torch.nn.Module):
    """A network that predicts x0 perfectly (prediction_type "sample") for one known image."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = torch.nn.Parameter(image.float(), requires_grad=False)

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=self.image.expand_as(sample))


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_a_model_that_knows_x0_pays_only_the_decoder_prior_and_variance_costs(scheduler, variance):
    image = torch.full((1, 3, 8, 8), 100 / 127.5 - 1.0, dtype=torch.float64)  # an interior level everywhere
    schedule = gm.Schedule.from_scheduler(scheduler)
    sigma = math.sqrt(float(schedule.posterior_variance[1]))
    bin_mass = math.erf(1 / 255 / sigma / math.sqrt(2))  # P(|N(0, sigma)| < 1/255)
    expected = (-math.log(bin_mass) + float(gm.prior_kl(schedule, image))
                + float(gm.variance_kl(schedule, variance).sum())) / math.log(2)
    oracle = KnowsTheImage(image[0])
    for num_timesteps in (None, 3):
        result = bits_per_dim(oracle, scheduler, image, captions(1), "sample", num_timesteps=num_timesteps,
                              variance=variance)
        assert result.value == pytest.approx(expected, rel=1e-3)
        assert result.standard_error == pytest.approx(0.0, abs=1e-9)  # nothing left to sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_gives_a_finite_bound(untrained, scheduler, prediction_type):
    result = bits_per_dim(untrained, scheduler, images(2), captions(2), prediction_type, num_timesteps=2)
    assert math.isfinite(result.value) and result.value > 0


def test_latents_are_scored_continuously_and_labelled_bits_per_latent_dimension(scheduler):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    result = bits_per_dim(tiny_unet(), scheduler, latents, captions(2), "epsilon", num_timesteps=4, space="latent")
    assert result.unit == "bits per latent dimension" and result.space == "latent"
    assert "continuous" in result.decoder_kind and math.isfinite(result.value)
    assert "bits/dim" not in str(result)


def test_pixel_space_refuses_data_off_the_8_bit_grid(untrained, scheduler):
    with pytest.raises(ValueError, match="8-bit images scaled to"):
        bits_per_dim(untrained, scheduler, images() + 0.001, captions(), "epsilon")


def test_fewer_than_two_timesteps_are_refused(untrained, scheduler):
    with pytest.raises(ValueError, match="num_timesteps must be >= 2"):
        bpd(untrained, scheduler, num_timesteps=1)


def test_the_proposal_is_a_distribution_over_the_kl_terms_weighted_to_small_t(scheduler):
    q = timestep_proposal(gm.Schedule.from_scheduler(scheduler))
    assert q[0] == 0 and float(q.sum()) == pytest.approx(1.0) and (q[1:] > 0).all()
    assert q[1] > 10 * q[-1]


def test_a_zero_terminal_snr_schedule_has_no_prior_cost_for_a_v_prediction_model(untrained):
    zero_snr = make_noise_scheduler(num_train_timesteps=T, prediction_type="v_prediction",
                                    rescale_zero_terminal_snr=True)
    result = bits_per_dim(untrained, zero_snr, images(2), captions(2), "v_prediction", num_timesteps=4)
    assert math.isfinite(result.value) and result.prior == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        bits_per_dim(untrained, zero_snr, images(2), captions(2), "epsilon", num_timesteps=4)
