"""The real-digits bar for FD and KID: as many real training digits as the model generated, balanced over the
classes, scored against the held-out split."""

import numpy as np
import pytest

from stablediff.evaluation.digit_reference import balanced_indices, real_reference


def test_balanced_indices_take_the_first_of_each_class_in_turn():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2])
    picked = balanced_indices(labels, 4)
    assert sorted(labels[picked].tolist()) == [0, 0, 1, 2]
    assert picked.tolist() == [0, 1, 2, 3]


def test_more_indices_than_the_split_holds_is_an_error():
    with pytest.raises(ValueError, match="fewer than"):
        balanced_indices(np.array([0, 1]), 3)


def test_real_digits_score_near_zero_and_more_of_them_score_lower():
    few, many = real_reference(40, 16), real_reference(200, 16)
    assert 0 < many["fd"].value < few["fd"].value
    assert few["fd"].count == 40 and many["kid"].count == 200
    assert abs(many["kid"].value) < 3 * many["kid"].spread + 0.05
    assert real_reference(40, 16)["fd"].value == few["fd"].value  # deterministic
