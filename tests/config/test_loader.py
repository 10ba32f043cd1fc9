"""Config loading: YAML recipes, --set overrides, and errors that name the key."""

import pytest

from stablediff.config import ConfigError, load_config
from stablediff.config.loader import parse_override


def test_bundled_recipes_validate():
    assert load_config("tiny").data.source == "builtin:digits"
    assert load_config("digits").data.resolution == 32


def test_override_sets_a_nested_value_with_its_yaml_type():
    config = load_config("tiny", ["train.max_steps=7", "train.learning_rate=0.5", "sample.prompts=[a, b]"])
    assert config.train.max_steps == 7
    assert config.train.learning_rate == 0.5
    assert config.sample.prompts == ["a", "b"]


def test_unknown_override_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*max_steps"):
        load_config("tiny", ["train.max_step=3"])


def test_bad_value_names_the_key_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.prediction_type=noise"])
    message = str(info.value)
    assert "train.prediction_type" in message and "'noise'" in message and "v_prediction" in message


def test_out_of_range_value_is_refused():
    with pytest.raises(ConfigError, match=r"train.batch_size = 0"):
        load_config("tiny", ["train.batch_size=0"])


def test_unknown_key_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 3\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.learnin_rate: unknown key; allowed: .*learning_rate"):
        load_config(path)


def test_keep_last_below_two_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        load_config("tiny", ["checkpoint.keep_last=1"])


def test_inconsistent_unet_blocks_are_refused():
    with pytest.raises(ConfigError, match="one entry per"):
        load_config("tiny", ["unet.block_out_channels=[16, 32, 32]"])


def test_override_without_equals_sign_is_a_clear_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.max_steps")


def test_invalid_yaml_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config.yaml")


def test_an_unknown_recipe_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match=r"bundled recipes: digits, digits-0to8, digits-lora-nine, sd15, sd15-dreambooth, sd15-lora, tiny"):
        load_config("tinny")


def test_a_recipe_name_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").train.max_steps == 4


def test_a_file_of_the_same_name_wins_over_the_bundled_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train:\n  max_steps: 9\n")
    assert load_config("tiny").train.max_steps == 9
