"""lora check: per loader, which keys of a LoRA file load and which are dropped, by the loaders' rules."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablediff.finetune.lora_check import check_lora, read_lora_shapes, report_json, report_lines
from stablediff.finetune.lora_files import load_lora_checkpoint, write_diffusers_lora, write_kohya_lora
from stablediff.finetune.lora_targets import base_targets, sd15_targets

from tests.finetune.lora_fixtures import (CLIP_TARGETS, LOCON, add_trained_lora, build_sd_shaped_folder,
                                          lora_checkpoint, lora_config_meta)

LOADERS = ["AUTOMATIC1111", "ComfyUI", "diffusers"]
MADE_UP = "lora_unet_nonexistent_block"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_sd_shaped_folder(tmp_path_factory.mktemp("lora-check") / "base")


@pytest.fixture(scope="module")
def targets(base):
    return base_targets(base)


@pytest.fixture(scope="module")
def trained_checkpoint(base, tmp_path_factory):
    """A LoCon + CLIP text encoder LoRA of the tiny SD-shaped model, as a fine-tune checkpoint."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    add_trained_lora(pipe.unet, LOCON, 4, 2.0, seed=1)
    add_trained_lora(pipe.text_encoder, CLIP_TARGETS, 2, 3.0, seed=2)
    run = lora_checkpoint(tmp_path_factory.mktemp("run") / "run", {"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                          {"lora_config": lora_config_meta(4, 2.0, LOCON)})
    return load_lora_checkpoint(run)


@pytest.fixture(scope="module")
def kohya_file(trained_checkpoint, tmp_path_factory):
    return write_kohya_lora(trained_checkpoint, tmp_path_factory.mktemp("out") / "ours.safetensors", "the run")


def by_loader(result):
    return {r.loader: r for r in result.reports}


def test_our_kohya_export_loads_every_key_in_all_three_loaders(kohya_file, targets):
    result = check_lora(kohya_file, targets)
    reports = by_loader(result)
    assert list(reports) == LOADERS
    for name in LOADERS:
        assert reports[name].skipped == {} and reports[name].refused is None, name
        assert len(reports[name].loaded) == result.keys, name
    assert any(k.startswith("lora_te_") for k in reports["AUTOMATIC1111"].loaded)  # the text encoder LoRA too
    assert any("resnets_0_conv1" in k for k in reports["ComfyUI"].loaded)  # and LoCon's convolutions
    assert result.ok
    assert report_lines(result)[0] == f"AUTOMATIC1111: {result.keys} keys load, 0 skipped"


def sd15_kohya_tensors(targets, modules) -> dict[str, torch.Tensor]:
    """Rank-1 zero LoRA tensors named and shaped for SD 1.5's layers (`lora_unet_`/`lora_te_` kohya names)."""
    tensors = {}
    for module in modules:
        prefix, shape = ("lora_te", targets.text_encoder[module]) if module.startswith("text_model.") else \
            ("lora_unet", targets.unet[module])
        name = f"{prefix}_{module.replace('.', '_')}"
        tensors[f"{name}.lora_down.weight"] = torch.zeros(1, shape[1], *shape[2:])
        tensors[f"{name}.lora_up.weight"] = torch.zeros(shape[0], 1, *([1, 1] if len(shape) == 4 else []))
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


def test_without_base_an_sd15_lora_is_matched_against_sd15s_layers(tmp_path):
    sd15 = sd15_targets()
    assert len(sd15.text_encoder) == 12 * 6 and sd15.unet["conv_in"] == (320, 4, 3, 3)
    modules = [m for m in sd15.unet if m.endswith(("attn1.to_q", "attn2.to_k", "proj_in", "conv1", "upsamplers.0.conv",
                                                    "downsamplers.0.conv", "time_embedding.linear_1", "conv_shortcut"))]
    modules += [m for m in sd15.text_encoder if m.endswith(("q_proj", "out_proj", "fc2"))]
    path = tmp_path / "sd15.safetensors"
    save_file(sd15_kohya_tensors(sd15, modules), path)
    result = check_lora(path, sd15)
    assert {r.loader: len(r.skipped) for r in result.reports} == {name: 0 for name in LOADERS}
    assert result.ok and result.keys == 3 * len(modules)


def test_a_diffusers_layout_unet_lora_loses_its_attention_keys_in_comfyui_and_everything_in_a1111(
        trained_checkpoint, targets, tmp_path):
    folder = write_diffusers_lora(trained_checkpoint, tmp_path / "peft", "the run")
    reports = by_loader(check_lora(folder, targets))
    comfy = reports["ComfyUI"]
    # REFERENCE 2.1: diffusers-named UNet layers are mapped only in the `.processor.` form, so attention
    # projections are "lora key not loaded"; layers without `.to_` (proj_in, ff, resnets) and the text encoder load.
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in comfy.skipped
    assert all(".to_" in k for k in comfy.skipped) and len(comfy.skipped) == 6 * 8 * 2
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in comfy.loaded
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in comfy.loaded
    assert len(reports["AUTOMATIC1111"].loaded) == 0  # A1111 splits at the first dot: module "unet"
    assert reports["diffusers"].skipped == {}


def test_a_made_up_layer_is_skipped_by_all_three_and_diffusers_really_loads_the_rest(base, kohya_file, targets,
                                                                                     tmp_path):
    from diffusers import StableDiffusionPipeline

    tensors = load_file(kohya_file)
    tensors[f"{MADE_UP}.lora_down.weight"], tensors[f"{MADE_UP}.lora_up.weight"] = torch.ones(4, 16), torch.ones(16, 4)
    save_file(tensors, tmp_path / "made_up.safetensors")
    result = check_lora(tmp_path / "made_up.safetensors", targets)
    for report in result.reports:
        assert sorted(report.skipped) == [f"{MADE_UP}.lora_down.weight", f"{MADE_UP}.lora_up.weight"], report.loader
        assert report.refused is None
    assert not result.ok and not report_json(result)["ok"]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "made_up.safetensors"))  # no error: the made-up layer is dropped silently


