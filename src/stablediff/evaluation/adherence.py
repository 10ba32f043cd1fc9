"""Prompt adherence on digits: does a classifier read the digit the prompt asked for?

The classifier is an RBF support-vector machine fit on the real training split,
after the same 32x32 -> 8x8 reduction applied to generated images, so real and
generated digits are judged through the same lens. Its scores on the real
held-out split are the reference a perfect generator would reach.

Beyond accuracy (the share read as asked, "adherence"), the report carries
per-class precision, recall and F1 and the 10x10 confusion matrix (rows: the
digit requested, columns: the digit read). Recall of c is adherence on the
prompts for c; precision of c says how many of the images read as c were asked
for as c, so a model that draws an 8 for every prompt shows up as a low
precision of 8 even where the 8 prompts all hit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stablediff.data.digits import downscale_to_raw, load_digits

NUM_DIGITS = 10


def confusion_matrix(requested: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_DIGITS) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = requested class, column = predicted class."""
    requested, predicted = np.asarray(requested, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if requested.shape != predicted.shape or requested.ndim != 1:
        raise ValueError(f"requested {requested.shape} and predicted {predicted.shape} must be equal 1-D shapes")
    for name, labels in (("requested", requested), ("predicted", predicted)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    flat = np.bincount(requested * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def precision_recall_f1(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a confusion matrix (rows requested, columns predicted).

    Precision of c divides by every image read as c (column c, whatever was requested); recall of c by every
    image requested as c (row c). A 0/0 is 0, as sklearn's zero_division=0: a class never read scores 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    precision = _ratio(hits, confusion.sum(axis=0))
    recall = _ratio(hits, confusion.sum(axis=1))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return precision, recall, f1


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64),
                     where=denominator > 0)


@dataclass(frozen=True, eq=False)
class ClassificationScores:
    """Scores of `predicted` against `requested` labels over `classes` (the classes that were requested).

    Precision of a class counts every image read as it, also those requested as a class outside `classes`:
    the confusion matrix always spans all NUM_DIGITS classes. Macro averages are over `classes`.
    """

    accuracy: float
    count: int
    classes: tuple[int, ...]
    precision: dict[int, float]
    recall: dict[int, float]
    f1: dict[int, float]
    support: dict[int, int]  # images requested per class
    confusion: np.ndarray  # (NUM_DIGITS, NUM_DIGITS) int64, read-only; rows requested, columns predicted

    @property
    def macro_precision(self) -> float:
        return _mean(self.precision)

    @property
    def macro_recall(self) -> float:
        return _mean(self.recall)

    @property
    def macro_f1(self) -> float:
        return _mean(self.f1)

    def to_json(self) -> dict:
        """JSON-ready: value (accuracy), count, macro averages, per class (keys are digit strings), confusion."""
        return {"value": self.accuracy, "count": self.count,
                "macro": {"precision": self.macro_precision, "recall": self.macro_recall, "f1": self.macro_f1},
                "per_class": {str(c): {"precision": self.precision[c], "recall": self.recall[c], "f1": self.f1[c],
                                       "support": self.support[c]} for c in self.classes},
                "confusion": self.confusion.tolist(), "confusion_axes": ["requested", "predicted"]}


def _mean(values: dict[int, float]) -> float:
    return float(np.mean(list(values.values()))) if values else 0.0


def classification_scores(requested: np.ndarray, predicted: np.ndarray,
                          num_classes: int = NUM_DIGITS) -> ClassificationScores:
    """Accuracy, per-class precision/recall/F1 for each requested class, and the full confusion matrix."""
    requested = np.asarray(requested, dtype=np.int64)
    confusion = confusion_matrix(requested, predicted, num_classes)
    confusion.setflags(write=False)  # the reference scores are cached and shared
    precision, recall, f1 = precision_recall_f1(confusion)
    classes = tuple(int(c) for c in np.unique(requested))
    count = int(confusion.sum())
    accuracy = float(np.trace(confusion) / count) if count else 0.0
    return ClassificationScores(
        accuracy=accuracy, count=count, classes=classes,
        precision={c: float(precision[c]) for c in classes}, recall={c: float(recall[c]) for c in classes},
        f1={c: float(f1[c]) for c in classes}, support={c: int(confusion[c].sum()) for c in classes},
        confusion=confusion)


@dataclass(frozen=True, eq=False)
class AdherenceReport:
    adherence: float  # share of generated images read as the requested digit (= scores.accuracy)
    reference: float  # the classifier's accuracy on real held-out digits (= reference_scores.accuracy)
    per_digit: dict[int, float]  # adherence per requested digit (= scores.recall)
    count: int
    scores: ClassificationScores  # the generated images
    reference_scores: ClassificationScores  # the real held-out split, through the same classifier

    def to_json(self) -> dict:
        """The generated images' scores (value = adherence, count, macro, per_class, confusion) and, under
        "reference", the same for the real held-out split: the shape of an eval.json metric entry."""
        return {**self.scores.to_json(), "reference": self.reference_scores.to_json()}

    def table(self) -> str:
        """Per requested digit: precision, recall and F1, each next to the real held-out digits' (in brackets);
        then the macro averages and accuracy. Plain text for a terminal or a Markdown code block."""
        gen, ref = self.scores, self.reference_scores
        lines = [f"{'digit':>5} {'precision':>15} {'recall':>15} {'F1':>15} {'images':>6}"]
        for c in gen.classes:
            cells = [_pair(getattr(gen, m)[c], getattr(ref, m).get(c)) for m in ("precision", "recall", "f1")]
            lines.append(f"{c:>5} " + " ".join(f"{cell:>15}" for cell in cells) + f" {gen.support[c]:>6}")
        macro = [_pair(getattr(gen, f"macro_{m}"), getattr(ref, f"macro_{m}")) for m in ("precision", "recall", "f1")]
        lines.append(f"{'macro':>5} " + " ".join(f"{cell:>15}" for cell in macro) + f" {gen.count:>6}")
        lines.append(f"accuracy {_pair(gen.accuracy, ref.accuracy)} (real held-out digits in brackets)")
        return "\n".join(lines)


def _pair(value: float, reference: float | None) -> str:
    return f"{value:.3f} ({reference:.3f})" if reference is not None else f"{value:.3f}"


@lru_cache(maxsize=2)
def digit_classifier(resolution: int = 32):
    from sklearn.svm import SVC

    train, _ = load_digits(resolution)
    return SVC(gamma=0.001, C=10.0).fit(downscale_to_raw(train.images), train.labels)


def classify_digits(images: np.ndarray, resolution: int = 32) -> np.ndarray:
    """(N,) int64 digits the classifier reads in (N, R, R, 3) uint8 images."""
    return digit_classifier(resolution).predict(downscale_to_raw(images)).astype(np.int64)


@lru_cache(maxsize=2)
def reference_scores(resolution: int = 32) -> ClassificationScores:
    """The classifier's scores on the real held-out split: what a generator that draws real digits reaches."""
    _, held = load_digits(resolution)
    return classification_scores(held.labels, classify_digits(held.images, resolution))


def reference_accuracy(resolution: int = 32) -> float:
    return reference_scores(resolution).accuracy


def adherence(images: np.ndarray, requested: np.ndarray | Sequence[int], resolution: int = 32) -> AdherenceReport:
    """images (N, R, R, 3) uint8 generated for the digits in `requested` (N,)."""
    scores = classification_scores(np.asarray(requested), classify_digits(images, resolution))
    reference = reference_scores(resolution)
    return AdherenceReport(scores.accuracy, reference.accuracy, dict(scores.recall), scores.count, scores,
                           reference)


def generated_adherence(pipe, digits: Iterable[int], per_digit: int, *, steps: int = 20, guidance_scale: float = 3.0,
                        seed: int = 1000, resolution: int = 32,
                        stop: Callable[[], None] | None = None,
                        prompts: dict[int, str] | None = None) -> AdherenceReport:
    """`per_digit` images of "a handwritten digit <word>" (or `prompts[digit]`) for each digit (seeds from
    `seed`), classified."""
    from stablediff.data.digits import NUMBER_WORDS
    from stablediff.inference.pipeline import images_to_array, txt2img

    images, requested = [], []
    for digit in digits:
        if stop is not None:
            stop()
        prompt = (prompts or {}).get(digit, f"a handwritten digit {NUMBER_WORDS[digit]}")
        batch = txt2img(pipe, prompt, steps=steps,
                        guidance_scale=guidance_scale, seed=seed, num=per_digit)
        images += batch
        requested += [digit] * len(batch)
    return adherence(images_to_array(images), np.array(requested), resolution)
