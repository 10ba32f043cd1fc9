"""`stablediff generate` as a user runs it: samplers, LoRA, img2img, inpainting, --from-png, errors."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.inference.tiny import build_tiny_pipeline_folder, write_peft_lora


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("generate") / "tiny-model")


@pytest.fixture(scope="module")
def lora(model, tmp_path_factory):
    return write_peft_lora(model, tmp_path_factory.mktemp("generate-lora") / "ink")


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def generate(*args):
    result = run_cli("generate", *map(str, args))
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def test_list_samplers_names_each_with_what_it_is():
    result = run_cli("generate", "--list-samplers")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["ddpm", "ddim", "pndm", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras",
                     "dpmpp_sde", "unipc"]
    assert "EulerAncestralDiscreteScheduler" in result.stdout and "[default]" in result.stdout


def test_from_png_recreates_a_txt2img_image_with_a_lora(model, lora, tmp_path):
    made = generate(model, "a handwritten digit five", "--negative", "blurry, faint", "--scheduler", "euler_a",
                    "--steps", "3", "--guidance", "4.5", "--seed", "7", "--num", "2", "--lora", f"{lora}:0.7",
                    "--out", tmp_path / "a")
    text = Image.open(made[1]).text["parameters"]
    assert text.startswith("a handwritten digit five\nNegative prompt: blurry, faint\n")
    assert "Sampler: euler_a, CFG scale: 4.5, Seed: 8, Size: 16x16, Model hash: " in text
    assert 'Lora hashes: "ink: ' in text and 'Lora weights: "ink: 0.7"' in text
    again = generate("--from-png", made[1], "--out", tmp_path / "b")
    assert np.array_equal(pixels(again[0]), pixels(made[1]))
    assert Image.open(again[0]).text["parameters"] == text


def test_from_png_recreates_a_dpmpp_sde_image_of_a_batch_pixel_for_pixel(model, tmp_path):
    made = generate(model, "a digit", "--scheduler", "dpmpp_sde", "--steps", "3", "--seed", "5", "--num", "2",
                    "--out", tmp_path / "a")
    again = generate("--from-png", made[1], "--out", tmp_path / "b")
    assert np.array_equal(pixels(again[0]), pixels(made[1]))


def test_the_png_records_its_files_relative_to_its_folder_and_from_png_finds_them(model, lora, tmp_path):
    Image.new("RGB", (16, 16), (90, 20, 160)).save(tmp_path / "init.png")
    made = generate(model, "a digit", "--init", tmp_path / "init.png", "--strength", "0.5", "--steps", "2",
                    "--lora", lora, "--out", tmp_path / "a")
    chunk = json.loads(Image.open(made[0]).text["stablediff"])
    paths = [chunk["model"], chunk["init"], *chunk["loras"].values()]
    assert chunk["init"] == os.path.join("..", "init.png")
    assert not any(os.path.isabs(path) or str(tmp_path) in path for path in paths), chunk
    again = generate("--from-png", made[0], "--out", tmp_path / "b")  # run from another folder than the PNG's
    assert np.array_equal(pixels(again[0]), pixels(made[0]))


def test_a_prompt_longer_than_the_text_encoder_reads_is_warned_about(model, tmp_path):
    result = run_cli("generate", str(model), "a handwritten digit seven drawn with a thick black pen", "--steps",
                     "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warning: the prompt is 13 tokens long and the text encoder reads at most 8" in result.stderr
    assert "its last 5 tokens ('with a thick black pen') are ignored" in result.stderr


def test_inpainting_from_the_cli_and_again_from_its_png(model, tmp_path):
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "init.png")
    mask = Image.new("L", (16, 16), 0)  # half the init's size, same shape: scaled up
    mask.paste(255, (0, 0, 16, 8))
    mask.save(tmp_path / "mask.png")
    made = generate(model, "a digit", "--init", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
                    "--strength", "0.8", "--steps", "4", "--seed", "3", "--out", tmp_path / "a")
    out = pixels(made[0])
    assert out.shape == (32, 32, 3) and (out[16:] == (200, 40, 40)).all() and not (out[:16] == (200, 40, 40)).all()
    assert "Denoising strength: 0.8" in Image.open(made[0]).text["parameters"]
    again = generate("--from-png", made[0], model, "--out", tmp_path / "b")
    assert np.array_equal(pixels(again[0]), out)


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "k_euler"], "unknown sampler 'k_euler'; choose one of: ddpm, ddim"),
    (["--init", "{tmp}/broken.png"], "cannot be read as an image"),
    (["--init", "{tmp}/init.png", "--mask", "{tmp}/wide.png"], "a different shape"),
    (["--lora", "{tmp}/cut.safetensors"], "not a readable safetensors file"),
    (["--lora", "{tmp}/cut.safetensors:abc"], "the scale 'abc' is not a number"),
    (["--out", "{tmp}/init.png"], "init.png: it is a file, not a folder"),
])
def test_bad_input_is_one_paragraph_and_exit_1(model, tmp_path, args, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
    Image.new("L", (32, 16)).save(tmp_path / "wide.png")
    result = run_cli("generate", str(model), "x", "--steps", "2", "--out", str(tmp_path / "o"),
                     *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_mask_without_an_init_image_is_a_usage_error(model, tmp_path):
    result = run_cli("generate", str(model), "x", "--mask", str(tmp_path / "m.png"))
    assert result.returncode == 2 and "--mask needs --init" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["MODEL", "x", "--strength", "0.5"], "--strength applies to img2img"),
    (["--from-png", "IMG", "MODEL", "a prompt"], "with --from-png give at most MODEL"),
    (["MODEL"], "give MODEL and PROMPT"),
    (["--from-png", "IMG", "a cat"], "'a cat' is no model file or folder"),
    (["MODEL", "x", "--size", "99999x99999"], "past the limit of 4096 pixels a side"),
], ids=["strength-without-init", "from-png-with-prompt", "no-prompt", "from-png-with-words", "huge-size"])
def test_misused_options_are_usage_errors(model, tmp_path, args, message):
    image = tmp_path / "any.png"
    Image.new("RGB", (16, 16)).save(image)
    args = [str(model) if a == "MODEL" else str(image) if a == "IMG" else a for a in args]
    result = run_cli("generate", *args)
    assert result.returncode == 2 and message in result.stderr


def test_a_single_file_model_generates_what_its_diffusers_folder_does(model, tmp_path):
    from stablediff.models.pipeline_assembly import load_pipeline_folder
    from stablediff.models.single_file_pipeline import save_single_file

    single = save_single_file(load_pipeline_folder(model), tmp_path / "tiny.safetensors")
    from_file = generate(single, "a digit", "--steps", "2", "--seed", "4", "--out", tmp_path / "a")
    from_folder = generate(model, "a digit", "--steps", "2", "--seed", "4", "--out", tmp_path / "b")
    assert np.array_equal(pixels(from_file[0]), pixels(from_folder[0]))
    autov2 = hashlib.sha256(single.read_bytes()).hexdigest()[:10]
    assert Image.open(from_file[0]).text["parameters"].endswith(f"Model hash: {autov2}, Model: tiny")


def test_step_picks_a_checkpoint_of_a_run_and_from_png_finds_it_again(tiny_run, tmp_path):
    from stablediff.checkpoint import CheckpointStore

    oldest = CheckpointStore(tiny_run / "checkpoints").steps()[0]
    made = generate(tiny_run, "a digit", "--step", oldest, "--steps", "2", "--out", tmp_path / "a")
    again = generate("--from-png", made[0], "--out", tmp_path / "b")
    assert np.array_equal(pixels(again[0]), pixels(made[0]))
