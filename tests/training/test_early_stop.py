"""The early-stopping tracker (training/early_stop.py)."""

import math

import pytest

from stablediff.config.finetune import EarlyStoppingConfig
from stablediff.training.early_stop import EarlyStopping


def feed(tracker: EarlyStopping, values: list[float], every: int = 10) -> list[bool]:
    return [tracker.update(every * (i + 1), v) for i, v in enumerate(values)]


def test_min_mode_keeps_the_lowest_and_stops_after_patience():
    tracker = EarlyStopping(patience=2)
    assert feed(tracker, [1.0, 0.8, 0.9]) == [True, True, False]
    assert not tracker.should_stop and tracker.bad_evaluations == 1
    assert feed(tracker, [0.85], every=40) == [False]
    assert tracker.should_stop and tracker.stopped_at == 40
    assert (tracker.best_value, tracker.best_step) == (0.8, 20)
    assert tracker.best_mark() == {"step": 20, "metric": "val_loss", "mode": "min", "value": 0.8}
    assert "patience 2" in tracker.reason() and "step 20" in tracker.reason()


def test_an_improvement_resets_the_count():
    tracker = EarlyStopping(patience=2)
    feed(tracker, [1.0, 1.1, 0.5, 0.6])
    assert not tracker.should_stop and tracker.bad_evaluations == 1 and tracker.best_step == 30


def test_max_mode_keeps_the_highest():
    tracker = EarlyStopping(metric="accuracy", mode="max", patience=1)
    assert feed(tracker, [0.2, 0.5, 0.4]) == [True, True, False]
    assert tracker.best_value == 0.5 and tracker.stopped_at == 30


@pytest.mark.parametrize("mode, values", [("min", [1.0, 0.95, 0.92]), ("max", [1.0, 1.05, 1.08])])
def test_min_delta_an_improvement_must_beat_the_best_by_more(mode, values):
    tracker = EarlyStopping(mode=mode, min_delta=0.1, patience=2)
    assert feed(tracker, values) == [True, False, False]
    assert tracker.best_value == 1.0 and tracker.should_stop
    moved = EarlyStopping(mode=mode, min_delta=0.1)
    assert feed(moved, [1.0, 1.0 + (0.11 if mode == "max" else -0.11)]) == [True, True]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_never_improves(bad):
    tracker = EarlyStopping(patience=2)
    assert feed(tracker, [bad]) == [False]
    assert tracker.best_value is None and tracker.best_step is None  # not even as the first value
    assert feed(tracker, [1.0, bad], every=20) == [True, False]
    assert tracker.best_value == 1.0 and tracker.bad_evaluations == 1


def test_without_patience_it_tracks_the_best_and_never_stops():
    tracker = EarlyStopping(patience=None)
    feed(tracker, [1.0] + [2.0] * 50)
    assert not tracker.should_stop and tracker.best_step == 10 and tracker.bad_evaluations == 50


def test_state_dict_round_trip_continues_the_count():
    tracker = EarlyStopping(patience=3)
    feed(tracker, [1.0, 0.7, 0.9, 0.8])
    resumed = EarlyStopping.from_config(EarlyStoppingConfig(patience=3))
    resumed.load_state_dict(tracker.state_dict())
    assert resumed == tracker
    assert resumed.update(50, 0.75) is False and resumed.stopped_at == 50
    assert tracker.update(50, 0.75) is False and tracker.state_dict() == resumed.state_dict()


def test_stopped_stays_stopped():
    tracker = EarlyStopping(patience=1)
    feed(tracker, [1.0, 1.5])
    assert tracker.stopped_at == 20
    assert tracker.update(30, 0.1) is True  # a later best is recorded...
    assert tracker.should_stop and tracker.stopped_at == 20  # ...but the run stopped, and says when
    again = EarlyStopping(patience=1)
    again.load_state_dict(tracker.state_dict())
    assert again.should_stop and again.stopped_at == 20


def test_from_config_takes_every_setting():
    cfg = EarlyStoppingConfig(metric="adherence", patience=4, min_delta=0.5)
    tracker = EarlyStopping.from_config(cfg)
    assert (tracker.metric, tracker.mode, tracker.patience, tracker.min_delta) == ("adherence", "max", 4, 0.5)
    assert tracker.best_value is None and not tracker.should_stop
