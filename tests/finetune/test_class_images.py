"""DreamBooth's class-image cache: generated once, seeded per image, resumable, whole images only."""

import os
import signal

import pytest

from stablediff.config.finetune import PriorSettings
from stablediff.errors import ConfigError
from stablediff.finetune.class_images import (CLASS_IMAGES, class_image_path, class_image_seed, ensure_class_images,
                                              is_whole_png)
from stablediff.io.atomic import temp_name
from stablediff.models.pipeline_assembly import load_pipeline_folder
from stablediff.training.interrupt import STOP, TrainingInterrupted

from tests.inference.tiny import TINY_SIZE, build_tiny_pipeline_folder

BASE = {"kind": "diffusers", "path": "tiny"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline_folder(build_tiny_pipeline_folder(tmp_path_factory.mktemp("class") / "tiny"))


def prior(num: int, **changes) -> PriorSettings:
    return PriorSettings(**{"class_prompt": "a photo of a dog", "num_class_images": num, "steps": 2, **changes})


def ensure(pipe, run_dir, num: int, lines: list | None = None, **changes):
    say = (lines.append if lines is not None else lambda _line: None)
    return ensure_class_images(pipe, prior(num, **changes), 0, TINY_SIZE, run_dir, BASE, say=say)


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_generates_the_images_once(pipe, tmp_path):
    folder = ensure(pipe, tmp_path, 3)
    assert folder == tmp_path / CLASS_IMAGES
    first = contents(folder)
    assert list(first) == ["00000.png", "00001.png", "00002.png"]
    assert len(set(first.values())) == 3  # each image has its own seed
    lines = []
    ensure(pipe, tmp_path, 3, lines)
    assert lines == [f"class images: all 3 in {folder} (none generated)"]
    assert contents(folder) == first


def test_a_deleted_image_is_generated_again_identically(pipe, tmp_path):
    folder = ensure(pipe, tmp_path, 3)
    before = contents(folder)
    class_image_path(folder, 1).unlink()
    lines = []
    ensure(pipe, tmp_path, 3, lines)
    assert "generating 1 of 3" in lines[0]
    assert contents(folder) == before


def test_a_torn_temp_file_is_removed_and_a_damaged_image_redrawn(pipe, tmp_path):
    folder = ensure(pipe, tmp_path, 2)
    before = contents(folder)
    torn = folder / temp_name("00001.png")
    torn.write_bytes(before["00001.png"][:40])  # what a kill in the middle of a write leaves
    class_image_path(folder, 0).write_bytes(before["00000.png"][:50])  # a truncated image (damaged by hand)
    assert not is_whole_png(class_image_path(folder, 0))
    lines = []
    ensure(pipe, tmp_path, 2, lines)
    assert "generating 1 of 2" in lines[0]
    assert contents(folder) == before


def test_image_i_does_not_depend_on_how_many_are_made(pipe, tmp_path):
    two = contents(ensure(pipe, tmp_path / "a", 2))
    three = contents(ensure(pipe, tmp_path / "b", 3))
    assert {k: three[k] for k in two} == two


def test_image_seeds_are_distinct_and_fit_a_generator():
    seeds = [class_image_seed(0, i) for i in range(100)] + [class_image_seed(1, 0)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert class_image_seed(0, 5) == class_image_seed(0, 5)


def test_other_settings_over_the_same_images_are_refused(pipe, tmp_path):
    ensure(pipe, tmp_path, 1)
    with pytest.raises(ConfigError, match="other settings .*prompt differ"):
        ensure_class_images(pipe, PriorSettings(class_prompt="a cat", num_class_images=1, steps=2), 0, TINY_SIZE,
                            tmp_path, BASE, say=lambda _line: None)
    with pytest.raises(ConfigError, match="steps differ"):
        ensure(pipe, tmp_path, 1, steps=3)


def test_sigterm_stops_before_the_next_image_and_a_restart_finishes(pipe, tmp_path):
    def say(line):
        if line.startswith("class images: generating"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the stop flag

    with STOP.handling():
        with pytest.raises(TrainingInterrupted, match="while generating class images"):
            ensure_class_images(pipe, prior(2), 0, TINY_SIZE, tmp_path, BASE, say=say)
    assert list((tmp_path / CLASS_IMAGES).iterdir()) == []
    assert sorted(contents(ensure(pipe, tmp_path, 2))) == ["00000.png", "00001.png"]
