"""The Gaussian pieces of the variational bound, against closed forms and diffusers."""

import math

import pytest
import torch

from stablediff.evaluation import gaussian_math as gm
from stablediff.models.diffusion import make_noise_scheduler


@pytest.fixture(scope="module")
def schedule():
    return gm.Schedule.from_scheduler(make_noise_scheduler(num_train_timesteps=50, beta_end=0.2))


def test_kl_of_equal_gaussians_is_zero():
    mean, logvar = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert torch.allclose(gm.normal_kl(mean, logvar, mean, logvar), torch.zeros(10, dtype=torch.float64))


def test_kl_matches_the_closed_form_and_torch_distributions():
    # KL(N(0, 1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2
    one = gm.normal_kl(*torch.tensor([0.0, 0.0, 1.0, math.log(4.0)], dtype=torch.float64))
    assert float(one) == pytest.approx(math.log(2.0) + 0.25 - 0.5, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(gm.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10)


def test_the_approximate_normal_cdf_is_within_2e_4_of_the_exact_one():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (gm.approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4


@pytest.mark.parametrize("mean,scale", [(0.0, 0.01), (0.3, 0.2), (-0.99, 0.004), (1.7, 0.5), (0.0, 3.0)])
def test_the_discretised_likelihood_of_a_pixel_sums_to_one_over_its_256_levels(mean, scale):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    log_p = gm.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                   torch.full_like(levels, math.log(scale)))
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_a_sharp_decoder_on_the_right_level_costs_nothing_and_on_a_wrong_one_is_clamped():
    x = torch.tensor([10 / 127.5 - 1.0], dtype=torch.float64)
    sharp = torch.tensor([math.log(1e-4)], dtype=torch.float64)
    assert float(gm.discretized_gaussian_log_likelihood(x, x, sharp)) == pytest.approx(0.0, abs=1e-9)
    wrong = gm.discretized_gaussian_log_likelihood(x, x + 0.5, sharp)
    assert float(wrong) == pytest.approx(math.log(1e-12))


def test_the_continuous_decoder_is_the_normal_log_density():
    g = torch.Generator().manual_seed(1)
    x, mean, log_scale = torch.randn(3, 50, generator=g, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, log_scale.exp()).log_prob(x)
    assert torch.allclose(gm.gaussian_log_density(x, mean, log_scale), expected, rtol=1e-10)


def test_the_schedule_is_the_schedulers_in_float64():
    scheduler = make_noise_scheduler(num_train_timesteps=50, beta_end=0.2)
    schedule = gm.Schedule.from_scheduler(scheduler)
    assert schedule.alphas_cumprod.dtype == torch.float64 and schedule.num_timesteps == 50
    assert torch.allclose(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5)
    # diffusers' own "fixed_small" variance of the reverse step is the posterior variance
    diffusers_variance = torch.stack([scheduler._get_variance(t) for t in range(1, 50)]).double()
    assert torch.allclose(schedule.posterior_variance[1:], diffusers_variance, rtol=1e-4)


def test_the_posterior_mean_and_variance_are_bayes_rule_on_two_gaussians(schedule):
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 7, 20, 35, 49])
    mean, variance = gm.q_posterior_mean_variance(schedule, x0, xt, t)
    beta, prev = schedule.betas[t], schedule.alphas_cumprod_prev[t]
    # q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(1 - beta) x_{t-1}, beta) N(x_{t-1}; sqrt(prev) x0, 1 - prev)
    precision = (1 - beta) / beta + 1 / (1 - prev)
    per_image = (-1, 1, 1, 1)
    expected_mean = ((1 - beta).sqrt() / beta).view(per_image) * xt + (prev.sqrt() / (1 - prev)).view(per_image) * x0
    assert torch.allclose(mean, expected_mean / precision.view(per_image), rtol=1e-9)
    assert torch.allclose(variance.flatten(), 1 / precision, rtol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_clean_sample_is_recovered_from_a_perfect_prediction(schedule, prediction_type):
    scheduler = make_noise_scheduler(num_train_timesteps=50, beta_end=0.2)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 30, 49])
    xt = gm.q_sample(schedule, x0, t, noise)
    target = {"epsilon": noise, "sample": x0,
              "v_prediction": scheduler.get_velocity(x0.float(), noise.float(), t).double()}[prediction_type]
    assert torch.allclose(gm.predicted_x0(schedule, target, xt, t, prediction_type), x0, atol=1e-5)


def test_the_prior_term_is_the_kl_to_pure_noise_and_zero_at_zero_terminal_snr(schedule):
    x0 = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    ab = float(schedule.alphas_cumprod[-1])
    expected = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * 0.25)
    assert float(gm.prior_kl(schedule, x0)) == pytest.approx(expected, rel=1e-9)
    zero_snr = gm.Schedule.from_scheduler(make_noise_scheduler(num_train_timesteps=50, prediction_type="v_prediction",
                                                               rescale_zero_terminal_snr=True))
    assert float(gm.prior_kl(zero_snr, x0)) == pytest.approx(0.0, abs=1e-6)


def test_the_beta_variance_has_a_model_free_kl_part_and_the_posterior_variance_none(schedule):
    assert gm.variance_kl(schedule, "posterior").abs().max() < 1e-15
    beta_part = gm.variance_kl(schedule, "beta")
    assert beta_part[0] == 0 and (beta_part[1:] > 0).all()


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_each_kl_term_is_its_variance_part_plus_a_weight_times_the_v_error(schedule, variance):
    g = torch.Generator().manual_seed(4)
    x0, xt, error = torch.randn(3, 3, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 15, 40])
    x0_hat = x0 + 0.1 * error
    true_mean, _ = gm.q_posterior_mean_variance(schedule, x0, xt, t)
    model_mean, _ = gm.q_posterior_mean_variance(schedule, x0_hat, xt, t)
    kl = gm.normal_kl(true_mean, gm.gather(schedule.posterior_log_variance_clipped, t, x0), model_mean,
                      gm.gather(schedule.model_log_variance(variance), t, x0)).flatten(1).mean(1)
    v_error = ((x0 - x0_hat) ** 2).flatten(1).mean(1) / (1 - schedule.alphas_cumprod[t])
    expected = gm.variance_kl(schedule, variance)[t] + gm.mean_kl_weight(schedule, variance)[t] * v_error
    assert torch.allclose(kl, expected, rtol=1e-9)


def test_an_unknown_variance_choice_is_refused(schedule):
    with pytest.raises(ValueError, match="variance must be one of"):
        schedule.model_log_variance("learned")
