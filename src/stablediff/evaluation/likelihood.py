"""Likelihood from DDPM's variational bound: -log p(x_0) <= L_prior + L_0 + sum_{t>=1} L_t.

The terms follow improved-diffusion (`_vb_terms_bpd`, `_prior_bpd`): each L_t (t >= 1) is
KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), L_0 is the decoder's negative log-likelihood of
x_0 given x_1, L_prior is KL(q(x_{T-1} | x_0) || N(0, I)); all averaged over dimensions and
divided by ln 2. The reverse step p has the network's mean (its prediction turned into x0_hat,
clipped to [-1, 1] in pixel space, put into the posterior mean) and a fixed variance:
"beta" (sigma_t^2 = beta_t, DDPM's fixedlarge; the default, as in improved-diffusion for
models without a learned variance, and the tighter bound for the small models we train: the
wider step forgives the mean's errors) or "posterior" (beta tilde_t, fixedsmall).

The exact sum costs T model calls per image. The default estimator costs K + 1: the decoder
term L_0 (for a trained model the largest single term) is computed exactly, the prior in
closed form, and sum_{t>=1} L_t is estimated as the mean of L_t / q(t) over K timesteps
drawn from a proposal q (see `timestep_proposal`), with its standard error. Pixel space uses the discretised 8-bit
decoder and reports "bits/dim"; latents are continuous, so L_0 there is the Gaussian negative
log-density of x_0 under p(x_0 | x_1) and the unit is "bits per latent dimension": a density
bound on the VAE's latents, not comparable with pixel bits/dim.

Every random draw comes from a private `torch.Generator(seed)`, image by image, so the number
depends only on the weights, the images and the seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from stablediff.evaluation import gaussian_math as gm
from stablediff.models.diffusion import check_prediction_type

UNITS = {"pixel": "bits/dim", "latent": "bits per latent dimension"}
DECODERS = {"pixel": "discretised Gaussian over 256 levels (8-bit pixels)",
            "latent": "continuous Gaussian negative log-density of x0 under p(x0 | x1)"}
UNIFORM_SHARE = 0.1  # of the proposal spread evenly: bounds L_t / q(t) for any error profile


@dataclass(frozen=True)
class BitsPerDim:
    """The bound averaged over images, with its unit attached so it cannot be mislabelled."""

    value: float
    standard_error: float  # of the timestep sampling, given these images; 0 for the exact sum
    unit: str  # "bits/dim" (pixel space) or "bits per latent dimension"
    space: str
    estimator: str  # "importance-sampled" or "exact"
    num_images: int
    num_timesteps: int  # KL terms evaluated per image (K, or T - 1 for the exact sum)
    num_train_timesteps: int
    model_calls: int
    model_calls_per_image: int
    prior: float  # the three parts of `value`, each averaged over images
    decoder: float
    kl_terms: float
    decoder_kind: str
    variance: str
    seed: int

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.standard_error:.4f} {self.unit}"


def timestep_proposal(schedule: gm.Schedule, variance: str = "beta",
                      uniform_share: float = UNIFORM_SHARE) -> torch.Tensor:
    """q(t) over t = 1 .. T-1, (T,) float64 with q(0) = 0 (the decoder is computed exactly).

    Proportional to the weight each L_t gives a network's error (`mean_kl_weight`), which
    falls by orders of magnitude from small t to large t, as the terms of a trained model do
    (Nichol & Dhariwal 2021, fig. 2): the draws go where the bound is. A `uniform_share` of
    the mass is spread evenly so that a model whose errors do not follow that shape raises
    the variance by at most 1 / uniform_share instead of without bound. Fixed, not learned
    from a pilot: no model calls, and the same proposal for every checkpoint of a run.
    Measured on a tiny pixel UNet with T = 50 and K = 16: a standard error 3-6x smaller than
    uniform draws with the beta variance, ~17x with the posterior variance.
    """
    w = gm.mean_kl_weight(schedule, variance)
    uniform = torch.ones_like(w)
    uniform[0] = 0.0
    return (1.0 - uniform_share) * w / w.sum() + uniform_share * uniform / uniform.sum()


@torch.no_grad()
def bits_per_dim(unet: torch.nn.Module, scheduler, x0: torch.Tensor, text_embeddings: torch.Tensor,
                 prediction_type: str, *, num_timesteps: int | None = 32, seed: int = 1234,
                 space: str = "pixel", variance: str = "beta", batch_size: int = 64) -> BitsPerDim:
    """The variational bound of `x0` (N, C, H, W) under `unet` conditioned on `text_embeddings`
    (N, L, D). x0 is in [-1, 1] on the 8-bit grid for space="pixel", or scaled latents for
    space="latent". num_timesteps=K draws K KL terms per image (K + 1 model calls); None
    computes the exact T-term sum (T calls). The model runs in eval mode and is put back."""
    schedule = gm.Schedule.from_scheduler(scheduler)
    _check_inputs(x0, text_embeddings, prediction_type, space, variance, schedule, num_timesteps)
    proposal = None if num_timesteps is None else timestep_proposal(schedule, variance)
    draw = _drawer(schedule, tuple(x0.shape[1:]), num_timesteps, proposal, torch.Generator().manual_seed(seed))
    calls_per_image = schedule.num_timesteps if num_timesteps is None else num_timesteps + 1
    was_training = unet.training
    unet.eval()
    try:
        per_image = _evaluate(unet, schedule, x0, text_embeddings, draw, calls_per_image, batch_size,
                              prediction_type=prediction_type, space=space, variance=variance)
    finally:
        unet.train(was_training)
    if proposal is None:
        parts = torch.stack([torch.stack([bits[0], bits[1:].sum(), torch.tensor(0.0, dtype=bits.dtype)])
                             for _, bits in per_image])
    else:
        known = gm.variance_kl(schedule, variance) / math.log(2.0)
        parts = torch.stack([_importance_sampled(t, bits, proposal, known) for t, bits in per_image])
    prior = float(gm.prior_kl(schedule, x0.detach().to("cpu", torch.float64)).mean()) / math.log(2.0)
    decoder, kl_terms = float(parts[:, 0].mean()), float(parts[:, 1].mean())
    n = len(x0)
    return BitsPerDim(
        value=prior + decoder + kl_terms, standard_error=math.sqrt(float(parts[:, 2].sum())) / n,
        unit=UNITS[space], space=space, estimator="exact" if proposal is None else "importance-sampled",
        num_images=n, num_timesteps=calls_per_image - 1, num_train_timesteps=schedule.num_timesteps,
        model_calls=n * calls_per_image, model_calls_per_image=calls_per_image, prior=prior, decoder=decoder,
        kl_terms=kl_terms, decoder_kind=DECODERS[space], variance=variance, seed=seed)


def _drawer(schedule: gm.Schedule, shape: tuple[int, ...], num_timesteps: int | None, proposal: torch.Tensor | None,
            generator: torch.Generator) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The next image's (timesteps (J,), noise (J, *shape)): every t once for the exact sum,
    else t = 0 (the decoder) and K draws from the proposal."""
    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        if proposal is None:
            t = torch.arange(schedule.num_timesteps)
        else:
            drawn = torch.multinomial(proposal, num_timesteps, replacement=True, generator=generator)
            t = torch.cat([torch.zeros(1, dtype=torch.long), drawn])
        return t, torch.randn((len(t), *shape), generator=generator, dtype=torch.float64)
    return draw


