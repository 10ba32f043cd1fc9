"""Squaring a fine-tune's config with its base: unset keys take the base's values, contradictions are errors."""

import pytest

from stablediff.config import RunConfig
from stablediff.errors import ConfigError
from stablediff.finetune.base import Base, save_base
from stablediff.finetune.plan import plan_finetune, resolve_against_base
from stablediff.models.pipeline_assembly import assemble_pipeline
from stablediff.models.text_encoder import load_text_encoder
from tests.models.tiny_sd import SD_DDPM, tiny_unet, tiny_vae

BASE_NOISE = {**SD_DDPM, "prediction_type": "v_prediction", "num_train_timesteps": 700}
# UNetConfig checks its shape on its own (one block type per width, widths divisible by the groups), so a
# unet key in these configs comes with the rest of the base's shape, as in the tiny recipe.
TINY_UNET = {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8}


@pytest.fixture(scope="module")
def base() -> Base:
    """A v-prediction base on SD's scaled-linear schedule (not our defaults), 16 px, 8-token captions."""
    encoder = load_text_encoder("minilm", max_length=8)
    pipe = assemble_pipeline(tiny_vae(), encoder.model, encoder.tokenizer, tiny_unet(384), BASE_NOISE)
    pipe.tokenizer.model_max_length = 8
    return Base(pipe, {"kind": "diffusers", "path": "/models/tiny"})


def config(**sections) -> RunConfig:
    return RunConfig.model_validate({"finetune": {"base": "/models/tiny"}, **sections})


def test_unset_keys_take_the_base_values(base):
    resolved = resolve_against_base(config(), base)
    assert resolved.train.prediction_type == "v_prediction"
    noise = resolved.noise
    assert (noise.beta_schedule, noise.beta_start, noise.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert noise.num_train_timesteps == 700
    unet = resolved.unet
    assert unet.block_out_channels == [16, 32] and unet.layers_per_block == 1
    assert unet.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.up_block_types == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert (unet.attention_head_dim, unet.norm_num_groups) == (4, 8)
    vae = resolved.vae
    assert (vae.block_out_channels, vae.latent_channels, vae.norm_num_groups) == ([8, 16], 4, 8)
    assert resolved.text_encoder.max_length == 8
    assert resolved.data.resolution == 16  # latents 8 x the VAE's downscale 2


def test_the_users_own_keys_survive(base):
    resolved = resolve_against_base(config(data={"resolution": 32}, train={"learning_rate": 3e-4}), base)
    assert resolved.data.resolution == 32 and resolved.train.learning_rate == 3e-4


@pytest.mark.parametrize("section, key, value, base_value", [
    ("train", "prediction_type", "epsilon", "v_prediction"),
    ("unet", "block_out_channels", [32, 64], [16, 32]),
    ("unet", "layers_per_block", 2, 1),
    ("noise", "beta_schedule", "linear", "scaled_linear"),
    ("text_encoder", "max_length", 16, 8),
])
def test_an_explicit_contradiction_names_both_values(base, section, key, value, base_value):
    with pytest.raises(ConfigError) as error:
        resolve_against_base(config(**{section: {**(TINY_UNET if section == "unet" else {}), key: value}}), base)
    message = str(error.value)
    assert f"{section}.{key} = {value!r}" in message and repr(base_value) in message, message
    assert "/models/tiny" in message and "remove" in message


def test_an_explicit_value_equal_to_the_base_is_fine(base):
    given = config(train={"prediction_type": "v_prediction"}, unet=TINY_UNET,
                   noise={"beta_schedule": "scaled_linear", "num_train_timesteps": 700})
    assert resolve_against_base(given, base).model_dump() == resolve_against_base(config(), base).model_dump()


@pytest.mark.parametrize("sections, word", [
    ({"unet": {"preset": "tiny"}}, "unet.preset"),
    ({"text_encoder": {"name": "minilm"}}, "text_encoder.name"),
    ({"vae": {"enabled": False}}, "vae.enabled"),
])
def test_keys_that_choose_another_model_are_refused(base, sections, word):
    with pytest.raises(ConfigError, match=word.replace(".", r"\.")):
        resolve_against_base(config(**sections), base)


def test_plan_needs_a_finetune_section(tmp_path):
    with pytest.raises(ConfigError, match="finetune.base"):
        plan_finetune(RunConfig(), tmp_path / "run")


def test_plan_uses_the_runs_saved_base_and_checks_targets_before_writing(base, tmp_path):
    run_dir = tmp_path / "run"
    save_base(base, run_dir)
    before = sorted(p.name for p in run_dir.rglob("*"))
    plan = plan_finetune(config(), run_dir)  # /models/tiny does not exist: the saved copy is what loads
    assert plan.saved and plan.base.record["path"] == "/models/tiny"
    assert plan.config.train.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="to_qq"):
        plan_finetune(config(finetune={"base": "/models/tiny", "lora": {"targets": ["to_qq"]}}), run_dir)
    assert sorted(p.name for p in run_dir.rglob("*")) == before
