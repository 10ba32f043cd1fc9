"""The rule table of config changes a resume may take, and the key-by-key diff."""

from stablediff.config import RunConfig
from stablediff.config.changes import RULES, SAFE, UNCLASSIFIED, diff_configs, flatten, rule_for


def dump(**sections) -> dict:
    return RunConfig.model_validate(sections).model_dump(mode="json")


def test_keys_that_alter_the_run_are_refused_and_the_kind_is_named():
    assert rule_for("data.source") == "data order"
    assert rule_for("seed") == "data order"
    assert rule_for("train.batch_size") == "data order"
    assert rule_for("unet.block_out_channels") == "model shape"
    assert rule_for("vae.latent_channels") == "model shape"
    assert rule_for("train.prediction_type") == "objective"
    assert rule_for("noise.beta_schedule") == "noise schedule"
    assert rule_for("text_encoder.name") == "text encoder"
    assert rule_for("train.learning_rate") == "optimizer"
    assert rule_for("finetune.lora.rank") == "model shape"
    assert rule_for("finetune.lora.rank_dropout") == rule_for("finetune.lora.module_dropout") == "objective"


def test_keys_that_only_say_how_long_how_often_or_where_change_freely():
    for key in ("train.max_steps", "train.log_every", "train.threads", "train.tensorboard", "run_dir",
                "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.replicas", "sample.prompts",
                "data.num_workers", "data.cache_dir"):
        assert rule_for(key) == SAFE, key


def test_the_most_specific_rule_wins_and_a_key_no_rule_names_is_refused():
    assert rule_for("train.max_steps") == SAFE and rule_for("train.noise_offset") == "objective"
    assert rule_for("some_new_section.key") == UNCLASSIFIED


def test_every_key_of_todays_config_has_a_rule():
    assert [key for key in flatten(RunConfig().model_dump(mode="json")) if rule_for(key) == UNCLASSIFIED] == []
    assert all(rule for rule in RULES.values())


def test_the_diff_lists_each_changed_leaf_with_old_and_new_value():
    old = dump(unet={"block_out_channels": [32, 64], "norm_num_groups": 8, "down_block_types": ["A", "B"],
                     "up_block_types": ["B", "A"]})
    new = dump(unet={"block_out_channels": [32, 128], "norm_num_groups": 8, "down_block_types": ["A", "B"],
                     "up_block_types": ["B", "A"]}, train={"max_steps": 9})
    changes = diff_configs(old, new)
    assert [c.describe() for c in changes] == ["unet.block_out_channels: [32, 64] -> [32, 128]",
                                              "train.max_steps: 1000 -> 9"]
    assert [c.safe for c in changes] == [False, True]
    assert changes[0].as_record() == {"key": "unet.block_out_channels", "old": [32, 64], "new": [32, 128],
                                      "kind": "model shape"}


def test_strings_are_shown_bare_and_an_unchanged_config_has_no_diff():
    old, new = dump(), dump(data={"source": "/photos"})
    assert [c.describe() for c in diff_configs(old, new)] == ["data.source: builtin:digits -> /photos"]
    assert diff_configs(new, new) == []


def test_a_key_an_older_checkpoint_lacks_counts_as_its_default():
    new = dump()
    old = {section: dict(values) if isinstance(values, dict) else values for section, values in new.items()}
    del old["data"]["num_workers"], old["train"]["noise_offset"]
    assert diff_configs(old, new, defaults=RunConfig().model_dump(mode="json")) == []
    (change,) = diff_configs(old, dump(train={"noise_offset": 0.1}), defaults=RunConfig().model_dump(mode="json"))
    assert change.describe() == "train.noise_offset: 0.0 -> 0.1"
    (missing,) = diff_configs({}, {"train": {"max_steps": 3}})
    assert missing.describe() == "train.max_steps: (not set) -> 3" and missing.as_record()["old"] is None
