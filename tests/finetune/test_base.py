"""The base of a fine-tune: what `finetune.base` names, loading each kind, refusing what cannot train, RUN_DIR/base."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablediff.errors import CheckpointError, ConfigError, MissingPathError, ModelFileError, UserError
from stablediff.finetune.base import load_base, load_saved_base, parse_base, save_base
from stablediff.models.pipeline_assembly import assemble_pipeline
from stablediff.models.single_file_pipeline import save_single_file
from tests.models.tiny_sd import (SD_DDPM, assert_same_tensors, state_dicts, tiny_clip_pipeline, tiny_pipeline,
                                  tiny_unet, tiny_vae)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A diffusers StableDiffusionPipeline folder (MiniLM text encoder)."""
    path = tmp_path_factory.mktemp("base-folder") / "model"
    tiny_pipeline(seed=3).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An SD 1.x-layout single file with a tiny CLIP text encoder, the pipeline it came from, its tokenizer folder."""
    root = tmp_path_factory.mktemp("base-clip")
    pipe = tiny_clip_pipeline(root / "tokenizer", seed=4)
    return save_single_file(pipe, root / "sd1.safetensors"), pipe, root / "tokenizer"


def fake_run(path: Path) -> Path:
    (path / "checkpoints" / "manifests").mkdir(parents=True)
    return path


def assert_one_paragraph(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message.strip(), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("suffix, selector", [("", None), ("@best", "best"), ("@latest", "latest"), ("@3", "3")])
def test_parse_base_run_directory_with_its_selector(tmp_path, suffix, selector):
    run = fake_run(tmp_path / "run")
    parsed = parse_base(f"{run}{suffix}")
    assert (parsed.kind, parsed.path, parsed.selector) == ("run", run, selector)


def test_parse_base_diffusers_folder_and_single_file(folder, clip):
    assert (parse_base(str(folder)).kind, parse_base(str(folder)).path) == ("diffusers", folder)
    assert (parse_base(str(clip[0])).kind, parse_base(str(clip[0])).selector) == ("single-file", None)


def test_parse_base_a_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(MissingPathError) as error:
        parse_base(str(tmp_path / "nowhere@best"))
    assert_one_paragraph(error, "does not exist", "RUN_DIR@best", "diffusers")


def test_parse_base_a_selector_on_a_folder_that_is_not_a_run(folder):
    with pytest.raises(ConfigError) as error:
        parse_base(f"{folder}@best")
    assert_one_paragraph(error, "@best", "not one")


@pytest.mark.parametrize("make", ["folder", "file"])
def test_parse_base_something_that_is_not_a_model(tmp_path, make):
    path = tmp_path / ("photos" if make == "folder" else "notes.txt")
    path.mkdir() if make == "folder" else path.write_text("hello")
    with pytest.raises(ModelFileError) as error:
        parse_base(str(path))
    assert_one_paragraph(error, "model_index.json", ".safetensors")


def test_load_base_from_a_diffusers_folder_keeps_its_weights(folder):
    base = load_base(str(folder))
    original = tiny_pipeline(seed=3)
    for name, tensors in state_dicts(original).items():
        assert_same_tensors(tensors, state_dicts(base.pipe)[name])
    assert base.record["kind"] == "diffusers" and base.record["path"] == str(folder.resolve())
    assert base.prediction_type == "epsilon"
    assert base.training_scheduler().config.beta_schedule == "scaled_linear"


def test_load_base_from_an_sd1_single_file_with_a_clip_text_encoder(clip):
    path, pipe, _ = clip
    base = load_base(str(path))
    assert type(base.pipe.text_encoder).__name__ == "CLIPTextModel"
    for name, tensors in state_dicts(pipe).items():
        assert_same_tensors(tensors, state_dicts(base.pipe)[name])
    assert base.record["kind"] == "single-file" and len(base.record["sha256"]) == 64
    assert base.pipe.tokenizer("a digit").input_ids == pipe.tokenizer("a digit").input_ids


def test_load_base_a_file_without_tokenizer_takes_finetune_tokenizer(clip, tmp_path):
    path, pipe, tokenizer = clip
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(path), plain)  # as another tool writes it: no metadata, so no tokenizer inside
    base = load_base(str(plain), tokenizer=str(tokenizer))
    assert_same_tensors(state_dicts(pipe)["text_encoder"], state_dicts(base.pipe)["text_encoder"])
    assert_same_tensors(state_dicts(pipe)["unet"], state_dicts(base.pipe)["unet"])
    assert base.pipe.tokenizer("a digit").input_ids == pipe.tokenizer("a digit").input_ids


def test_load_base_from_a_stablediff_run_and_its_steps(tiny_run):
    base = load_base(str(tiny_run))
    latest = load_base(f"{tiny_run}@latest")
    assert base.record["kind"] == "run" and base.record["step"] == latest.record["step"] == 4
    assert_same_tensors(base.pipe.unet.state_dict(), latest.pipe.unet.state_dict())
    by_step = load_base(f"{tiny_run}@{latest.record['step']}")
    assert_same_tensors(by_step.pipe.unet.state_dict(), latest.pipe.unet.state_dict())
    assert base.pipe.unet.config.cross_attention_dim == base.pipe.text_encoder.config.hidden_size


@pytest.mark.parametrize("selector, words", [("best", ("records val_loss",)), ("3", ("step 3", "available steps"))])
def test_load_base_a_checkpoint_the_run_does_not_have(tiny_run, selector, words):
    with pytest.raises(CheckpointError) as error:
        load_base(f"{tiny_run}@{selector}")
    assert_one_paragraph(error, f"finetune.base {tiny_run}@{selector}: ", *words, "RUN_DIR@latest")


def test_load_base_refuses_another_pipeline_class(tmp_path):
    path = tmp_path / "xl"
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelFileError) as error:
        load_base(str(path))
    assert_one_paragraph(error, "StableDiffusionXLPipeline", "not supported")


def test_load_base_refuses_an_inpainting_unet(tmp_path):
    from stablediff.models.text_encoder import load_text_encoder

    encoder = load_text_encoder("minilm", max_length=8)
    pipe = assemble_pipeline(tiny_vae(), encoder.model, encoder.tokenizer, tiny_unet(384, in_channels=9), SD_DDPM)
    pipe.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    with pytest.raises(ModelFileError) as error:
        load_base(str(tmp_path / "inpaint"))
    assert_one_paragraph(error, "inpainting", "9 input channels")


def test_load_base_refuses_a_truncated_safetensors_file(clip, tmp_path):
    data = clip[0].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as error:
        load_base(str(broken))
    assert_one_paragraph(error, str(broken), "truncated", "again")


def test_load_base_refuses_a_pickle_checkpoint_unless_trusted(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError) as error:
        load_base(str(path))
    assert_one_paragraph(error, "pickle", "--trust-pickle")


def test_save_base_then_load_saved_base_is_bitwise_the_same(folder, tmp_path):
    run_dir = tmp_path / "ft"
    assert load_saved_base(run_dir) is None  # before the first start
    base = load_base(str(folder))
    save_base(base, run_dir)
    again = load_saved_base(run_dir)
    for name, tensors in state_dicts(base.pipe).items():
        assert_same_tensors(tensors, state_dicts(again.pipe)[name])
    assert again.record == base.record
    assert type(again.pipe.scheduler) is type(base.pipe.scheduler)
