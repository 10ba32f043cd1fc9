"""Device and numeric precision of a training run: autocast, the fp16 grad scaler, channels-last.

bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does, and
gets torch's dynamic GradScaler (its state is part of the checkpoint). Weights
and optimizer state stay fp32 in every mode: autocast only lowers the precision
of the forward/backward math.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stablediff.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but torch sees no CUDA GPU here; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Precision:
    """What `train.mixed_precision` means on one device."""

    mode: str  # "no" | "bf16" | "fp16"
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, mode: str, device: torch.device) -> "Precision":
        scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        return cls(mode, device, scaler)

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.mode])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to true scale before clipping and the divergence check."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skips the step itself when gradients overflowed
        self.scaler.update()

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """A step the guard rejected: drop its gradients, and let the scaler forget it was unscaled."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def prepare_unet(unet: torch.nn.Module, device: torch.device, gradient_checkpointing: bool,
                 channels_last: bool) -> torch.nn.Module:
    unet.to(device)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet

