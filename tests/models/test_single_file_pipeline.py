"""Single-file load/save: exact round trips, inference without metadata, diffusers interoperability."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from stablediff.io.pickle_guard import PickleRefusedError
from stablediff.models.single_file_pipeline import load_single_file_pipeline, save_single_file
from tests.models.tiny_sd import (assert_same_tensors, image, state_dicts, tiny_clip_pipeline, tiny_pipeline,
                                  tiny_unet, tiny_vae)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    pipe.save_pretrained(folder / "diffusers", safe_serialization=True)
    return save_single_file(pipe, folder / "model.safetensors", {"note": "test"}), folder / "diffusers"


def without_metadata(src, dst):
    """The same tensors as another tool would write them: no stablediff metadata."""
    save_file(load_file(src), dst)
    return dst


def public_config(config) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def assert_same_pipelines(a, b):
    for name, tensors in state_dicts(a).items():
        assert_same_tensors(tensors, state_dicts(b)[name])


def test_round_trip_with_our_metadata_is_exact(pipe, exported):
    loaded = load_single_file_pipeline(exported[0])
    assert_same_pipelines(pipe, loaded)
    assert public_config(loaded.unet.config) == public_config(pipe.unet.config)
    assert public_config(loaded.vae.config) == public_config(pipe.vae.config)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert np.array_equal(image(loaded), image(pipe))


def test_file_without_metadata_loads_by_inferring_the_architecture(pipe, exported, tmp_path):
    loaded = load_single_file_pipeline(without_metadata(exported[0], tmp_path / "plain.safetensors"))
    assert_same_pipelines(pipe, loaded)
    assert list(loaded.unet.config.block_out_channels) == [16, 32]
    assert list(loaded.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert loaded.unet.config.cross_attention_dim == 384
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"  # SD's schedule when the file does not say
    assert loaded.scheduler.config.beta_start == 0.00085 and loaded.scheduler.config.beta_end == 0.012


def test_diffusers_reads_our_unet_and_vae_with_our_folder_as_config(pipe, exported):
    path, folder = map(str, exported)
    unet = UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(path, config=folder, subfolder="vae", local_files_only=True)
    assert_same_tensors(unet.state_dict(), pipe.unet.state_dict())
    assert_same_tensors(vae.state_dict(), pipe.vae.state_dict())


def test_diffusers_pipeline_from_our_file_gives_our_image(pipe, exported):
    # diffusers' single-file loader only knows CLIP text encoders, so ours (BERT) is handed in.
    path, folder = map(str, exported)
    theirs = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                      text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                                      scheduler=pipe.scheduler, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert np.array_equal(image(theirs), image(pipe))


def test_diffusers_folder_to_single_file_and_back_is_identical(exported, tmp_path):
    from stablediff.models.pipeline_assembly import load_pipeline_folder

    path, folder = exported
    once = save_single_file(load_pipeline_folder(folder), tmp_path / "once.safetensors")
    load_single_file_pipeline(once).save_pretrained(tmp_path / "back", safe_serialization=True)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        back = load_file(tmp_path / "back" / f"{part}.safetensors")
        assert_same_tensors(load_file(folder / f"{part}.safetensors"), back)


def test_sd1_clip_file_loads_with_a_local_tokenizer(tmp_path):
    clip_pipe = tiny_clip_pipeline(tmp_path / "tokenizer")
    ours = save_single_file(clip_pipe, tmp_path / "clip.safetensors")
    keys = load_file(ours)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    plain = without_metadata(ours, tmp_path / "sd1.safetensors")
    loaded = load_single_file_pipeline(plain, tokenizer=tmp_path / "tokenizer")
    assert_same_pipelines(clip_pipe, loaded)
    assert loaded.text_encoder.config.hidden_act == "quick_gelu"
    ids = clip_pipe.tokenizer(["a digit seven"], padding="max_length", max_length=8, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids)[0], clip_pipe.text_encoder(ids)[0])


def test_nine_input_channels_give_the_inpainting_pipeline(pipe, tmp_path):
    inpaint = dict(pipe.components, unet=tiny_unet(in_channels=9))
    path = save_single_file(inpaint, tmp_path / "inpaint.safetensors")
    loaded = load_single_file_pipeline(without_metadata(path, tmp_path / "plain.safetensors"))
    assert isinstance(loaded, StableDiffusionInpaintPipeline) and loaded.unet.config.in_channels == 9


def test_fp16_file_keeps_its_dtype_unless_asked(pipe, exported, tmp_path):
    half = {k: v.half() for k, v in load_file(exported[0]).items()}
    save_file(half, tmp_path / "half.safetensors")
    assert load_single_file_pipeline(tmp_path / "half.safetensors").unet.dtype == torch.float16
    assert load_single_file_pipeline(tmp_path / "half.safetensors", dtype=torch.float32).unet.dtype == torch.float32


def test_truncated_file_says_so(exported, tmp_path):
    data = exported[0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_single_file_pipeline(tmp_path / "cut.safetensors")


def test_pickle_is_refused_unless_trusted(exported, tmp_path):
    torch.save({"state_dict": load_file(exported[0]), "global_step": 7}, tmp_path / "model.ckpt")
    with pytest.raises(PickleRefusedError, match="--trust-pickle"):
        load_single_file_pipeline(tmp_path / "model.ckpt")
    loaded = load_single_file_pipeline(tmp_path / "model.ckpt", trust_pickle=True)
    assert loaded.unet.config.cross_attention_dim == 384


def test_missing_vae_is_named(exported, tmp_path):
    state = {k: v for k, v in load_file(exported[0]).items() if not k.startswith("first_stage_model.")}
    save_file(state, tmp_path / "no_vae.safetensors")
    with pytest.raises(ValueError, match="no VAE weights"):
        load_single_file_pipeline(tmp_path / "no_vae.safetensors")


def test_wrong_shape_names_the_tensor(exported, tmp_path):
    state = load_file(exported[0])
    state["model.diffusion_model.out.2.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"out\.2\.bias|conv_out\.bias"):
        load_single_file_pipeline(tmp_path / "bad.safetensors")


def test_save_needs_every_component(pipe, tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        save_single_file({"unet": pipe.unet, "vae": tiny_vae(), "text_encoder": pipe.text_encoder,
                          "scheduler": pipe.scheduler}, tmp_path / "x.safetensors")
