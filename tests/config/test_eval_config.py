"""train.eval_every / eval_metrics / eval_samples, checkpoint.best_metric and early_stopping's metric and mode.

Everything that ranks or stops on a metric must name one the config computes: the error comes at load,
before any work, and says what to set.
"""

from __future__ import annotations

import pytest

from stablediff.config import ConfigError, load_config
from stablediff.run_schema import METRIC_MODES

EVAL = ["train.eval_every=2", "train.eval_metrics=[fd,adherence]"]


def error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", overrides)
    return str(caught.value)


def test_eval_settings_load_and_rank_by_the_early_stopping_metric_by_default():
    config = load_config("tiny", [*EVAL, "early_stopping.metric=adherence", "early_stopping.patience=2"])
    assert (config.train.eval_every, config.train.eval_metrics) == (2, ["fd", "adherence"])
    assert config.early_stopping.mode == "max"  # adherence: higher is better, from METRIC_MODES
    assert config.checkpoint.ranked_by(config.early_stopping) == ("adherence", "max")
    chosen = load_config("tiny", [*EVAL, "checkpoint.best_metric=fd"])
    assert chosen.checkpoint.ranked_by(chosen.early_stopping) == ("fd", "min")
    assert load_config("tiny").checkpoint.ranked_by(load_config("tiny").early_stopping) == ("val_loss", "min")


@pytest.mark.parametrize("metric", sorted(METRIC_MODES))
def test_early_stopping_mode_defaults_to_each_metrics_direction(metric):
    sets = ["train.validate_every=2"] if metric == "val_loss" else [
        "train.eval_every=2", f"train.eval_metrics=[{metric}]"]
    config = load_config("tiny", [*sets, f"early_stopping.metric={metric}"])
    assert config.early_stopping.mode == METRIC_MODES[metric]


def test_a_mode_that_contradicts_the_metric_names_both():
    message = error([*EVAL, "early_stopping.metric=fd", "early_stopping.mode=max"])
    assert "early_stopping.mode = 'max'" in message and "'fd'" in message and "'min'" in message
    assert load_config("tiny", [*EVAL, "early_stopping.metric=fd", "early_stopping.mode=min"]).early_stopping.mode \
        == "min"  # the same direction, given explicitly, is fine


@pytest.mark.parametrize("overrides, words", [
    (["train.eval_every=2", "train.eval_metrics=[fid]"], ["unknown metric 'fid'", "fd, kid, adherence"]),
    (["early_stopping.metric=accuracy"], ["unknown metric 'accuracy'", "val_loss, fd"]),
    (["checkpoint.best_metric=FD"], ["unknown metric 'FD'"]),
    (["train.eval_every=2", "train.eval_metrics=[val_loss]"], ["train.validate_every"]),
    (["train.eval_metrics=[fd]"], ["set train.eval_every"]),
    (["train.eval_every=2"], ["train.eval_metrics, which is empty"]),
    (["train.eval_every=2", "train.eval_metrics=[fd,fd]"], ["twice"]),
])
def test_bad_eval_settings_say_what_to_set(overrides, words):
    message = error(overrides)
    assert all(word in message for word in words), message


@pytest.mark.parametrize("key", ["early_stopping.metric", "checkpoint.best_metric"])
def test_a_ranked_metric_must_be_computed_by_this_config(key):
    message = error([f"{key}=kid"])
    assert f"{key} = kid is not computed" in message and "train.eval_metrics" in message
    assert "kid is not computed" in error([*EVAL, f"{key}=kid"])  # evaluated, but not kid
    assert "train.validate_every" in error([f"{key}=val_loss", "early_stopping.patience=2"])
    load_config("tiny", [*EVAL, f"{key}=fd"])  # computed: fine


def test_early_stopping_patience_on_val_loss_still_needs_validate_every():
    assert "train.validate_every" in error(["early_stopping.patience=2"])
    load_config("tiny", ["early_stopping.patience=2", "train.validate_every=2"])


def test_a_pixel_space_model_and_a_run_without_held_out_images_cannot_evaluate(tmp_path):
    assert "pixel-space" in error([*EVAL, "vae.enabled=false"])
    message = error([f"data.source={tmp_path}", "data.held_out_fraction=0", *EVAL])
    assert "['fd']" in message and "held-out" in message


def test_eval_samples_default_is_the_eval_commands_so_its_results_are_reused():
    from stablediff.evaluation.registry import EvalSettings

    assert load_config("tiny").train.eval_samples == EvalSettings().num_samples  # `stablediff eval`'s default
