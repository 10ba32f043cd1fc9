"""`stablediff.load_pipeline`: one model kept loaded and reused; switching models frees the old one."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
from PIL import Image

import stablediff
from stablediff.inference.metadata import read_png_metadata


@pytest.fixture
def two_models(tiny_model, tmp_path):
    return [shutil.copytree(tiny_model, tmp_path / name) for name in ("model-a", "model-b")]


def test_loading_the_same_model_again_reuses_it(two_models):
    first = stablediff.load_pipeline(two_models[0])
    assert stablediff.load_pipeline(str(two_models[0])) is first


def test_switching_models_frees_the_previous_one(two_models):
    first = stablediff.load_pipeline(two_models[0])
    unet = weakref.ref(first.pipe.unet)
    del first
    second = stablediff.load_pipeline(two_models[1])
    gc.collect()
    assert unet() is None
    assert second.name == "model-b"


def test_weights_rewritten_on_disk_are_loaded_again(two_models):
    first = stablediff.load_pipeline(two_models[0])
    weights = two_models[0] / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert stablediff.load_pipeline(two_models[0]) is not first


def test_save_png_writes_the_images_parameters(loaded, tmp_path):
    image = loaded.txt2img("a digit", steps=2, seed=4, sampler="ddim")[0]
    info, locations = read_png_metadata(stablediff.save_png(image, tmp_path / "x.png"))
    assert info.params["Sampler"] == "ddim" and info.params["Seed"] == "4"
    assert locations["model"] == str(loaded.source.path)
    assert Image.open(tmp_path / "x.png").size == (16, 16)


def test_save_png_stores_paths_relative_to_its_folder_unless_embed_paths(loaded, tmp_path):
    image = loaded.txt2img("a digit", steps=2, seed=4)[0]
    relative = Image.open(stablediff.save_png(image, tmp_path / "x.png")).text["stablediff"]
    absolute = Image.open(stablediff.save_png(image, tmp_path / "y.png", embed_paths=True)).text["stablediff"]
    assert json.loads(relative)["model"] == os.path.relpath(loaded.source.path, os.path.realpath(tmp_path))
    assert json.loads(absolute)["model"] == str(loaded.source.path)


def test_an_unknown_option_is_named(loaded):
    with pytest.raises(TypeError, match="unknown option.*'stpes'"):
        loaded.txt2img("a digit", stpes=2)


def test_import_stablediff_does_not_import_torch():
    code = "import sys, stablediff; assert callable(stablediff.load_pipeline); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
