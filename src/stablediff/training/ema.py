"""Exponential moving average of weights.

The decay per update is either a fixed `decay` or, with `half_life_images`, the
decay that halves an old weight's share after that many training images (EDM,
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models": beta = 0.5 ** (batch_size / half_life_images)). Counting in images
keeps the average's horizon fixed when the batch size changes.

Warm-up (on by default) caps it at (1 + t) / (10 + t), so early averages forget
the random initialisation fast (the schedule of diffusers' EMAModel without
`use_ema_warmup`, and of many SD trainers). The decay is a pure function of
(step, batch size), so the EMA's resumable state is just its weights.
"""

from __future__ import annotations

import copy

import torch

from stablediff.errors import ConfigError


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The decay used at optimizer step `step` (0-based): `decay`, capped by (1 + t) / (10 + t) when warming up."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def half_life_decay(batch_size: int, half_life_images: float) -> float:
    """EDM's per-update decay: 0.5 ** (batch_size / half_life_images)."""
    if half_life_images <= 0:
        raise ConfigError(f"train.ema_half_life_images must be positive (EDM uses 500000), got {half_life_images}")
    if batch_size < 1:
        raise ValueError(f"the EMA needs the images per update (the global batch size), got {batch_size}")
    return 0.5 ** (batch_size / half_life_images)


class EMA:
    """EMA of a model's parameters; `model` holds the averaged copy (eval mode, no grads).

    EMA(unet, decay=0.999)                           fixed decay, warm-up on
    EMA(unet, half_life_images=10_000, warmup=False)  EDM half-life; pass batch_size to update()
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, half_life_images: float | None = None,
                 warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {decay}")
        if half_life_images is not None and half_life_images <= 0:
            raise ConfigError(f"train.ema_half_life_images must be positive or unset, got {half_life_images}")
        self.decay = decay
        self.half_life_images = half_life_images
        self.warmup = warmup
        # Only parameters that train move: a LoRA or frozen-layer fine-tune's frozen base is not averaged.
        self._trained = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int, batch_size: int | None = None) -> float:
        """The decay of the update after optimizer step `step` with `batch_size` images (global)."""
        if self.half_life_images is None:
            return ema_decay_at(step, self.decay, self.warmup)
        if batch_size is None:
            raise ValueError("an EMA with ema_half_life_images needs update(model, step, batch_size=<images "
                             "in this optimizer step, across all ranks>)")
        return ema_decay_at(step, half_life_decay(batch_size, self.half_life_images), self.warmup)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, batch_size: int | None = None) -> None:
        """ema <- d * ema + (1 - d) * model, with d = decay_at(step, batch_size)."""
        if not self._trained:  # textual inversion: the UNet is frozen, nothing to average
            return
        d = self.decay_at(step, batch_size)
        all_ema, all_params = list(self.model.parameters()), list(model.parameters())
        ema_params = [all_ema[i] for i in self._trained]
        params = [all_params[i].detach().to(ema_params[n].device) for n, i in enumerate(self._trained)]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
