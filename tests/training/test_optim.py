"""train.optimizer: every optimizer trains, splits weight decay as users expect, and resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from stablediff.config import ConfigError, load_config
from stablediff.config.schema import TrainConfig
from stablediff.training.optim import make_optimizer, parameter_groups
from stablediff.training.state import capture, optimizer_snapshot, restore, restore_optimizer
from stablediff.training.unet_stage import make_train_state
from tests.tiny_models import fixed_batch, tiny_unet

# A learning rate at which each optimizer fits the regression below in a few dozen steps.
LEARNING_RATES = {"adamw": 1e-2, "adamw8bit": 1e-2, "adafactor": 1e-2, "prodigy": 1.0, "rmsprop": 1e-3, "sgd": 1e-2}
OPTIMIZERS = sorted(LEARNING_RATES)


class TinyNet(nn.Module):
    """A conv with a bias, a GroupNorm, an embedding and a 4,096-weight head (bitsandbytes keeps
    8-bit state from that size on, so its quantized path is the one tested)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.channel_shift = nn.Embedding(1, 8)
        self.head = nn.Linear(512, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 2, 8, 8) -> (B, 8)
        hidden = self.norm(self.conv(x)) + self.channel_shift.weight[0, :, None, None]
        return self.head(torch.relu(hidden).flatten(1))


_data = torch.Generator().manual_seed(0)
INPUTS, TARGETS = torch.randn(32, 2, 8, 8, generator=_data), torch.randn(32, 8, generator=_data)


def config(name: str, **keys) -> TrainConfig:
    return TrainConfig(optimizer=name, learning_rate=LEARNING_RATES[name], weight_decay=0.01, **keys)


def regression_loss(model: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(INPUTS[indices]), TARGETS[indices])


def train(model: nn.Module, optimizer: torch.optim.Optimizer, start: int, stop: int) -> None:
    """Steps start..stop-1, each on a half batch drawn by its step number."""
    for step in range(start, stop):
        indices = torch.randperm(32, generator=torch.Generator().manual_seed(step))[:16]
        optimizer.zero_grad(set_to_none=True)
        regression_loss(model, indices).backward()
        optimizer.step()


def through_checkpoint(tensors: dict, meta: dict) -> tuple[dict, dict]:
    """What a checkpoint gives back: tensors copied, meta through JSON (tuples become lists)."""
    return {name: t.detach().clone() for name, t in tensors.items()}, json.loads(json.dumps(meta))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_the_loss_of_a_small_regression(name):
    model = TinyNet()
    optimizer = make_optimizer([(model, None)], config(name))
    everything = torch.arange(32)
    before = regression_loss(model, everything).item()
    train(model, optimizer, 0, 40)
    assert regression_loss(model, everything).item() < 0.25 * before


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_saved_optimizer_state_is_bitwise_equal_to_training_straight(name):
    cfg = config(name)
    straight = TinyNet()
    train(straight, make_optimizer([(straight, None)], cfg), 0, 6)

    interrupted = TinyNet()
    optimizer = make_optimizer([(interrupted, None)], cfg)
    train(interrupted, optimizer, 0, 3)
    tensors, meta = through_checkpoint(*optimizer_snapshot("optim", optimizer))
    weights = {name: t.clone() for name, t in interrupted.state_dict().items()}

    resumed = TinyNet(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(weights)
    fresh_optimizer = make_optimizer([(resumed, None)], cfg)
    restore_optimizer(fresh_optimizer, "optim", tensors, meta)
    train(resumed, fresh_optimizer, 3, 6)
    for (key, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), key


@pytest.mark.parametrize("name", ["adafactor", "adamw8bit"])
def test_unet_checkpoint_keeps_an_optimizers_step_counts_as_numbers(name):
    """Adafactor and bitsandbytes count steps in Python ints: they come back as ints, not tensors."""
    cfg = config(name, max_steps=4, warmup_steps=0)
    state = make_train_state(tiny_unet(), cfg, num_samples=8, seed=0)
    latents, text, noise, timesteps = fixed_batch()
    for _ in range(2):
        state.optimizer.zero_grad()
        nn.functional.mse_loss(state.unet(latents + noise, timesteps, text).sample, noise).backward()
        state.optimizer.step()
    tensors, meta = through_checkpoint(*capture(state, None, {}, {}))
    assert set(meta["optimizer_scalars"].values()) == {2}

    fresh = make_train_state(tiny_unet(seed=1), cfg, num_samples=8, seed=0)
    restore(fresh, tensors, meta)
    steps = [per_param["step"] for per_param in fresh.optimizer.state.values()]
    assert len(steps) == len(list(fresh.unet.parameters())) and all(type(s) is int and s == 2 for s in steps)


def names_of(model: nn.Module, params: list) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_biases_norm_weights_and_embeddings_go_in_the_group_without_weight_decay():
    model = TinyNet()
    decayed, not_decayed = parameter_groups([(model, None)], config("adamw"))
    assert names_of(model, decayed["params"]) == ["conv.weight", "head.weight"]
    assert names_of(model, not_decayed["params"]) == ["conv.bias", "norm.weight", "norm.bias",
                                                      "channel_shift.weight", "head.bias"]
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.01, 0.0)


