"""The UNet stage trains a real tiny model: the loss falls on a fixed batch; EMA follows the weights."""

import copy

import torch

from stablediff.config import load_config
from stablediff.models.build import build_noise_scheduler, build_unet
from stablediff.training.ema import EMA, ema_decay_at
from stablediff.models.diffusion import training_target
from stablediff.training.objectives import diffusion_loss


def tiny_unet():
    config = load_config("tiny")
    torch.manual_seed(0)
    return build_unet(config.unet, 4, 4, 32), build_noise_scheduler(config.noise, "epsilon")


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    unet, scheduler = tiny_unet()
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 3, 32, generator=g)
    noise, timesteps = torch.randn(8, 4, 4, 4, generator=g), torch.randint(0, 1000, (8,), generator=g)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(unet, scheduler, latents, text, noise, timesteps, "epsilon")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_targets_follow_their_definitions():
    _, scheduler = tiny_unet()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    assert torch.equal(training_target(scheduler, x0, noise, t, "epsilon"), noise)
    assert torch.equal(training_target(scheduler, x0, noise, t, "sample"), x0)
    assert torch.allclose(training_target(scheduler, x0, noise, t, "v_prediction"), v, atol=1e-6)


def test_ema_matches_a_hand_computation():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    start = copy.deepcopy(model.weight.detach())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)
    d = ema_decay_at(100, 0.9)
    assert d == 0.9
    assert torch.allclose(ema.model.weight, d * start + (1 - d) * model.weight)
