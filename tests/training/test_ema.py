"""EMA of weights: fixed decay with warm-up, EDM half-life in images, resumable state."""

import pytest
import torch

from stablediff.training.ema import EMA, ema_decay_at, half_life_decay


def constant_linear(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def run_three_updates(ema: EMA, model: torch.nn.Module, batch_size: int | None = None) -> list[float]:
    """The model's weight is set to 1, 2, 3 before updates at steps 0, 1, 2; returns the EMA weight after each."""
    seen = []
    for step, value in enumerate((1.0, 2.0, 3.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, step, batch_size)
        seen.append(ema.model.weight[0, 0].item())
    return seen


def hand_ema(start: float, decays: list[float]) -> list[float]:
    value, out = start, []
    for d, target in zip(decays, (1.0, 2.0, 3.0)):
        value = d * value + (1 - d) * target
        out.append(value)
    return out


def test_warm_up_decay_is_one_plus_t_over_ten_plus_t_capped_by_decay():
    assert [ema_decay_at(t, 0.9) for t in (0, 1, 2, 1000)] == [1 / 10, 2 / 11, 3 / 12, 0.9]
    assert ema_decay_at(0, 0.9, warmup=False) == 0.9


def test_ema_with_warm_up_matches_a_hand_computation_over_three_steps():
    model = constant_linear(0.0)
    ema = EMA(model, decay=0.9)
    seen = run_three_updates(ema, model)
    assert seen == pytest.approx(hand_ema(0.0, [1 / 10, 2 / 11, 3 / 12]), abs=1e-7)


def test_ema_without_warm_up_uses_the_fixed_decay_from_the_first_step():
    model = constant_linear(0.0)
    seen = run_three_updates(EMA(model, decay=0.9, warmup=False), model)
    assert seen == pytest.approx(hand_ema(0.0, [0.9, 0.9, 0.9]), abs=1e-7)


def test_half_life_ema_matches_a_hand_computation_over_three_steps():
    model = constant_linear(0.0)
    seen = run_three_updates(EMA(model, half_life_images=40, warmup=False), model, batch_size=8)
    d = 0.5 ** (8 / 40)
    assert seen == pytest.approx(hand_ema(0.0, [d, d, d]), abs=1e-7)


def test_half_life_with_warm_up_takes_the_smaller_decay():
    model = constant_linear(0.0)
    seen = run_three_updates(EMA(model, half_life_images=40, warmup=True), model, batch_size=8)
    d = 0.5 ** (8 / 40)  # 0.87: larger than the warm-up's 0.1, 0.18, 0.25
    assert seen == pytest.approx(hand_ema(0.0, [min(d, (1 + t) / (10 + t)) for t in range(3)]), abs=1e-7)


def test_an_old_weight_keeps_half_its_share_after_half_life_images():
    model = constant_linear(1.0)
    ema = EMA(constant_linear(0.0), half_life_images=80, warmup=False)
    for step in range(10):  # 10 updates of 8 images = 80 images
        ema.update(model, step, batch_size=8)
    assert ema.model.weight[0, 0].item() == pytest.approx(0.5, abs=1e-6)


def test_half_life_decay_is_independent_of_how_the_images_are_batched():
    assert half_life_decay(4, 1000) ** 2 == pytest.approx(half_life_decay(8, 1000))


def test_half_life_ema_without_a_batch_size_says_to_pass_it():
    model = constant_linear(0.0)
    with pytest.raises(ValueError, match="batch_size"):
        EMA(model, half_life_images=100).update(model, 0)


def test_invalid_decay_and_half_life_are_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(constant_linear(0.0), decay=1.0)
    with pytest.raises(ValueError, match="ema_half_life_images"):
        EMA(constant_linear(0.0), half_life_images=0)


def test_state_dict_round_trip_restores_the_average():
    model = constant_linear(0.0)
    ema = EMA(model, decay=0.9)
    run_three_updates(ema, model)
    restored = EMA(constant_linear(5.0), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.model.weight, ema.model.weight)
    assert torch.equal(restored.model.bias, ema.model.bias)
