"""`stablediff ckpt export|convert|merge|prune|hash|info` as a user runs them, on a real tiny run."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def single_file(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    result = run_cli("ckpt", "export", str(tiny_run), "--format", "single-file", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    return out


def assert_one_paragraph_error(result, *needles):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def same_tensors(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_then_convert_gives_the_runs_own_diffusers_weights(tiny_run, single_file, tmp_path):
    result = run_cli("ckpt", "convert", str(single_file), str(tmp_path / "diffusers"))
    assert result.returncode == 0, result.stderr
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        ours = load_file(tmp_path / "diffusers" / f"{part}.safetensors")
        assert same_tensors(ours, load_file(tiny_run / "export" / "diffusers" / f"{part}.safetensors")), part


def test_export_diffusers_of_an_older_step_without_ema(tiny_run, tmp_path):
    result = run_cli("ckpt", "export", str(tiny_run), "--format", "diffusers", "--step", "0", "--no-ema",
                     "--out", str(tmp_path / "step0"))
    assert result.returncode == 0, result.stderr
    unet = load_file(tmp_path / "step0" / "unet" / "diffusion_pytorch_model.safetensors")
    final = load_file(tiny_run / "export" / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not same_tensors(unet, final)


def test_export_lora_of_a_full_run_says_it_has_no_lora(tiny_run, tmp_path):
    result = run_cli("ckpt", "export", str(tiny_run), "--format", "lora", "--out", str(tmp_path / "l.safetensors"))
    assert_one_paragraph_error(result, "no LoRA weights")


def test_hash_matches_sha256sum(single_file):
    result = run_cli("ckpt", "hash", str(single_file))
    assert result.returncode == 0, result.stderr
    expected = subprocess.run(["sha256sum", str(single_file)], capture_output=True, text=True).stdout.split()[0]
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == expected and lines[1] == f"autov2 {expected[:10]}"


def test_info_dispatches_between_model_files_and_run_directories(tiny_run, single_file):
    on_file = run_cli("ckpt", "info", str(single_file))
    assert on_file.returncode == 0, on_file.stderr
    info = json.loads(on_file.stdout)
    assert info["architecture"]["text_encoder"] == "bert" and info["parameters"]["text_encoder"] > 0
    assert info["metadata"]["stablediff.run"]["weights"] == "ema"
    on_run = json.loads(run_cli("ckpt", "info", str(tiny_run)).stdout)
    assert on_run["meta"]["stage"] == "unet"


def test_merge_and_prune_from_the_command_line(single_file, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in load_file(single_file).items()}, other)
    merged = tmp_path / "merged.safetensors"
    result = run_cli("ckpt", "merge", str(single_file), str(other), "--alpha", "0", "--out", str(merged))
    assert result.returncode == 0, result.stderr
    assert same_tensors(load_file(merged), load_file(single_file))
    half = tmp_path / "half.safetensors"
    result = run_cli("ckpt", "prune", str(merged), str(half), "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    assert half.stat().st_size < 0.55 * merged.stat().st_size
    assert run_cli("ckpt", "prune", str(merged), str(half)).returncode == 1  # exists: no silent overwrite


def test_truncated_file_exits_1(single_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single_file.read_bytes()[: single_file.stat().st_size // 3])
    assert_one_paragraph_error(run_cli("ckpt", "convert", str(cut), str(tmp_path / "out")), "truncated")


def test_file_of_another_architecture_exits_1(tmp_path):
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4)}, tmp_path / "x.safetensors")
    assert_one_paragraph_error(run_cli("ckpt", "convert", str(tmp_path / "x.safetensors"), str(tmp_path / "out")),
                               "no UNet weights")


def test_pickle_file_exits_1_without_trust_pickle(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, tmp_path / "model.ckpt")
    assert_one_paragraph_error(run_cli("ckpt", "convert", str(tmp_path / "model.ckpt"), str(tmp_path / "a")),
                               "--trust-pickle")


def test_missing_component_exits_1_naming_it(single_file, tmp_path):
    state = {k: v for k, v in load_file(single_file).items() if not k.startswith("cond_stage_model.")}
    save_file(state, tmp_path / "no_text.safetensors")
    assert_one_paragraph_error(run_cli("ckpt", "convert", str(tmp_path / "no_text.safetensors"),
                                       str(tmp_path / "out")), "no text encoder weights")


def test_merge_of_mismatched_models_exits_1_naming_the_tensor(single_file, tmp_path):
    state = load_file(single_file)
    state.pop("model.diffusion_model.out.2.bias")
    save_file(state, tmp_path / "other.safetensors")
    result = run_cli("ckpt", "merge", str(single_file), str(tmp_path / "other.safetensors"),
                     "--out", str(tmp_path / "m.safetensors"))
    assert_one_paragraph_error(result, "model.diffusion_model.out.2.bias")


def test_convert_to_a_pickle_name_is_refused(single_file, tmp_path):
    assert_one_paragraph_error(run_cli("ckpt", "convert", str(single_file), str(tmp_path / "m.ckpt")), "pickle")


def test_sd1_file_without_a_tokenizer_asks_for_one(tmp_path):
    from tests.models.tiny_sd import tiny_clip_pipeline

    from stablediff.models.single_file_pipeline import pipeline_state

    state, _ = pipeline_state(tiny_clip_pipeline(tmp_path / "tokenizer"))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sd1.safetensors")  # as other tools write it
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    result = run_cli("ckpt", "convert", str(tmp_path / "sd1.safetensors"), str(tmp_path / "a"), env=empty_cache)
    assert_one_paragraph_error(result, "--tokenizer")  # loading with one: tests/models/test_single_file_pipeline.py
