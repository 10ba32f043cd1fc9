"""`stablediff lora check` and `ckpt export --format lora|lora-diffusers`, run as a user runs them."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests.finetune.lora_fixtures import ATTENTION, add_trained_lora, lora_checkpoint, lora_config_meta, sd_shaped_unet


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A fine-tune run directory whose step-7 checkpoint holds UNet LoRA adapters."""
    unet = add_trained_lora(sd_shaped_unet(), ATTENTION, 4, 2.0, seed=1)
    return lora_checkpoint(tmp_path_factory.mktemp("cli") / "run", {"unet": unet},
                           {"lora_config": lora_config_meta(4, 2.0, ATTENTION)})


@pytest.fixture(scope="module")
def exported(lora_run):
    result = run_cli("ckpt", "export", str(lora_run), "--format", "lora")
    assert result.returncode == 0, result.stderr
    return lora_run / "export" / "step-000007-ema-lora.safetensors"


def test_export_lora_writes_the_kohya_file_at_the_default_name(exported):
    tensors = load_file(exported)
    assert len(tensors) == 3 * 48 and all(k.startswith("lora_unet_") for k in tensors)


def test_export_lora_diffusers_writes_a_save_lora_weights_folder(lora_run, tmp_path):
    result = run_cli("ckpt", "export", str(lora_run), "--format", "lora-diffusers", "--no-ema")
    assert result.returncode == 0, result.stderr
    folder = lora_run / "export" / "step-000007-raw-lora-diffusers"
    assert all(k.startswith("unet.") for k in load_file(folder / "pytorch_lora_weights.safetensors"))


def test_check_as_json_reports_the_tiny_models_widths_against_sd15(exported):
    # the tiny model's attention layers carry SD 1.5's names; their widths do not, which the check reports
    result = run_cli("lora", "check", str(exported), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False
    assert all("does not fit" in why for r in report["loaders"].values() for why in r["skipped"].values())


def test_check_exits_0_when_every_loader_loads_every_key(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD 1.5: 320 wide
    save_file({f"{name}.lora_down.weight": torch.zeros(1, 320), f"{name}.lora_up.weight": torch.zeros(320, 1),
               f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "one.safetensors")
    result = run_cli("lora", "check", str(tmp_path / "one.safetensors"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "AUTOMATIC1111: 3 keys load, 0 skipped" in result.stdout
    assert "ComfyUI: 3 keys load, 0 skipped" in result.stdout and "diffusers: 3 keys load, 0 skipped" in result.stdout


def test_check_exits_1_and_names_a_made_up_key(tmp_path):
    name = "lora_unet_nonexistent_block"
    save_file({f"{name}.lora_down.weight": torch.zeros(1, 8), f"{name}.lora_up.weight": torch.zeros(8, 1)},
              tmp_path / "bad.safetensors")
    result = run_cli("lora", "check", str(tmp_path / "bad.safetensors"))
    assert result.returncode == 1
    assert "skipped by ComfyUI:" in result.stdout and f"{name}.lora_down.weight" in result.stdout


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing.safetensors", "does not exist"),
    (lambda p: (p / "x.pt").write_bytes(b"PK\x03\x04 zip") and p / "x.pt", "not a .safetensors file"),
    (lambda p: save_file({"conv_in.weight": torch.zeros(1)}, p / "m.safetensors") or p / "m.safetensors",
     "is not a LoRA"),
], ids=["missing", "pickle", "not-lora"])
def test_bad_files_are_one_paragraph_and_exit_1(tmp_path, make, words):
    result = run_cli("lora", "check", str(make(tmp_path)))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and words in errors[0]
    assert "Traceback" not in result.stderr
