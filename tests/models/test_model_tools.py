"""Merge, prune, hash and info on real (tiny) SD model files."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stablediff.models.model_tools import (file_hashes, merge_files, model_info, prune_state, read_model,
                                          write_model)
from stablediff.models.single_file_pipeline import load_single_file_pipeline, save_single_file
from tests.models.tiny_sd import assert_same_tensors, image, tiny_clip_pipeline, tiny_unet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny SD 1.x-shaped files (CLIP text encoder) that differ only in their weights."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in range(3):
        pipe = tiny_clip_pipeline(root / f"tokenizer{seed}", seed=seed)
        paths.append(save_single_file(pipe, root / f"m{seed}.safetensors"))
    return paths


def test_weighted_merge_at_alpha_0_and_1_reproduces_the_inputs(models):
    a, b = load_file(models[0]), load_file(models[1])
    assert_same_tensors(merge_files(models[:2], "weighted", 0.0)[0], a)
    assert_same_tensors(merge_files(models[:2], "weighted", 1.0)[0], b)


def test_weighted_merge_halfway_is_the_average(models):
    a, b = load_file(models[0]), load_file(models[1])
    merged = merge_files(models[:2], "weighted", 0.5)[0]
    key = "model.diffusion_model.out.2.weight"
    assert torch.allclose(merged[key], (a[key] + b[key]) / 2)


def test_add_difference_with_b_equal_c_is_a(models):
    merged, _ = merge_files([models[0], models[1], models[1]], "add-difference", 0.7)
    assert_same_tensors(merged, load_file(models[0]))


def test_merge_records_its_recipe_and_loads_as_a_pipeline(models, tmp_path):
    state, metadata = merge_files(models[:2], "weighted", 0.25)
    out = write_model(state, metadata, tmp_path / "merged.safetensors", "merge")
    recipe = json.loads(safe_open(out, "pt").metadata()["stablediff.merge"])
    assert recipe["method"] == "weighted" and recipe["alpha"] == 0.25
    assert [i["sha256"] for i in recipe["inputs"]] == [file_hashes(p)["sha256"] for p in models[:2]]
    assert load_single_file_pipeline(out).unet.config.cross_attention_dim == 64


def test_merge_accepts_a_diffusers_folder_with_a_single_file(models, tmp_path):
    load_single_file_pipeline(models[1]).save_pretrained(tmp_path / "folder", safe_serialization=True)
    merged, _ = merge_files([models[0], tmp_path / "folder"], "weighted", 1.0)
    assert_same_tensors(merged, load_file(models[1]))


def test_merge_of_different_architectures_names_the_mismatch(models, tmp_path):
    pipe = load_single_file_pipeline(models[0])
    other = save_single_file(dict(pipe.components, unet=tiny_unet(64, layers=2)), tmp_path / "deeper.safetensors")
    with pytest.raises(ValueError, match=r"cannot merge .*tensor 'model\.diffusion_model\.[\w.]+'"):
        merge_files([models[0], other], "weighted", 0.5)


def test_merge_takes_two_or_three_models(models):
    with pytest.raises(ValueError, match="takes 3 models"):
        merge_files(models[:2], "add-difference", 0.5)


def test_fp16_prune_halves_the_size_and_keeps_the_image(models, tmp_path):
    state, metadata = read_model(models[0])
    pruned, _ = prune_state(state, torch.float16, False, "m0")
    out = write_model(pruned, metadata, tmp_path / "half.safetensors", "m0")
    assert out.stat().st_size < 0.6 * models[0].stat().st_size
    full, half = load_single_file_pipeline(models[0]), load_single_file_pipeline(out, dtype=torch.float32)
    assert half.unet.dtype == torch.float32
    assert np.abs(image(full) - image(half)).max() <= 3  # of 255


def test_prune_drops_ema_and_training_junk(models):
    state = load_file(models[0])
    junk = {"model_ema.decay": torch.tensor(0.999), "optimizer.state.0": torch.zeros(3), "betas": torch.zeros(1000)}
    pruned, dropped = prune_state({**state, **junk}, None, False, "m0")
    assert_same_tensors(pruned, {**state, "betas": junk["betas"]})
    assert dropped == {"model_ema": 1, "optimizer": 1}


def test_ema_only_makes_the_ema_weights_the_unet(models):
    from stablediff.models.model_tools import ema_key

    state, ema = load_file(models[0]), load_file(models[1])
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    with_ema = {**state, **{ema_key(k): ema[k] for k in unet_keys}}
    pruned, _ = prune_state(with_ema, None, True, "m0")
    assert_same_tensors(pruned, {**state, **{k: ema[k] for k in unet_keys}})
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_ema_only_without_ema_weights_says_so(models):
    with pytest.raises(ValueError, match="no EMA weights"):
        prune_state(load_file(models[0]), None, True, "m0")


def test_hash_is_the_sha256_of_the_whole_file_and_its_first_10_digits(models):
    hashes = file_hashes(models[0], block=4096)
    expected = hashlib.sha256(models[0].read_bytes()).hexdigest()
    assert hashes["sha256"] == expected and hashes["autov2"] == expected[:10]


def test_info_of_our_export_reports_architecture_parameters_and_metadata(models):
    info = model_info(models[0])
    arch = info["architecture"]
    assert arch["config_source"] == "metadata" and arch["text_encoder"] == "clip"
    assert arch["unet_channels"] == [16, 32] and arch["attention_blocks"] == [False, True]
    pipe = load_single_file_pipeline(models[0])
    for part in ("unet", "vae", "text_encoder"):
        assert info["parameters"][part] == sum(p.numel() for p in getattr(pipe, part).parameters())
    assert info["dtypes"] == {"F32": info["tensors"]}
    assert info["metadata"]["stablediff.tokenizer"].endswith("tokenizer files")


def test_info_of_a_foreign_file_infers_and_flags_non_sd_files(models, tmp_path):
    save_file(load_file(models[0]), tmp_path / "plain.safetensors")
    info = model_info(tmp_path / "plain.safetensors")
    assert info["architecture"]["config_source"] == "inferred from tensor shapes"
    save_file({"foo.bar": torch.zeros(2)}, tmp_path / "random.safetensors")
    assert model_info(tmp_path / "random.safetensors")["architecture"]["name"].startswith("not a Stable Diffusion")


def test_a_pickle_named_safetensors_is_described_as_a_pickle_by_info_as_by_reading(tmp_path):
    from stablediff.io.pickle_guard import PickleRefusedError

    path = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, path)
    for describe in (model_info, read_model):
        with pytest.raises(PickleRefusedError, match=r"pickle-based checkpoint \(zip format\)"):
            describe(path)
    assert model_info(path, trust_pickle=True)["format"] == "pickle"
    assert read_model(path, trust_pickle=True)[0]["model.diffusion_model.out.2.bias"].shape == (4,)
