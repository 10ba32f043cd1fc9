"""LoRA files from a fine-tune checkpoint: the kohya layout loads in diffusers as the same model, with its metadata."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stablediff.finetune.lora_files import load_lora_checkpoint, write_diffusers_lora, write_kohya_lora

from tests.finetune.lora_fixtures import (ATTENTION, CLIP_TARGETS, LOCON, add_trained_lora, build_sd_shaped_folder,
                                          image, lora_checkpoint, lora_config_meta)

RANK, ALPHA = 4, 2.0  # alpha != rank: a file whose alpha were lost or ignored would give another image


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_sd_shaped_folder(tmp_path_factory.mktemp("lora-files") / "base")


def load(base):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)


def trained_pipeline(base, targets, te_targets=None, use_dora=False):
    """The base pipeline with peft adapters on its UNet (and text encoder): what the fine-tune trained."""
    pipe = load(base)
    add_trained_lora(pipe.unet, targets, RANK, ALPHA, seed=1, use_dora=use_dora)
    if te_targets:
        add_trained_lora(pipe.text_encoder, te_targets, 2, 3.0, seed=2)
    return pipe


def checkpoint_of(pipe, run_dir, te=False, use_dora=False, meta=None):
    config = lora_config_meta(RANK, ALPHA, LOCON, use_dora)
    if te:
        config["text_encoder"] = {"r": 2, "lora_alpha": 3.0, "target_modules": CLIP_TARGETS}
    groups = {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if te else {})}
    return load_lora_checkpoint(lora_checkpoint(run_dir, groups, {"lora_config": config, **(meta or {})}))


@pytest.mark.parametrize("targets", [ATTENTION, LOCON], ids=["lora", "locon"])
def test_a_kohya_file_loaded_by_diffusers_gives_the_trained_models_image(base, tmp_path, targets):
    trained = trained_pipeline(base, targets)
    out = write_kohya_lora(checkpoint_of(trained, tmp_path / "run"), tmp_path / "x.safetensors", "the run")
    fresh = load(base)
    before = image(fresh)
    fresh.load_lora_weights(str(out))
    expected = image(trained)
    assert abs(expected - before).max() > 8  # the LoRA changes the image, so the comparison means something
    assert abs(image(fresh) - expected).max() <= 1


def test_a_text_encoder_lora_is_written_as_lora_te_and_loads_as_trained(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION, CLIP_TARGETS)
    out = write_kohya_lora(checkpoint_of(trained, tmp_path / "run", te=True), tmp_path / "te.safetensors", "run")
    keys = load_file(out)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert keys["lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"].item() == 3.0
    fresh = load(base)
    fresh.load_lora_weights(str(out))
    assert abs(image(fresh) - image(trained)).max() <= 1


def test_every_module_gets_down_up_and_a_0d_alpha(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION)
    tensors = load_file(write_kohya_lora(checkpoint_of(trained, tmp_path / "run"), tmp_path / "a.safetensors", "r"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.lora_down.weight"].shape == (RANK, 16)
    assert tensors[f"{name}.lora_up.weight"].shape == (16, RANK)
    bases = {k.split(".")[0] for k in tensors}
    assert len(bases) == sum(".lora_A." in k for k in trained.unet.state_dict()) == 6 * 8  # 6 attention blocks
    for b in bases:
        assert tensors[f"{b}.alpha"].dim() == 0 and tensors[f"{b}.alpha"].item() == ALPHA



FULL_META = {"config": {"seed": 5, "data": {"resolution": 16, "source": "/home/someone/photos/ink/"},
                        "train": {"max_steps": 10, "learning_rate": 1e-4, "prediction_type": "v_prediction",
                                  "batch_size": 2}},
             "finetune_base": {"kind": "diffusers", "path": "/nowhere/base", "name": "tiny-sd",
                               "sha256": "ab" * 32, "model_version": "sd_v1"},
             "training_started_at": 1700000000.5, "sampler": {"num_samples": 12}}
SS_KEYS = ["ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
           "ss_output_name", "ss_training_started_at", "ss_training_finished_at", "ss_steps", "ss_new_sd_model_hash",
           "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_learning_rate", "ss_dataset_dirs", "ss_v2",
           "ss_prediction_type", "ss_seed", "ss_max_train_steps"]
MODELSPEC_KEYS = ["sai_model_spec", "architecture", "implementation", "title", "date", "resolution",
                  "prediction_type"]


def metadata_of(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_the_metadata_has_the_ss_and_modelspec_keys_as_strings(base, tmp_path):
    trained = trained_pipeline(base, LOCON)
    out = write_kohya_lora(checkpoint_of(trained, tmp_path / "run", meta=FULL_META), tmp_path / "ink.safetensors", "r")
    meta = metadata_of(out)
    assert all(isinstance(v, str) for v in meta.values())
    assert [k for k in SS_KEYS if k not in meta] == []
    assert [k for k in MODELSPEC_KEYS if f"modelspec.{k}" not in meta] == []
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "2.0", "7")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}  # LoCon: convs too
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_output_name"]) == ("sd_v1", "False", "ink")
    assert meta["ss_new_sd_model_hash"] == "ab" * 32 and meta["ss_sd_model_name"] == "tiny-sd"
    assert meta["ss_resolution"] == "(16, 16)" and meta["modelspec.resolution"] == "16x16"
    assert meta["ss_num_train_images"] == "12" and meta["ss_learning_rate"] == "0.0001"
    assert json.loads(meta["ss_dataset_dirs"]) == {"ink": {"n_repeats": 1, "img_count": 12}}  # no local path
    assert float(meta["ss_training_started_at"]) == 1700000000.5
    assert float(meta["ss_training_finished_at"]) > 1700000000.5
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.title"] == "ink" and meta["modelspec.date"].startswith("20")


def test_the_legacy_model_hash_is_written_when_the_base_file_is_there(base, tmp_path):
    import hashlib
    import os

    model = tmp_path / "base.safetensors"
    model.write_bytes(os.urandom(0x120000))
    meta = {**FULL_META, "finetune_base": {**FULL_META["finetune_base"], "path": str(model)}}
    trained = trained_pipeline(base, ATTENTION)
    out = write_kohya_lora(checkpoint_of(trained, tmp_path / "run", meta=meta), tmp_path / "h.safetensors", "r")
    # A1111's legacy hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits (as kohya writes it)
    expected = hashlib.sha256(model.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert metadata_of(out)["ss_sd_model_hash"] == expected


def test_a_checkpoint_without_meta_still_exports_with_alpha_equal_to_rank(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION)
    lora_checkpoint(tmp_path / "run", {"unet": trained.unet}, {})
    out = write_kohya_lora(load_lora_checkpoint(tmp_path / "run"), tmp_path / "bare.safetensors", "r")
    assert {t.item() for k, t in load_file(out).items() if k.endswith(".alpha")} == {float(RANK)}
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert "ss_resolution" not in meta and "ss_sd_model_name" not in meta  # unknown: not guessed


def test_names_without_the_adapter_name_are_read_too(base, tmp_path):
    from stablediff.checkpoint import CheckpointStore

    trained = trained_pipeline(base, ATTENTION)
    tensors = {f"unet/{k.replace('.default.', '.')}": v for k, v in trained.unet.state_dict().items() if "lora_" in k}
    CheckpointStore(tmp_path / "run" / "checkpoints").save(1, tensors, {"lora_config": lora_config_meta(4, 2.0, [])})
    out = write_kohya_lora(load_lora_checkpoint(tmp_path / "run"), tmp_path / "plain.safetensors", "r")
    assert len(load_file(out)) == 3 * 48


def test_the_ema_adapters_are_exported_unless_no_ema(base, tmp_path):
    from stablediff.checkpoint import CheckpointStore

    trained = trained_pipeline(base, ATTENTION)
    lora = {k: v for k, v in trained.unet.state_dict().items() if "lora_" in k}
    tensors = {**{f"unet/{k}": v for k, v in lora.items()}, **{f"ema/{k}": v * 0.5 for k, v in lora.items()}}
    CheckpointStore(tmp_path / "run" / "checkpoints").save(1, tensors, {})
    loaded = load_lora_checkpoint(tmp_path / "run")
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight"
    raw = lora["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.default.weight"]
    assert torch.equal(load_file(write_kohya_lora(loaded, tmp_path / "e.safetensors", "r"))[key], raw * 0.5)
    assert torch.equal(load_file(write_kohya_lora(loaded, tmp_path / "r.safetensors", "r", ema=False))[key], raw)


def test_dora_is_refused_in_the_kohya_layout_and_loads_from_the_diffusers_one(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION, use_dora=True)
    loaded = checkpoint_of(trained, tmp_path / "run", use_dora=True)
    with pytest.raises(ValueError, match="DoRA.*--format lora-diffusers"):
        write_kohya_lora(loaded, tmp_path / "d.safetensors", "the run")
    folder = write_diffusers_lora(loaded, tmp_path / "dora", "the run")
    fresh = load(base)
    fresh.load_lora_weights(str(folder))
    assert abs(image(fresh) - image(trained)).max() <= 1


def test_the_diffusers_layout_is_a_save_lora_weights_folder_diffusers_loads(base, tmp_path):
    trained = trained_pipeline(base, LOCON, CLIP_TARGETS)
    folder = write_diffusers_lora(checkpoint_of(trained, tmp_path / "run", te=True), tmp_path / "lora", "the run")
    tensors = load_file(folder / "pytorch_lora_weights.safetensors")
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in tensors
    adapter = json.loads(metadata_of(folder / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == ALPHA and adapter["text_encoder.lora_alpha"] == 3.0
    fresh = load(base)
    fresh.load_lora_weights(str(folder))
    assert abs(image(fresh) - image(trained)).max() <= 1


def test_a_checkpoint_without_lora_tensors_is_refused(tmp_path):
    from stablediff.checkpoint import CheckpointStore

    CheckpointStore(tmp_path / "run" / "checkpoints").save(1, {"unet/conv_in.weight": torch.zeros(2, 2)}, {})
    with pytest.raises(ValueError, match="no LoRA weights.*--format diffusers"):
        write_kohya_lora(load_lora_checkpoint(tmp_path / "run"), tmp_path / "x.safetensors", "the run")


def test_rank_and_module_dropout_are_kohya_network_args_and_stay_out_of_the_diffusers_config(base, tmp_path):
    trained = trained_pipeline(base, ATTENTION)
    config = lora_config_meta(RANK, ALPHA, ATTENTION) | {"rank_dropout": 0.1, "module_dropout": 0.25}
    loaded = load_lora_checkpoint(lora_checkpoint(tmp_path / "run", {"unet": trained.unet}, {"lora_config": config}))
    meta = metadata_of(write_kohya_lora(loaded, tmp_path / "d.safetensors", "the run"))
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.1", "module_dropout": "0.25"}  # as kohya's
    folder = write_diffusers_lora(loaded, tmp_path / "lora", "the run")
    adapter = json.loads(metadata_of(folder / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == ALPHA and not [k for k in adapter if "_dropout" in k and "lora_" not in k]
    load(base).load_lora_weights(str(folder))  # diffusers builds peft's LoraConfig from that metadata


def test_a_bert_text_encoder_lora_is_refused_in_the_kohya_layout_and_kept_in_the_diffusers_one(tmp_path):
    from stablediff.config.finetune import TEXT_ENCODER_TARGETS
    from stablediff.errors import CheckpointError
    from tests.models.tiny_sd import tiny_pipeline

    pipe = tiny_pipeline()
    add_trained_lora(pipe.unet, ATTENTION, RANK, ALPHA, seed=1)
    add_trained_lora(pipe.text_encoder, list(TEXT_ENCODER_TARGETS["BERT"]), 2, 2.0, seed=2)
    config = {**lora_config_meta(RANK, ALPHA, ATTENTION), "text_encoder": {"r": 2, "lora_alpha": 2.0}}
    groups = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    loaded = load_lora_checkpoint(lora_checkpoint(tmp_path / "run", groups, {"lora_config": config}))
    with pytest.raises(CheckpointError, match="BERT/MiniLM text encoder") as error:
        write_kohya_lora(loaded, tmp_path / "x.safetensors", "run")
    assert "--format diffusers" in str(error.value) and not (tmp_path / "x.safetensors").exists()
    keys = load_file(write_diffusers_lora(loaded, tmp_path / "d", "run") / "pytorch_lora_weights.safetensors")
    assert "text_encoder.encoder.layer.0.attention.self.query.lora_A.weight" in keys  # BERT's own module paths
