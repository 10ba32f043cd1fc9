"""builtin:digits selectors: `?digits=LIST_OR_RANGE&count=N`, on the training path and as a source."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from stablediff.config.schema import DataConfig
from stablediff.data.digits import digit_captions, load_digits
from stablediff.data.sources import DigitsSource, SourceError, open_source
from stablediff.data.training_set import load_training_data
from stablediff.training.state import data_fingerprint

CAPTION_LABELS = {caption: label for label in range(10) for caption in digit_captions(label)}


def load(tmp_path, source: str, seed: int = 0, **data):
    config = DataConfig(source=source, resolution=16, **data)
    return load_training_data(config, seed=seed, run_dir=tmp_path / "run", bucket_step=8, log=lambda _: None)


def labels(captions) -> set[int]:
    """The digits a list of captions (or of caption-variant lists) names."""
    return {CAPTION_LABELS[c if isinstance(c, str) else c[0]] for c in captions}


@pytest.mark.parametrize(("digits", "expected"), [("9", {9}), ("0-8", set(range(9))),
                                                  ("1,3,5-7", {1, 3, 5, 6, 7})])
def test_a_selection_trains_on_the_chosen_digits_and_holds_out_only_them(tmp_path, digits, expected):
    data = load(tmp_path, f"builtin:digits?digits={digits}")
    train, held = load_digits(16)
    assert labels(data.captions) == expected and labels(data.held_out_captions) == expected
    assert len(data.images) == np.isin(train.labels, list(expected)).sum()
    assert len(data.held_out) == len(data.held_out_captions) == np.isin(held.labels, list(expected)).sum()


def test_count_takes_the_first_n_of_the_fixed_split_whatever_the_seed(tmp_path):
    first = load(tmp_path, "builtin:digits?digits=9&count=20", seed=0)
    again = load(tmp_path, "builtin:digits?digits=9&count=20", seed=12345)
    train, _ = load_digits(16)
    nines = train.images[train.labels == 9][:20]  # (20, 16, 16, 3) uint8, in the split's order
    assert len(first.images) == 20 and labels(first.captions) == {9}
    assert np.array_equal(((first.images.numpy() + 1) * 127.5).round().astype(np.uint8), nines.transpose(0, 3, 1, 2))
    assert first.keys == again.keys and (first.images == again.images).all()


def test_count_without_digits_takes_the_first_n_images_of_all_digits(tmp_path):
    data = load(tmp_path, "builtin:digits?count=30")
    whole = load(tmp_path, "builtin:digits")
    assert data.keys == whole.keys[:30] and len(data.held_out) == len(whole.held_out)


def test_the_data_fingerprint_follows_the_selection(tmp_path):
    def fingerprint(source: str) -> str:
        data = load(tmp_path, source)
        return data_fingerprint(data.images, data.captions)

    nines = fingerprint("builtin:digits?digits=9&count=20")
    assert nines == fingerprint("builtin:digits?digits=9&count=20")
    assert len({nines, fingerprint("builtin:digits?digits=8&count=20"), fingerprint("builtin:digits?digits=9&count=21"),
                fingerprint("builtin:digits")}) == 4


def test_the_selection_as_a_source_yields_the_training_paths_images(tmp_path):
    source = open_source("builtin:digits?digits=9&count=20")
    samples = list(source)
    assert isinstance(source, DigitsSource) and len(samples) == 20
    assert labels(s.caption for s in samples) == {9}
    train, _ = load_digits(32)
    nines = train.images[train.labels == 9][:20]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(s.image_bytes))) for s in samples])
    assert np.array_equal(decoded, nines)
    assert [s.key for s in samples] == [s.key for s in open_source("builtin:digits?digits=9&count=20")]


def test_the_held_out_split_of_a_selection_holds_every_held_out_image_of_its_digits():
    _, held = load_digits(32)
    samples = list(open_source("builtin:digits:held_out?digits=9&count=5"))  # count limits training images only
    assert len(samples) == (held.labels == 9).sum() and labels(s.caption for s in samples) == {9}
    assert all(s.key.startswith("digits/held_out/") for s in samples)


def test_a_sample_keeps_its_key_and_caption_whatever_selection_picked_it():
    everything = {s.key: s for s in open_source("builtin:digits")}
    for sample in open_source("builtin:digits?digits=3,4&count=10"):
        assert everything[sample.key].caption == sample.caption
        assert everything[sample.key].image_bytes == sample.image_bytes


BAD_SELECTORS = [
    ("builtin:digits?digit=9", "unknown selector key 'digit'"),
    ("builtin:digits?digits=9&size=3", "unknown selector key 'size'"),
    ("builtin:digits?digits=10", "'10' is outside 0-9"),
    ("builtin:digits?digits=0-12", "'0-12' is outside 0-9"),
    ("builtin:digits?digits=7-3", "runs backwards; write 3-7"),
    ("builtin:digits?digits=a", "'a' is neither a digit nor a range"),
    ("builtin:digits?digits=1,,2", "'' is neither a digit nor a range"),
    ("builtin:digits?digits=-3", "'-3' is neither a digit nor a range"),
    ("builtin:digits?digits=1-2-3", "'1-2-3' is neither a digit nor a range"),
    ("builtin:digits?digits=", "digits needs a value"),
    ("builtin:digits?count", "count needs a value"),
    ("builtin:digits?digits=9&digits=8", "digits is given twice"),
    ("builtin:digits?count=0", "count=0 must be a whole number of images, 1 or more"),
    ("builtin:digits?count=-4", "count=-4 must be"),
    ("builtin:digits?count=2.5", "count=2.5 must be"),
    ("builtin:digits?", "an empty part"),
    ("builtin:digits?digits=9&", "an empty part"),
    ("builtin:digits:test?digits=9", "unknown split 'test'"),
]


@pytest.mark.parametrize(("spec", "what"), BAD_SELECTORS)
def test_a_bad_selector_is_one_paragraph_naming_the_part_and_the_syntax(spec, what):
    with pytest.raises(SourceError) as raised:
        open_source(spec)
    message = str(raised.value)
    assert what in message and "builtin:digits[:held_out][?digits=LIST_OR_RANGE][&count=N]" in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["builtin:digits?digits=9&count=144", "builtin:digits:held_out?digits=9&count=144"])
def test_a_count_past_the_images_there_are_names_how_many_there_are(spec):
    train, _ = load_digits(32)
    nines = int((train.labels == 9).sum())
    assert nines == 143
    with pytest.raises(SourceError, match=f"count=144 asks for more .* \\({nines}\\); give count=1 to {nines}"):
        open_source(spec)
    open_source(spec.replace("144", str(nines)))  # exactly all of them is fine


@pytest.mark.parametrize(("spec", "what"), [BAD_SELECTORS[2], BAD_SELECTORS[0],
                                            ("builtin:digits?digits=9&count=500", "count=500 asks for more")])
def test_the_training_path_refuses_the_same_bad_selectors(tmp_path, spec, what):
    with pytest.raises(SourceError, match=re.escape(what)):
        load(tmp_path, spec)
