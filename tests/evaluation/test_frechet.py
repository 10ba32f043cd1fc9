"""Fréchet distance and KID: closed forms, an independent implementation, and the sample-count rules.

The independent implementation is torchmetrics' FrechetInceptionDistance and
KernelInceptionDistance, fed our feature arrays through an identity feature module (their
public way to use custom features). torch-fidelity and clean-fid, the two the issue names,
cannot be imported here: both import torchvision at package import, and PyPI's torchvision
does not import against torch 2.13.0+cpu. pytorch-fid's and torch-fidelity's own procedures
(np.cov statistics, then scipy's sqrtm or the eigenvalues of the covariance product) are also
written out below as two more references.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from sklearn.metrics.pairwise import polynomial_kernel

from stablediff.errors import DataError
from stablediff.evaluation.frechet import (GaussianStats, SampleCountWarning, StatsAccumulator, feature_stats,
                                           frechet_distance, frechet_distance_from_stats,
                                           kernel_inception_distance, unbiased_mmd2)


def correlated_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def sqrtm_reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance, as a reference: sqrtm of the non-symmetric product."""
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_x @ cov_y)
    if np.iscomplexobj(covmean):
        assert np.abs(np.diagonal(covmean).imag).max() < 1e-3
        covmean = covmean.real
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2 * np.trace(covmean))


def test_fd_of_isotropic_gaussians_is_the_closed_form():
    # N(0, I) vs N(mu, s^2 I): tr(I + s^2 I - 2 (s^2 I)^(1/2)) = D (1 - s)^2
    dim, s = 16, 0.3
    mu = np.linspace(-1, 1, dim)
    a = GaussianStats(np.zeros(dim), np.eye(dim), 1000)
    b = GaussianStats(mu, s**2 * np.eye(dim), 1000)
    assert frechet_distance_from_stats(a, b) == pytest.approx(mu @ mu + dim * (1 - s) ** 2, rel=1e-12)


def test_fd_of_commuting_gaussians_is_the_closed_form_in_any_rotation():
    # Covariances diagonal in one (rotated) basis: tr(...) = sum (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    dim = 12
    var_a, var_b = rng.uniform(0.1, 4, dim), rng.uniform(0.1, 4, dim)
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = GaussianStats(rotation @ mu_a, rotation @ np.diag(var_a) @ rotation.T, 100)
    b = GaussianStats(rotation @ mu_b, rotation @ np.diag(var_b) @ rotation.T, 100)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance_from_stats(a, b) == pytest.approx(expected, rel=1e-10)


def eigvals_reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """torch-fidelity's route, as a second reference: sum of sqrt(eigenvalues of the product)."""
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_x @ cov_y).astype(complex)).real.sum()
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_sqrt)


@pytest.mark.parametrize("n, dim", [(400, 32), (1500, 128)])
def test_fd_agrees_with_independent_implementations_on_the_same_features(n, dim):
    x = correlated_features(n, dim, seed=1)
    y = correlated_features(n + 37, dim, seed=2, shift=0.2) * 1.3
    ours = frechet_distance(x, y).value
    assert ours == pytest.approx(sqrtm_reference_fd(x, y), rel=1e-6)
    assert ours == pytest.approx(eigvals_reference_fd(x, y), rel=1e-6)
    assert frechet_distance(y, x).value == pytest.approx(ours, rel=1e-9)


