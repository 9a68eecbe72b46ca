"""The scores, on features and logits: FID, KID and Inception Score (see ``evaluation`` for the recipe)."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1) of (N, D) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors of shape (N, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) of two Gaussians, in float64.

    S1 S2 has the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2, so tr sqrt(S1 S2) is the
    sum of their square roots: no complex arithmetic, and a singular S1 or S2 is no special case.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes do not match (mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape})"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: the statistics hold NaN or infinite values")
    root = _psd_sqrt(sigma1)
    product = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and standard deviation over subsets of the unbiased MMD^2 with kernel (x.y/d + 1)^3."""
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_aa, k_bb, k_ab = ((p @ q.T / d + 1.0) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        values[i] = within - 2.0 * k_ab.sum() / (m * m)
    return float(values.mean()), float(values.std())


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and standard deviation over consecutive splits of exp(E KL(p(y|x) || p(y)))."""
    log_p = log_softmax(np.asarray(logits, np.float64), axis=1)
    n = len(log_p)
    splits = max(1, min(splits, n))
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(chunk)
        log_marginal = np.log(p.mean(axis=0))
        scores.append(np.exp((p * (chunk - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
