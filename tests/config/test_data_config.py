"""The held-out settings: data.held_out_fraction's range, and validate_every refused when nothing is held out."""

import pytest

from stablediff.config import ConfigError, load_config


def test_held_out_fraction_defaults_to_one_in_twenty_and_takes_0_to_a_half():
    assert load_config("tiny").data.held_out_fraction == 0.05
    assert load_config("tiny", ["data.held_out_fraction=0"]).data.held_out_fraction == 0
    assert load_config("tiny", ["data.held_out_fraction=0.5"]).data.held_out_fraction == 0.5
    with pytest.raises(ConfigError, match=r"data.held_out_fraction = 0.6"):
        load_config("tiny", ["data.held_out_fraction=0.6"])


def test_validate_every_with_nothing_held_out_names_both_settings(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [f"data.source={tmp_path}", "data.held_out_fraction=0", "train.validate_every=5"])
    message = str(raised.value)
    assert "train.validate_every = 5" in message and "data.held_out_fraction is 0" in message
    assert "data.validation_source" in message and "{" not in message  # the keys, not the whole config dumped


@pytest.mark.parametrize("overrides", [
    ["data.source=/data/train", "data.held_out_fraction=0", "data.validation_source=/data/val"],
    ["data.source=builtin:digits?digits=9&count=20", "data.held_out_fraction=0"],  # the digits' fixed split
    ["data.source=/data/train", "data.held_out_fraction=0.05"],
])
def test_validate_every_is_fine_when_something_is_held_out(overrides):
    assert load_config("tiny", [*overrides, "train.validate_every=5"]).train.validate_every == 5


def test_nothing_held_out_without_validate_every_is_fine():
    assert load_config("tiny", ["data.source=/data/train", "data.held_out_fraction=0"]).train.validate_every is None
