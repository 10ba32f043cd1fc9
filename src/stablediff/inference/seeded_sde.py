"""DPM++ SDE with its Brownian noise drawn from each image's own seed, on the CPU.

diffusers' DPMSolverSDEScheduler builds one Brownian tree per batch, seeded from
the global RNG unless `noise_sampler_seed` is set, and on the latents' device.
Given a list of seeds (one per image; see `pipeline.seed_scheduler_noise`) it
builds one tree per image; this subclass also builds those trees on the CPU and
moves each draw to the latents' device and dtype, so image i is the same alone
or inside a batch, on any device, like the CPU generators of the initial noise.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler


class SeededDPMSolverSDEScheduler(DPMSolverSDEScheduler):
    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.noise_sampler is None and isinstance(self.noise_sampler_seed, list):
            self.noise_sampler = _cpu_noise_sampler(self.sigmas, sample, self.noise_sampler_seed)
        return super().step(model_output, timestep, sample, *args, **kwargs)


def _cpu_noise_sampler(sigmas: torch.Tensor, sample: torch.Tensor, seeds: list[int]):
    if len(seeds) != sample.shape[0]:
        raise ValueError(f"{len(seeds)} noise seeds for a batch of {sample.shape[0]} images")
    sigmas = sigmas.detach().cpu()
    low, high = sigmas[sigmas > 0].min().item(), sigmas.max().item()
    trees = BrownianTreeNoiseSampler(torch.zeros(sample.shape, dtype=torch.float32), low, high, list(seeds))

    def draw(sigma, sigma_next):  # (B, C, H, W)
        return trees(sigma.cpu(), sigma_next.cpu()).to(sample.device, sample.dtype)

    return draw
