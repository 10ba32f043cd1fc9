"""builtin:digits: deterministic images, captions for every digit, a fixed held-out split."""

import numpy as np

from stablediff.data.digits import NUMBER_WORDS, digit_captions, load_digits


def test_split_sizes_and_shapes():
    train, held = load_digits(32)
    assert len(train) + len(held) == 1797
    assert len(held) == 359
    assert train.images.shape == (len(train), 32, 32, 3) and train.images.dtype == np.uint8


def test_held_out_split_is_disjoint_and_fixed():
    train, held = load_digits(32)
    load_digits.cache_clear()
    train2, held2 = load_digits(32)
    assert np.array_equal(held.raw, held2.raw) and np.array_equal(train.labels, train2.labels)
    train_rows = {r.tobytes() for r in train.raw}
    # sklearn's digits hold a few exact duplicates; the split itself is by index, so nearly none overlap.
    assert sum(r.tobytes() in train_rows for r in held.raw) < 5


def test_every_digit_appears_in_both_splits():
    train, held = load_digits(16)
    assert set(train.labels) == set(range(10)) == set(held.labels)


def test_captions_name_the_digit_in_words_and_numbers():
    captions = digit_captions(7)
    assert "a handwritten digit seven" in captions
    assert "the number 7" in captions
    assert all(("7" in c) or ("seven" in c) for c in captions)
    assert len(set(captions)) == len(captions) >= 4
    assert len(NUMBER_WORDS) == 10


def test_images_are_white_digits_on_black_in_grey_rgb():
    train, _ = load_digits(32)
    image = train.images[0].astype(int)
    assert (image[..., 0] == image[..., 1]).all()  # grey
    assert image[0, 0, 0] < 20 and image.max() > 200  # dark corner, bright strokes