def test_diffusers_drops_kohya_text_encoder_attention_keys_when_the_file_has_no_out_proj(base, targets, tmp_path):
    """diffusers infers the text encoder format from `to_out_lora`; without an out_proj LoRA the converted
    q_proj keys (`self_attn.to_q_lora.down.weight`) reach peft unconverted and are dropped. A1111/ComfyUI load them."""
    from diffusers import StableDiffusionPipeline

    tensors = {}
    for layer in range(2):
        for module, width in (("self_attn_q_proj", 64), ("mlp_fc2", 96)):
            name = f"lora_te_text_model_encoder_layers_{layer}_{module}"
            tensors |= {f"{name}.lora_down.weight": torch.ones(2, width), f"{name}.lora_up.weight": torch.ones(64, 2),
                        f"{name}.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "q_only.safetensors")
    reports = by_loader(check_lora(tmp_path / "q_only.safetensors", targets))
    assert reports["AUTOMATIC1111"].ok and reports["ComfyUI"].ok
    assert sorted(reports["diffusers"].skipped) == sorted(k for k in tensors if "q_proj" in k)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "q_only.safetensors"))
    adapted = [k for k in pipe.text_encoder.state_dict() if "lora_A" in k]
    assert adapted and all("fc2" in k for k in adapted)  # what the check said: q_proj got no LoRA


def test_a_key_of_the_wrong_width_is_reported_by_every_loader(kohya_file, targets, tmp_path):
    tensors = load_file(kohya_file)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    tensors[key] = torch.zeros(4, 7)
    save_file(tensors, tmp_path / "wide.safetensors")
    for report in check_lora(tmp_path / "wide.safetensors", targets).reports:
        assert "shape (4, 7)" in report.skipped[key], report.loader


def test_missing_pickle_and_non_lora_files_are_refused_with_a_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lora_shapes(tmp_path / "nope.safetensors")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a .safetensors file.*pickle"):
        read_lora_shapes(tmp_path / "old.pt")
    save_file({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="is not a LoRA.*conv_in.weight"):
        read_lora_shapes(tmp_path / "model.safetensors")


def test_a_single_file_base_gives_the_same_layers_as_its_diffusers_folder(base, targets, kohya_file, tmp_path):
    from stablediff.models.pipeline_assembly import load_pipeline_folder
    from stablediff.models.single_file_pipeline import save_single_file

    single = save_single_file(load_pipeline_folder(base, False), tmp_path / "base.safetensors")
    from_file = base_targets(single)
    assert (from_file.unet, from_file.ldm, from_file.text_encoder) == (targets.unet, targets.ldm, targets.text_encoder)
    assert check_lora(kohya_file, from_file).ok


def test_a_base_that_is_no_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a diffusers pipeline folder"):
        base_targets(tmp_path)