def _importance_sampled(t: torch.Tensor, bits: torch.Tensor, proposal: torch.Tensor,
                        known: torch.Tensor) -> torch.Tensor:
    """[decoder, estimate of sum_{t>=1} L_t, its variance] of one image from its draws.

    The model-free part of each term (`known`, from `variance_kl`) is summed exactly and only
    the rest is sampled: a control variate, 0 for the posterior variance."""
    drawn = t[1:]
    ratios = (bits[1:] - known[drawn]) / proposal[drawn]
    return torch.stack([bits[0], known.sum() + ratios.mean(), ratios.var() / len(ratios)])


def _evaluate(unet, schedule: gm.Schedule, x0: torch.Tensor, text_embeddings: torch.Tensor,
              draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], calls_per_image: int, batch_size: int,
              **options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(timesteps, bits) of each image's draws, (J,) each. Draws are made image by image in
    order, and batches cut across images, so neither the batch size nor the device changes
    which noise an image sees."""
    images_per_chunk = max(1, batch_size // calls_per_image)
    results = []
    for start in range(0, len(x0), images_per_chunk):
        chunk = range(start, min(start + images_per_chunk, len(x0)))
        draws = [draw() for _ in chunk]
        index = torch.tensor(list(chunk)).repeat_interleave(calls_per_image)
        t = torch.cat([d[0] for d in draws])
        noise = torch.cat([d[1] for d in draws])
        bits = torch.cat([
            _term_bits(unet, schedule, x0[index[s:s + batch_size]], text_embeddings[index[s:s + batch_size]],
                       t[s:s + batch_size], noise[s:s + batch_size], **options)
            for s in range(0, len(t), batch_size)])
        results += list(zip(t.split(calls_per_image), bits.split(calls_per_image)))
    return results


def _term_bits(unet, schedule: gm.Schedule, x0: torch.Tensor, text_embeddings: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor, *, prediction_type: str, space: str, variance: str) -> torch.Tensor:
    """L_t in bits per dimension for each row (B,): the decoder where t = 0, else the KL.
    The network runs on its own device and dtype; the bound's math runs on the CPU in float64."""
    parameter = next(unet.parameters())
    x0 = x0.detach().to("cpu", torch.float64)
    xt = gm.q_sample(schedule, x0, t, noise)
    output = unet(xt.to(parameter.device, parameter.dtype), t.to(parameter.device),
                  text_embeddings.to(parameter.device, parameter.dtype)).sample
    x0_hat = gm.predicted_x0(schedule, output.to("cpu", torch.float64), xt, t, prediction_type)
    if space == "pixel":
        x0_hat = x0_hat.clamp(-1.0, 1.0)  # the data's range: part of the model, as in image_nll.py
    model_mean, _ = gm.q_posterior_mean_variance(schedule, x0_hat, xt, t)
    true_mean, _ = gm.q_posterior_mean_variance(schedule, x0, xt, t)
    model_logvar = gm.gather(schedule.model_log_variance(variance), t, x0)
    # At t = 0 the KL is unused (the decoder term replaces it), so the clipped log variance serves.
    true_logvar = gm.gather(schedule.posterior_log_variance_clipped, t, x0)
    kl = gm.normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(dim=1)
    log_scale = (0.5 * model_logvar).expand_as(x0)
    if space == "pixel":
        log_likelihood = gm.discretized_gaussian_log_likelihood(x0, model_mean, log_scale)
    else:
        log_likelihood = gm.gaussian_log_density(x0, model_mean, log_scale)
    nll = -log_likelihood.flatten(1).mean(dim=1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def _check_inputs(x0: torch.Tensor, text_embeddings: torch.Tensor, prediction_type: str, space: str, variance: str,
                  schedule: gm.Schedule, num_timesteps: int | None) -> None:
    check_prediction_type(prediction_type)
    if space not in UNITS:
        raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")
    if variance not in gm.VARIANCES:
        raise ValueError(f"variance must be one of {gm.VARIANCES}, got {variance!r}")
    if x0.dim() != 4 or len(x0) == 0 or len(x0) != len(text_embeddings):
        raise ValueError(f"bits_per_dim needs x0 (N, C, H, W) with N > 0 and one text embedding per image; got "
                         f"x0 {tuple(x0.shape)} and {len(text_embeddings)} embeddings")
    if num_timesteps is not None and num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2 (a standard error needs two draws), got {num_timesteps}")
    if prediction_type == "epsilon" and float(schedule.alphas_cumprod[-1]) == 0.0:
        raise ValueError("an epsilon model cannot give x0 at zero terminal SNR; this schedule ends at alpha_bar = 0")
    if space == "pixel":
        levels = (x0.detach().double() + 1.0) * 127.5
        if levels.min() < -1e-3 or levels.max() > 255.0 + 1e-3 or (levels - levels.round()).abs().max() > 1e-2:
            raise ValueError("pixel-space bits/dim needs 8-bit images scaled to [-1, 1] (uint8 / 127.5 - 1): "
                             "the discretised decoder scores each pixel's bin. For latents pass space='latent'.")
