"""Prompt adherence: accuracy, per-class precision/recall/F1 and the confusion matrix of the digit classifier.

The arithmetic is checked against sklearn.metrics as an independent implementation; the classifier end to
end on real digits, whose answer is known (real held-out digits score what the reference says).
"""

import json

import numpy as np
import pytest
from sklearn import metrics

from stablediff.data.digits import load_digits
from stablediff.evaluation.adherence import (
    NUM_DIGITS,
    adherence,
    classification_scores,
    confusion_matrix,
    reference_scores,
)


def noisy_labels(seed: int, n: int = 300, classes=range(NUM_DIGITS), error_rate: float = 0.4):
    """Requested labels from `classes`; predictions that are right except for `error_rate` random digits."""
    rng = np.random.default_rng(seed)
    requested = rng.choice(list(classes), size=n)
    wrong = rng.random(n) < error_rate
    predicted = np.where(wrong, rng.integers(0, NUM_DIGITS, size=n), requested)
    return requested, predicted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_confusion_matrix_agrees_with_sklearn_rows_requested_columns_predicted(seed):
    requested, predicted = noisy_labels(seed)
    expected = metrics.confusion_matrix(requested, predicted, labels=list(range(NUM_DIGITS)))
    np.testing.assert_array_equal(confusion_matrix(requested, predicted), expected)


def test_the_confusion_matrix_puts_requested_on_rows():
    confusion = confusion_matrix(np.array([3, 3, 3]), np.array([3, 8, 8]))
    assert confusion[3, 3] == 1 and confusion[3, 8] == 2 and confusion.sum() == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_precision_recall_f1_agree_with_sklearn(seed):
    requested, predicted = noisy_labels(seed)
    scores = classification_scores(requested, predicted)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        requested, predicted, labels=list(range(NUM_DIGITS)), zero_division=0)
    for c in range(NUM_DIGITS):
        assert scores.precision[c] == pytest.approx(precision[c], abs=1e-12)
        assert scores.recall[c] == pytest.approx(recall[c], abs=1e-12)
        assert scores.f1[c] == pytest.approx(f1[c], abs=1e-12)
        assert scores.support[c] == support[c]
    assert scores.accuracy == pytest.approx(metrics.accuracy_score(requested, predicted), abs=1e-12)


def test_with_only_some_classes_requested_precision_still_counts_every_image_read_as_the_class():
    requested, predicted = noisy_labels(3, classes=[2, 5, 7], error_rate=0.6)
    scores = classification_scores(requested, predicted)
    assert scores.classes == (2, 5, 7)
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        requested, predicted, labels=[2, 5, 7], zero_division=0)
    assert [scores.precision[c] for c in (2, 5, 7)] == pytest.approx(precision, abs=1e-12)
    assert [scores.recall[c] for c in (2, 5, 7)] == pytest.approx(recall, abs=1e-12)
    assert [scores.f1[c] for c in (2, 5, 7)] == pytest.approx(f1, abs=1e-12)
    assert scores.confusion.shape == (NUM_DIGITS, NUM_DIGITS)  # images read as unrequested digits stay counted
    assert scores.confusion[:, [0, 1, 3, 4, 6, 8, 9]].sum() > 0


def test_macro_averages_agree_with_sklearn_over_the_requested_classes():
    requested, predicted = noisy_labels(4, classes=[0, 1, 4, 9])
    scores = classification_scores(requested, predicted)
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        requested, predicted, labels=[0, 1, 4, 9], average="macro", zero_division=0)
    assert (scores.macro_precision, scores.macro_recall, scores.macro_f1) == pytest.approx(
        (precision, recall, f1), abs=1e-12)


def test_a_generator_that_draws_one_digit_for_every_prompt_has_low_precision_for_it():
    requested = np.repeat(np.arange(NUM_DIGITS), 5)
    scores = classification_scores(requested, np.full_like(requested, 8))
    assert scores.recall[8] == 1.0 and scores.precision[8] == pytest.approx(0.1)
    assert scores.precision[3] == 0.0 and scores.recall[3] == 0.0 and scores.f1[3] == 0.0  # never read: 0, not NaN
    assert scores.accuracy == pytest.approx(0.1)


def test_labels_outside_the_digits_are_a_bug_not_a_score():
    with pytest.raises(ValueError, match="predicted labels"):
        confusion_matrix(np.array([1, 2]), np.array([1, 10]))
    with pytest.raises(ValueError, match="shapes"):
        confusion_matrix(np.array([1, 2]), np.array([1]))


def test_to_json_is_json_with_value_count_per_class_and_confusion():
    requested, predicted = noisy_labels(5, n=40, classes=[1, 7])
    entry = json.loads(json.dumps(classification_scores(requested, predicted).to_json()))
    assert set(entry) == {"value", "count", "macro", "per_class", "confusion", "confusion_axes"}
    assert entry["count"] == 40 and set(entry["per_class"]) == {"1", "7"}
    assert set(entry["per_class"]["7"]) == {"precision", "recall", "f1", "support"}
    assert np.array(entry["confusion"]).shape == (NUM_DIGITS, NUM_DIGITS)
    assert entry["value"] == pytest.approx(np.mean(requested == predicted))


def test_real_held_out_digits_as_generated_images_score_exactly_the_reference():
    _, held = load_digits(32)
    report = adherence(held.images, held.labels)
    reference = reference_scores(32)
    assert report.adherence == report.reference == reference.accuracy > 0.95
    np.testing.assert_array_equal(report.scores.confusion, reference.confusion)
    assert report.per_digit == reference.recall and report.count == len(held)
    assert report.scores.macro_f1 == pytest.approx(reference.macro_f1) and reference.macro_f1 > 0.95


def test_the_report_names_the_reference_next_to_the_generated_scores():
    _, held = load_digits(32)
    sevens = held.images[held.labels == 7]
    entry = json.loads(json.dumps(adherence(sevens, np.full(len(sevens), 7)).to_json()))
    assert list(entry["per_class"]) == ["7"] and entry["per_class"]["7"]["precision"] == 1.0
    assert set(entry["reference"]["per_class"]) == {str(d) for d in range(NUM_DIGITS)}
    assert entry["reference"]["count"] == len(held)


def test_shuffled_requests_score_near_chance():
    _, held = load_digits(32)
    shuffled = np.random.default_rng(0).permutation(held.labels)
    report = adherence(held.images, shuffled)
    assert report.adherence < 0.25 and report.scores.macro_f1 < 0.25 < report.reference


def test_the_table_shows_each_requested_digit_next_to_the_reference():
    _, held = load_digits(32)
    report = adherence(held.images[:40], held.labels[:40])
    lines = report.table().splitlines()
    reference = reference_scores(32)
    assert len(lines) == 1 + len(report.scores.classes) + 2
    first = report.scores.classes[0]
    assert lines[1].split()[:3] == [str(first), f"{report.scores.precision[first]:.3f}",
                                    f"({reference.precision[first]:.3f})"]
    assert lines[-1].startswith(f"accuracy {report.adherence:.3f} ({reference.accuracy:.3f})")
