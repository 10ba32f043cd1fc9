"""Divergence guard: skips NaN/inf and spikes, tolerates ordinary noise, asks for rollback, resumes exactly."""

import json
import random

import pytest

from stablediff.training.guard import DivergenceGuard


def warmed_guard(**kwargs) -> DivergenceGuard:
    """A guard that has seen 20 good losses around 2.0."""
    guard = DivergenceGuard(window=50, spike_factor=5.0, min_history=10, **kwargs)
    for i in range(20):
        assert guard.check(2.0 + 0.1 * (i % 3), grad_norm=1.0).ok
    return guard


def test_nan_loss_is_skipped():
    verdict = warmed_guard().check(float("nan"), 1.0)
    assert (verdict.action, verdict.reason) == ("skip", "nan_loss")


def test_infinite_loss_is_skipped():
    assert warmed_guard().check(float("inf"), 1.0).reason == "inf_loss"


def test_infinite_gradient_norm_is_skipped():
    verdict = warmed_guard().check(2.0, float("inf"))
    assert (verdict.action, verdict.reason) == ("skip", "inf_grad")


def test_nan_is_caught_even_before_any_history():
    assert DivergenceGuard().check(float("nan"), 1.0).action == "skip"


def test_a_loss_far_above_the_running_median_is_a_spike():
    verdict = warmed_guard().check(12.3, 1.0)
    assert verdict.action == "skip"
    assert verdict.reason == "spike: loss 12.3 > 5 × running median 2.1"


def test_spikes_are_not_judged_before_min_history_good_losses():
    guard = DivergenceGuard(min_history=10, window=50)
    for _ in range(9):
        guard.check(1.0, 1.0)
    assert guard.check(100.0, 1.0).ok


def test_skipped_losses_do_not_move_the_running_median():
    guard = warmed_guard()
    guard.check(50.0, 1.0)
    guard.check(float("nan"), 1.0)
    assert guard.median() == pytest.approx(2.1)


def test_ordinary_noise_and_a_slow_drift_are_never_flagged():
    guard = DivergenceGuard(window=50, spike_factor=5.0, min_history=10)
    rng = random.Random(0)
    for step in range(2000):
        level = 1.0 * 0.999 ** step  # the loss falls as training goes on
        loss = level * rng.lognormvariate(0.0, 0.3)  # and jitters batch to batch
        assert guard.check(loss, grad_norm=rng.uniform(0.1, 10.0)).ok, step


def test_more_than_max_events_within_the_window_asks_for_rollback():
    guard = warmed_guard(max_events=3, within_steps=100)
    assert [guard.check(float("nan"), 1.0).action for _ in range(3)] == ["skip"] * 3
    verdict = guard.check(float("nan"), 1.0)
    assert verdict.action == "rollback"
    assert verdict.reason == "4 bad steps within the last 100 (latest: nan_loss)"
    assert guard.rollbacks == 1


def test_bad_steps_spread_wider_than_the_window_do_not_add_up():
    guard = warmed_guard(max_events=3, within_steps=10)
    for _ in range(10):
        assert guard.check(float("nan"), 1.0).action == "skip"
        for _ in range(10):
            guard.check(2.0, 1.0)


def test_after_a_rollback_the_event_count_starts_again():
    guard = warmed_guard(max_events=1, within_steps=100)
    guard.check(float("nan"), 1.0)
    assert guard.check(float("nan"), 1.0).action == "rollback"
    assert guard.check(float("nan"), 1.0).action == "skip"


def test_state_round_trip_through_json_gives_the_same_future_verdicts():
    guard = warmed_guard(max_events=2, within_steps=50)
    guard.check(30.0, 1.0)
    resumed = DivergenceGuard(window=50, spike_factor=5.0, min_history=10, max_events=2, within_steps=50)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    future = [2.2, 40.0, 2.1, float("nan"), 3.0, float("inf")]
    assert [resumed.check(x, 1.0) for x in future] == [guard.check(x, 1.0) for x in future]
    assert resumed.state_dict() == guard.state_dict()


def test_nonsensical_settings_are_refused_with_the_key_to_fix():
    with pytest.raises(ValueError, match="guard.spike_factor"):
        DivergenceGuard(spike_factor=1.0)
    with pytest.raises(ValueError, match="guard.min_history"):
        DivergenceGuard(window=10, min_history=20)