def test_decay_norms_and_biases_puts_everything_in_one_group_in_parameter_order():
    model = TinyNet()
    groups = parameter_groups([(model, None)], config("adamw", decay_norms_and_biases=True))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert names_of(model, groups[0]["params"]) == [name for name, _ in model.named_parameters()]


def test_each_module_gets_its_own_learning_rate_and_frozen_parameters_stay_out():
    unet_like, text_encoder_like = TinyNet(), TinyNet(seed=1)
    text_encoder_like.requires_grad_(False)
    text_encoder_like.norm.requires_grad_(True)  # only its norm trains: no decayed group for it
    groups = parameter_groups([(unet_like, None), (text_encoder_like, 5e-5)], config("adamw"))
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 0.01), (1e-2, 0.0), (5e-5, 0.0)]
    assert names_of(text_encoder_like, groups[2]["params"]) == ["norm.weight", "norm.bias"]


def test_a_parameter_shared_by_two_modules_is_trained_once():
    model = TinyNet()
    groups = parameter_groups([(model, None), (model.head, 1e-4)], config("sgd"))
    assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_dora_magnitude_is_not_decayed_but_lora_matrices_are():
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True),
                                    nn.Sequential(nn.Linear(8, 8)))
    decayed, not_decayed = parameter_groups([(model, None)], config("adamw"))
    assert names_of(model, decayed["params"]) == ["0.lora_A.default.weight", "0.lora_B.default.weight"]
    assert names_of(model, not_decayed["params"]) == ["0.lora_magnitude_vector.default.weight"]


def test_nothing_trainable_is_a_config_error():
    model = TinyNet().requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        make_optimizer([(model, None)], config("adamw"))


def test_prodigy_refuses_two_learning_rates():
    with pytest.raises(ConfigError, match="prodigy.*one learning rate"):
        make_optimizer([(TinyNet(), None), (TinyNet(seed=1), 5e-5)], config("prodigy"))


def test_state_of_another_optimizer_is_refused_with_what_to_do():
    model = TinyNet()
    adamw = make_optimizer([(model, None)], config("adamw"))
    train(model, adamw, 0, 1)
    tensors, meta = through_checkpoint(*optimizer_snapshot("optim", adamw))
    with pytest.raises(ConfigError, match="another train.optimizer"):
        restore_optimizer(make_optimizer([(model, None)], config("sgd")), "optim", tensors, meta)


def test_state_from_before_the_decay_split_names_the_key_that_resumes_it():
    model = TinyNet()
    one_group = make_optimizer([(model, None)], config("adamw", decay_norms_and_biases=True))
    train(model, one_group, 0, 1)
    tensors, meta = through_checkpoint(*optimizer_snapshot("optim", one_group))
    with pytest.raises(ConfigError, match="train.decay_norms_and_biases=true"):
        restore_optimizer(make_optimizer([(model, None)], config("adamw")), "optim", tensors, meta)
    restore_optimizer(make_optimizer([(model, None)], config("adamw", decay_norms_and_biases=True)),
                      "optim", tensors, meta)


def test_unknown_optimizer_error_names_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.optimizer=lion"])
    assert "train.optimizer = 'lion'" in str(info.value)
    for choice in OPTIMIZERS:
        assert f"'{choice}'" in str(info.value)


@pytest.mark.parametrize(("keys", "message"), [
    (["train.momentum=0.9"], "train.momentum applies to train.optimizer sgd or rmsprop"),
    (["train.optimizer=rmsprop", "train.nesterov=true"], "train.nesterov needs train.optimizer: sgd"),
    (["train.optimizer=sgd", "train.momentum=0", "train.nesterov=true"], "train.momentum above 0"),
])
def test_optimizer_keys_that_do_not_fit_the_optimizer_are_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", keys)