class FeatureArrays(torch.nn.Module):
    """torchmetrics' "custom feature extractor": the features themselves, in float64."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def torchmetrics_fd(x: np.ndarray, y: np.ndarray) -> float:
    metric = FrechetInceptionDistance(feature=FeatureArrays(x.shape[1]))
    metric.update(torch.from_numpy(y), real=True)
    metric.update(torch.from_numpy(x), real=False)
    return float(metric.compute())


@pytest.mark.parametrize("n, dim", [(400, 32), (1500, 128)])
def test_fd_agrees_with_torchmetrics_fed_the_same_features(n, dim):
    x = correlated_features(n, dim, seed=1)
    y = correlated_features(n + 37, dim, seed=2, shift=0.2) * 1.3
    assert frechet_distance(x, y).value == pytest.approx(torchmetrics_fd(x, y), rel=1e-6)


def test_kid_on_the_whole_sets_agrees_with_torchmetrics():
    # One "subset" as large as both sets is the whole unbiased MMD^2 (degree 3, gamma 1/dim, coef 1),
    # the same number whatever permutation either side draws.
    x, y = correlated_features(120, 16, seed=19), correlated_features(120, 16, seed=20, shift=0.3)
    metric = KernelInceptionDistance(feature=FeatureArrays(16), subsets=1, subset_size=120)
    metric.update(torch.from_numpy(y), real=True)
    metric.update(torch.from_numpy(x), real=False)
    theirs, _ = metric.compute()
    ours = kernel_inception_distance(x, y, num_subsets=1, subset_size=120)
    assert ours.value == pytest.approx(float(theirs), rel=1e-9)


def test_fd_of_a_set_with_itself_is_zero():
    x = correlated_features(300, 24, seed=3)
    total_variance = np.trace(np.cov(x, rowvar=False))
    assert abs(frechet_distance(x, x).value) < 1e-9 * total_variance


def test_fd_below_the_feature_dimension_is_finite_warns_and_reports_counts():
    x, y = correlated_features(20, 64, seed=4), correlated_features(30, 64, seed=5)
    with pytest.warns(SampleCountWarning, match="20 generated and 30 real"):
        score = frechet_distance(x, y)
    assert np.isfinite(score.value) and score.value > 0
    assert (score.count, score.reference_count, score.feature_dim) == (20, 30, 64)
    assert "rank-deficient" in score.warning


def test_fd_with_enough_samples_has_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score = frechet_distance(correlated_features(100, 8, 6), correlated_features(100, 8, 7))
    assert score.warning is None and score.spread is None


def test_streamed_statistics_equal_one_shot_ones_even_far_from_the_origin():
    features = correlated_features(1000, 16, seed=8, shift=1e6)
    accumulator = StatsAccumulator()
    for start, stop in [(0, 1), (1, 130), (130, 131), (131, 700), (700, 1000)]:
        accumulator.add(features[start:stop])
    stats = accumulator.stats()
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-8)


def test_stats_accept_float32_features_and_compute_in_float64():
    stats = feature_stats(correlated_features(50, 4, seed=9).astype(np.float32))
    assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64


def test_a_covariance_that_is_not_psd_is_refused():
    good = GaussianStats(np.zeros(3), np.eye(3), 10)
    bad = GaussianStats(np.zeros(3), np.diag([1.0, 1.0, -0.5]), 10)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance_from_stats(bad, good)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance_from_stats(good, bad)


def test_fewer_than_two_samples_is_a_data_error():
    with pytest.raises(DataError, match="at least 2 samples"):
        frechet_distance(np.ones((1, 4)), np.ones((5, 4)))
    with pytest.raises(DataError, match="at least 2 samples"):
        kernel_inception_distance(np.ones((1, 4)), np.ones((5, 4)))


def test_mismatched_feature_dimensions_are_refused():
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))


def test_scores_are_json_ready():
    score = kernel_inception_distance(correlated_features(40, 8, 10), correlated_features(60, 8, 11),
                                      num_subsets=5)
    data = json.loads(json.dumps(score.to_json()))
    assert data["metric"] == "kid" and data["count"] == 40 and data["reference_count"] == 60
    assert data["spread"] == score.spread and data["value"] == score.value


def test_unbiased_mmd2_matches_an_independent_polynomial_kernel():
    x, y = correlated_features(30, 6, seed=12), correlated_features(25, 6, seed=13, shift=0.5)
    k = lambda a, b: polynomial_kernel(a, b, degree=3, gamma=1 / 6, coef0=1)  # noqa: E731
    k_xx, k_yy = k(x, x), k(y, y)
    expected = ((k_xx.sum() - np.trace(k_xx)) / (30 * 29) + (k_yy.sum() - np.trace(k_yy)) / (25 * 24)
                - 2 * k(x, y).mean())
    assert unbiased_mmd2(x, y) == pytest.approx(expected, rel=1e-12)


def test_kid_of_one_distribution_is_near_zero_and_of_a_shifted_one_clearly_positive():
    real = correlated_features(600, 16, seed=14)
    same = kernel_inception_distance(correlated_features(600, 16, seed=15), real, num_subsets=20, subset_size=300)
    shifted = kernel_inception_distance(correlated_features(600, 16, seed=16, shift=0.5), real,
                                        num_subsets=20, subset_size=300)
    assert abs(same.value) < 3 * same.spread + 1e-3
    assert shifted.value > 20 * max(abs(same.value), same.spread)
    assert shifted.spread > 0


def test_kid_is_seeded():
    x, y = correlated_features(80, 8, seed=17), correlated_features(90, 8, seed=18, shift=0.1)
    first = kernel_inception_distance(x, y, num_subsets=10, subset_size=50, seed=3)
    assert kernel_inception_distance(x, y, num_subsets=10, subset_size=50, seed=3) == first
    assert kernel_inception_distance(x, y, num_subsets=10, subset_size=50, seed=4).value != first.value


def test_kid_subsets_are_as_large_as_the_smaller_set_allows():
    # With one subset covering both sets whole (m = n), KID is the full-sample estimate.
    x, y = correlated_features(40, 8, seed=19), correlated_features(40, 8, seed=20, shift=0.3)
    score = kernel_inception_distance(x, y, num_subsets=1, subset_size=1000)
    assert score.value == pytest.approx(unbiased_mmd2(x, y), rel=1e-12)
    assert score.spread == 0.0 and (score.count, score.reference_count) == (40, 40)
