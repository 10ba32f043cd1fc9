"""Fréchet distance (FD, FID in Inception space) and kernel inception distance (KID) between two sets of features.

Both compare generated features with real ones, in whatever feature space the caller
chose (the built-in digits network, Inception): 0 means the two sets look alike.

- FD fits a Gaussian to each set and measures the distance between the two Gaussians:
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). Statistics are float64 (float32 turns
  NaN/inf at tens of thousands of samples, TTUR #29) and can be accumulated batch by
  batch. FD is biased upwards at small sample counts, and below the feature dimension
  the covariance is rank-deficient: the number is still finite here, but not
  comparable with one from more samples (`Score.warning` says so).
- KID is the unbiased MMD^2 under the cubic polynomial kernel (x.y/d + 1)^3, averaged
  over seeded random subsets (Bińkowski et al. 2018). It is unbiased at any sample
  count, and its standard deviation over the subsets comes with it; prefer it for
  small sets.

Each returns a `Score`: the value, its spread, and the sample counts it rests on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from stablediff.errors import DataError


class SampleCountWarning(UserWarning):
    """A score rests on fewer samples than its feature space has dimensions."""


@dataclass(frozen=True)
class Score:
    """One metric's result, JSON-ready via `to_json()` (eval.json, metrics.jsonl)."""

    metric: str  # "fd", "kid"
    value: float
    spread: float | None  # KID: standard deviation over subsets; FD: None (one number, no resampling)
    count: int  # generated (first) samples
    reference_count: int  # real (second) samples
    feature_dim: int
    warning: str | None = None  # set when the score is not to be trusted as is (too few samples)

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.value, "spread": self.spread, "count": self.count,
                "reference_count": self.reference_count, "feature_dim": self.feature_dim,
                "warning": self.warning}


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D) of `count` feature vectors, float64."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return len(self.mean)


class StatsAccumulator:
    """Mean and covariance of features that arrive batch by batch, without keeping them.

    Each batch is reduced to (count, mean, centred scatter) and merged with Chan et
    al.'s pairwise update. Summing raw x and x x^T instead would lose the covariance to
    cancellation when the mean is large against the spread (a feature offset of 1e4 is
    enough in float64 to leave few correct digits).
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of (x - mean)(x - mean)^T, (D, D)

    def add(self, features: np.ndarray) -> None:
        batch = _as_features(features)
        if self._mean is not None and batch.shape[1] != len(self._mean):
            raise ValueError(f"feature batch has dimension {batch.shape[1]}, earlier batches {len(self._mean)}")
        n = len(batch)
        if n == 0:
            return
        mean = batch.mean(axis=0)
        centred = batch - mean
        scatter = centred.T @ centred
        if self._mean is None:
            self.count, self._mean, self._scatter = n, mean, scatter
            return
        total = self.count + n
        delta = mean - self._mean
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total

    def stats(self) -> GaussianStats:
        if self.count < 2:
            raise DataError(f"a Fréchet distance needs at least 2 samples in each set to estimate a covariance; "
                            f"got {self.count}. Evaluate on more images (--num-samples).")
        return GaussianStats(self._mean.copy(), self._scatter / (self.count - 1), self.count)


def feature_stats(features: np.ndarray) -> GaussianStats:
    """Statistics of a whole (N, D) feature array at once."""
    accumulator = StatsAccumulator()
    accumulator.add(features)
    return accumulator.stats()


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), in float64.

    tr((S_a S_b)^(1/2)) is taken as sum(sqrt(eig(R S_b R))) with R = S_a^(1/2): S_a S_b is
    similar to the symmetric PSD matrix R S_b R, so its eigenvalues are real and >= 0 and
    two symmetric eigendecompositions give them. scipy.linalg.sqrtm(S_a @ S_b), what
    clean-fid and pytorch-fid use, works on the non-symmetric product through a complex
    Schur form: rounding leaves imaginary parts that clean-fid drops silently, it fails
    on the singular covariances of small sample counts (hence their eps retry), and a
    scipy release broke it (pytorch-fid #100). Here there is nothing imaginary to drop;
    the analogue, a clearly negative eigenvalue, means a covariance was not PSD, and
    raises instead of being clipped away.
    """
    if a.dim != b.dim:
        raise ValueError(f"the two feature sets have dimensions {a.dim} and {b.dim}")
    root_a = _psd_sqrt(a.cov, "first covariance")
    product = _symmetric(root_a @ _symmetric(b.cov) @ root_a)
    trace_sqrt = float(np.sqrt(_clip_psd(np.linalg.eigvalsh(product), "covariance product")).sum())
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt)


