"""The Gaussian pieces of DDPM's variational bound (Ho et al. 2020, Nichol & Dhariwal 2021),
as pure float64 functions: KL divergences, the discretised-Gaussian decoder, the forward
posterior q(x_{t-1} | x_t, x_0) and the model's reverse step p(x_{t-1} | x_t).

Timesteps are diffusers' indices 0 .. T-1: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
so index 0 is the first noisy level and its term is the decoder p(x_0 | x_1) of the paper
(improved-diffusion counts the same way). All results are per dimension, in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VARIANCES = ("posterior", "beta")  # DDPM's "fixedsmall" (beta tilde) and "fixedlarge" (beta)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation improved-diffusion uses (error below 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for 8-bit data scaled to [-1, 1]: the Gaussian's mass on the pixel's
    bin of half-width 1/255, the two edge bins reaching to -inf and +inf so that the 256 bins
    sum to 1. Probabilities are clamped at 1e-12 so a confident wrong decoder stays finite."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def gaussian_log_density(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_scale)^2) per element: the continuous decoder used for latents."""
    return -0.5 * math.log(2.0 * math.pi) - log_scales - 0.5 * ((x - means) * torch.exp(-log_scales)) ** 2


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule in float64, each tensor (T,)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{t-1}, 1 at t = 0
    posterior_variance: torch.Tensor  # beta tilde_t; 0 at t = 0
    posterior_mean_coef1: torch.Tensor  # weight of x_0 in the posterior mean
    posterior_mean_coef2: torch.Tensor  # weight of x_t

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "Schedule":
        betas = betas.detach().to("cpu", torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return cls(
            betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
            posterior_variance=betas * (1.0 - prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef1=betas * prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod))

    @classmethod
    def from_scheduler(cls, scheduler) -> "Schedule":
        """From a diffusers DDPMScheduler: its betas, with alpha_bar recomputed in float64
        (the scheduler keeps float32, which loses the small-t terms' precision)."""
        return cls.from_betas(scheduler.betas)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta tilde_t, with beta tilde_1 standing in for beta tilde_0 = 0 (log 0 = -inf)."""
        return torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))

    def model_log_variance(self, variance: str) -> torch.Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t), (T,). At t = 0 both choices use beta tilde_1, as
        improved-diffusion does: beta tilde_0 is 0, and beta_0 alone would make the decoder
        far too sharp or too wide for the first noise level."""
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if variance == "posterior":
            return self.posterior_log_variance_clipped
        return torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like` (B, ...)."""
    picked = values.to(like.device)[t.to(like.device)]
    return picked.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
    alpha_bar = gather(schedule.alphas_cumprod, t, x0)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def q_posterior_mean_variance(schedule: Schedule, x0: torch.Tensor, xt: torch.Tensor,
                              t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of q(x_{t-1} | x_t, x_0); variance is (B, 1, ...)."""
    mean = gather(schedule.posterior_mean_coef1, t, x0) * x0 + gather(schedule.posterior_mean_coef2, t, x0) * xt
    return mean, gather(schedule.posterior_variance, t, x0)


def predicted_x0(schedule: Schedule, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """The clean sample a network's output implies, for diffusers' three parameterisations."""
    alpha_bar = gather(schedule.alphas_cumprod, t, xt)
    if prediction_type == "epsilon":
        return (xt - (1.0 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":  # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)
        return alpha_bar.sqrt() * xt - (1.0 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")


def prior_kl(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_{T-1} | x_0) || N(0, I)) per sample, mean over dimensions, in nats. No model
    is involved: it says how far the schedule's last step is from pure noise."""
    t = torch.full((len(x0),), schedule.num_timesteps - 1, dtype=torch.long)
    alpha_bar = gather(schedule.alphas_cumprod, t, x0)
    kl = normal_kl(alpha_bar.sqrt() * x0, torch.log(1.0 - alpha_bar).expand_as(x0),
                   torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).mean(dim=1)


def variance_kl(schedule: Schedule, variance: str) -> torch.Tensor:
    """The part of each KL term that does not depend on the model, (T,), nats per dimension:
    KL of two Gaussians with equal means and the posterior's and the model's variances.
    0 for variance="posterior"; for "beta" it is known exactly, so the estimator sums it
    instead of sampling it. Index 0 (the decoder) is 0."""
    logvar_q = schedule.posterior_log_variance_clipped[1:]
    logvar_p = schedule.model_log_variance(variance)[1:]
    zeros = torch.zeros_like(logvar_q)
    return torch.cat([torch.zeros(1, dtype=torch.float64), normal_kl(zeros, logvar_q, zeros, logvar_p)])


def mean_kl_weight(schedule: Schedule, variance: str) -> torch.Tensor:
    """w_t with KL_t = variance_kl_t + w_t * E|v - v_hat|^2 per dimension, (T,), 0 at t = 0.

    The posterior means differ by coef1_t (x0 - x0_hat), and x0 - x0_hat = sqrt(1 - alpha_bar_t)
    (v_hat - v), so w_t = coef1_t^2 (1 - alpha_bar_t) / (2 sigma_t^2). A network with an error of
    the same size in v at every t (an untrained one; for unit-variance data, also the ideal
    denoiser) has KL terms proportional to w_t: the importance-sampling proposal's shape."""
    sigma2 = torch.exp(schedule.model_log_variance(variance))
    w = schedule.posterior_mean_coef1 ** 2 * (1.0 - schedule.alphas_cumprod) / (2.0 * sigma2)
    w[0] = 0.0
    return w
