"""The report's figures: PNGs drawn off-screen, the same bytes for the same data."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from stablediff.evaluation.plots import confusion_plot, loss_plot, metric_plot
from stablediff.evaluation.report_data import Confusion, MetricPoint

POINTS = [MetricPoint(10, 40.0, "eval", 0.8, 256), MetricPoint(20, 25.0, "train"), MetricPoint(30, 12.5, "eval")]


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def test_the_loss_plot_has_a_panel_per_stage():
    one = _image(loss_plot({("unet", "train_loss"): [(0, 1.0), (5, 0.5)]}))
    two = _image(loss_plot({("vae", "train_loss"): [(1, 0.2)], ("unet", "val_loss"): [(0, 1.0), (5, 0.5)]}))
    assert two.width > 1.8 * one.width and two.height == one.height


def test_no_losses_give_no_loss_plot():
    assert loss_plot({}) is None


def test_a_metric_plot_is_the_same_png_for_the_same_data():
    first = metric_plot("fd", POINTS, best_step=30)
    assert metric_plot("fd", POINTS, best_step=30) == first
    assert metric_plot("fd", POINTS, best_step=10) != first  # the best step is drawn
    assert _image(first).size == (640, 360)


def test_a_metric_without_a_direction_is_a_bug_not_a_plot():
    with pytest.raises(KeyError, match="unknown metric 'made_up'"):
        metric_plot("made_up", POINTS, best_step=None)


def test_the_confusion_plot_draws_any_square_matrix():
    matrix = [[8, 2, 0], [0, 10, 0], [1, 0, 9]]
    assert _image(confusion_plot(Confusion(40, matrix))).size == (520, 460)
    assert confusion_plot(Confusion(40, matrix)) != confusion_plot(Confusion(40, [[10, 0, 0], [0, 10, 0], [0, 0, 10]]))