def frechet_distance(generated: np.ndarray | GaussianStats, reference: np.ndarray | GaussianStats) -> Score:
    """FD between generated and reference (real) features, each an (N, D) array or precomputed stats."""
    a = generated if isinstance(generated, GaussianStats) else feature_stats(generated)
    b = reference if isinstance(reference, GaussianStats) else feature_stats(reference)
    value = frechet_distance_from_stats(a, b)
    return Score("fd", value, None, a.count, b.count, a.dim, _low_count_warning("FD", a.count, b.count, a.dim))


def kernel_inception_distance(generated: np.ndarray, reference: np.ndarray, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> Score:
    """KID: mean and standard deviation of the unbiased MMD^2 over `num_subsets` seeded subsets.

    Each subset draws m = min(n_generated, n_reference, subset_size) samples from each set
    without replacement (clean-fid's and torch-fidelity's protocol), from a private
    generator seeded with `seed`: two calls give the same number (clean-fid's draws
    are unseeded). The spread is the population standard deviation over subsets, as
    torch-fidelity reports it.
    """
    x, y = _as_features(generated), _as_features(reference)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the two feature sets have dimensions {x.shape[1]} and {y.shape[1]}")
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise DataError(f"KID needs at least 2 samples in each set; got {len(x)} generated and {len(y)} real. "
                        f"Evaluate on more images (--num-samples).")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    estimates = np.array([
        unbiased_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(num_subsets)])
    return Score("kid", float(estimates.mean()), float(estimates.std()), len(x), len(y), x.shape[1])


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of (m, D) and (n, D) samples under k(a, b) = (a.b/D + 1)^3.

    The within-set means leave out the diagonal k(x_i, x_i): that is what makes the
    estimate unbiased (and able to go slightly below 0 when the sets match).
    """
    dim = x.shape[1]
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    m, n = len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be an (N, D) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinity")
    return array


def _low_count_warning(metric: str, count: int, reference_count: int, dim: int) -> str | None:
    """A message (also issued as a SampleCountWarning) when a set has fewer samples than dimensions.

    Only FD gets it: its covariance is then rank-deficient and the value depends
    strongly on N. KID is unbiased at any N, and its spread already shows the noise.
    """
    if min(count, reference_count) >= dim:
        return None
    message = (f"{metric} from {count} generated and {reference_count} real samples in a {dim}-dimensional "
               f"feature space: with fewer samples than dimensions the covariance is rank-deficient and {metric} "
               f"is strongly biased; compare it only with scores from the same sample counts, or use KID")
    warnings.warn(message, SampleCountWarning, stacklevel=3)
    return message


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2.0


def _clip_psd(eigenvalues: np.ndarray, what: str) -> np.ndarray:
    """Eigenvalues of a symmetric matrix that should be PSD, with rounding negatives set to 0.

    Rounding in a float64 eigendecomposition leaves eigenvalues of about
    -1e-16 * D * max|eigenvalue|; anything clearly below that is an input error.
    """
    tolerance = 1e-10 * float(np.abs(eigenvalues).max(initial=0.0))
    if eigenvalues.min(initial=0.0) < -tolerance:
        raise ValueError(f"the {what} is not positive semi-definite (eigenvalue {eigenvalues.min():.3g}); "
                         f"covariances must come from real feature statistics")
    return np.clip(eigenvalues, 0.0, None)


def _psd_sqrt(matrix: np.ndarray, what: str) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh(_symmetric(matrix))
    return (vectors * np.sqrt(_clip_psd(eigenvalues, what))) @ vectors.T
