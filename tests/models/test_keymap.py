"""The diffusers <-> original SD key mapping, checked against diffusers' own single-file converter."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)

from stablediff.models import architecture
from stablediff.models.keymap import Layout, UNetLayout, VAELayout, diffusers_to_original, original_to_diffusers
from tests.models.tiny_sd import _randomise, tiny_unet, tiny_vae


def sd15_shaped_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """SD 1.5's block structure (4 levels, 2 layers, attention in the first three down levels), tiny widths."""
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 64, 64),
        layers_per_block=2, cross_attention_dim=48, attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return _randomise(unet, 3)


def sd2_shaped_unet() -> UNet2DConditionModel:
    """SD 2.x's differences: linear proj_in/proj_out and 64-wide heads."""
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=1024,
        attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return _randomise(unet, 4)


def sd_vae() -> AutoencoderKL:
    """SD's VAE structure (4 levels, 2 layers per block), tiny widths."""
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return _randomise(vae, 5)


def layout_of(unet, vae, text: str = "hf") -> Layout:
    return Layout(UNetLayout.from_config(unet.config), VAELayout.from_config(vae.config), text)


def assert_equal_dicts(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("make_unet", [tiny_unet, sd15_shaped_unet, sd2_shaped_unet])
def test_diffusers_converter_reads_our_unet_layout(make_unet):
    unet, vae = make_unet(), tiny_vae()
    original = diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae))
    converted = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert_equal_dicts(converted, unet.state_dict())


@pytest.mark.parametrize("make_vae", [tiny_vae, sd_vae])
def test_diffusers_converter_reads_our_vae_layout(make_vae):
    unet, vae = tiny_unet(), make_vae()
    original = diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae))
    converted = convert_ldm_vae_checkpoint(original, dict(vae.config))
    assert_equal_dicts(converted, vae.state_dict())


def test_vae_mid_attention_is_a_1x1_conv_in_the_original_layout():
    unet, vae = tiny_unet(), tiny_vae()
    original = diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae))
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert original["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert original["first_stage_model.encoder.mid.attn_1.q.bias"].shape == (16,)


def test_sd_layout_names_blocks_by_their_position():
    unet, vae = tiny_unet(), tiny_vae()
    keys = set(diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae)))
    p = "model.diffusion_model."
    assert {p + "input_blocks.0.0.weight", p + "input_blocks.1.0.in_layers.2.weight", p + "input_blocks.2.0.op.weight",
            p + "input_blocks.3.1.proj_in.weight", p + "middle_block.1.proj_out.weight",
            p + "output_blocks.1.2.conv.weight", p + "time_embed.0.weight", p + "out.2.weight",
            "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.encoder.norm_out.weight",
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"} <= keys


@pytest.mark.parametrize("make_unet", [tiny_unet, sd15_shaped_unet, sd2_shaped_unet])
def test_round_trip_is_tensor_for_tensor_identical(make_unet):
    unet, vae = make_unet(), sd_vae()
    text = {"embeddings.word_embeddings.weight": torch.randn(5, 3)}
    lay = layout_of(unet, vae)
    parts = original_to_diffusers(diffusers_to_original(unet.state_dict(), vae.state_dict(), text, lay), lay)
    assert_equal_dicts(parts["unet"], unet.state_dict())
    assert_equal_dicts(parts["vae"], vae.state_dict())
    assert_equal_dicts(parts["text_encoder"], text)
    assert parts["other"] == {}


def test_clip_text_encoder_uses_the_sd1_transformer_prefix_that_diffusers_reads():
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    unet, vae = tiny_unet(), tiny_vae()
    lay = layout_of(unet, vae, "clip")
    original = diffusers_to_original(unet.state_dict(), vae.state_dict(), clip.state_dict(), lay)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in original
    from_diffusers = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()}
    assert_equal_dicts(from_diffusers, clip.state_dict())
    back = original_to_diffusers(original, lay)["text_encoder"]
    assert_equal_dicts(back, clip.state_dict())


def test_inferred_architecture_matches_the_config():
    unet, vae = sd15_shaped_unet(in_channels=9), sd_vae()
    original = diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae))
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    inferred = architecture.infer_unet_config(shapes)
    for key in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection"):
        want = unet.config[key]
        assert inferred[key] == (list(want) if isinstance(want, tuple) else want), key
    vae_cfg = architecture.infer_vae_config(shapes)
    assert vae_cfg["block_out_channels"] == [8, 16, 16, 16] and vae_cfg["layers_per_block"] == 2
    assert vae_cfg["latent_channels"] == 4
    assert architecture.describe(inferred, "hf").endswith("inpainting")


def test_sd2_layout_is_inferred_with_linear_projection_and_64_wide_heads():
    unet, vae = sd2_shaped_unet(), tiny_vae()
    original = diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae))
    inferred = architecture.infer_unet_config({k: tuple(v.shape) for k, v in original.items()})
    assert inferred["use_linear_projection"] and inferred["attention_head_dim"] == [1, 2]
    assert architecture.describe(inferred, "open_clip") == "SD 2.x"


def test_a_key_outside_the_layout_is_an_error_naming_it():
    unet, vae = tiny_unet(), tiny_vae()
    state = diffusers_to_original(unet.state_dict(), vae.state_dict(), {}, layout_of(unet, vae))
    state["model.diffusion_model.input_blocks.9.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"input_blocks\.9\.0\.in_layers\.0\.weight"):
        original_to_diffusers(state, layout_of(unet, vae))


def test_sd2_open_clip_text_encoder_is_declared_unsupported():
    unet, vae = tiny_unet(), tiny_vae()
    state = {"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="OpenCLIP"):
        original_to_diffusers(state, layout_of(unet, vae, "clip"))
