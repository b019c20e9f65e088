"""LogME against known answers: the exact Gaussian marginal, its maximum, and a dense reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from harness.logme import evidence_fit, log_evidence, logme

SHAPES = [(60, 8), (12, 30), (20, 20)]  # N > D, N < D (SVD path), and the N == D boundary


def _data(n, d, k=3, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k  # every class present
    feats = np.eye(k)[labels] @ rng.normal(size=(k, d)) + noise * rng.normal(size=(n, d))
    return feats, labels


def _exact(F, y, alpha, beta):
    """log N(y; 0, F F^T / alpha + I / beta) / N, straight from scipy."""
    n = len(y)
    cov = F @ F.T / alpha + np.eye(n) / beta
    return multivariate_normal(np.zeros(n), cov).logpdf(y) / n


def _dense_fit(F, y, tol=1e-10, max_iter=10_000):
    """Textbook fixed point with explicit D x D matrices, run to convergence; no SVD tricks."""
    n, d = F.shape
    eig = np.linalg.eigvalsh(F.T @ F)  # all D eigenvalues, zeros included
    alpha = beta = 1.0
    for _ in range(max_iter):
        m = beta * np.linalg.solve(alpha * np.eye(d) + beta * F.T @ F, F.T @ y)
        gamma = np.sum(beta * eig / (alpha + beta * eig))
        new_alpha, new_beta = gamma / (m @ m), (n - gamma) / np.sum((y - F @ m) ** 2)
        done = abs(new_alpha / new_beta - alpha / beta) < tol * alpha / beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return _exact(F, y, alpha, beta), alpha, beta


def _dense_logme(F, labels):
    return np.mean([_dense_fit(F, (labels == c).astype(float))[0] for c in np.unique(labels)])


@pytest.mark.parametrize("shape", SHAPES)
def test_evidence_equals_exact_marginal_density(shape):
    F, labels = _data(*shape)
    for c in range(3):
        y = (labels == c).astype(float)
        for alpha, beta in [(0.3, 2.5), (1.0, 1.0), (40.0, 0.05)]:
            exact = _exact(F, y, alpha, beta)
            assert log_evidence(F, y, alpha, beta) == pytest.approx(exact, rel=1e-9)
        ev, alpha, beta = evidence_fit(F, y)
        assert ev == pytest.approx(_exact(F, y, alpha, beta), rel=1e-6)
        assert log_evidence(F, y, alpha, beta) == pytest.approx(ev, rel=1e-12)


# Data on which the fixed point converges well within the iteration cap, for N > D, N == D, N < D.
@pytest.mark.parametrize("shape, seed", [((60, 8), 0), ((20, 20), 2), ((20, 40), 5)])
def test_fitted_alpha_beta_maximise_the_evidence(shape, seed):
    F, labels = _data(*shape, seed=seed)
    for c in range(3):
        y = (labels == c).astype(float)
        _, alpha, beta = evidence_fit(F, y)
        _, ref_alpha, ref_beta = _dense_fit(F, y)
        # the same stationary point as the dense reference
        assert (alpha, beta) == pytest.approx((ref_alpha, ref_beta), rel=1e-4)
        best = _exact(F, y, alpha, beta)
        for fa, fb in [(1.1, 1), (0.9, 1), (1, 1.1), (1, 0.9), (1.1, 1.1), (0.9, 0.9), (1.1, 0.9), (0.9, 1.1)]:
            assert _exact(F, y, fa * alpha, fb * beta) < best


def test_slow_fixed_point_still_reaches_the_maximum_evidence():
    # N < D near interpolation: lam crawls along a direction where the evidence is almost flat,
    # so after the capped iterations alpha, beta may be off but the score must not be.
    F, labels = _data(12, 30, seed=3, noise=3.0)
    y = (labels == 0).astype(float)
    ev, _, _ = evidence_fit(F, y)
    ref, _, _ = _dense_fit(F, y)
    assert ev <= ref + 1e-12
    assert ev == pytest.approx(ref, abs=1e-5)


def test_exactly_fittable_class_approaches_noise_free_limit():
    # N < D: y lies in F's column space, the evidence rises monotonically towards beta -> inf
    # and its supremum is log N(y; 0, F F^T / alpha) / N; the fit must get there, not stall.
    F, labels = _data(12, 30, seed=0)
    y = (labels == 0).astype(float)
    ev, alpha, beta = evidence_fit(F, y)
    assert beta > 1e6
    limit = multivariate_normal(np.zeros(12), F @ F.T / alpha).logpdf(y) / 12
    assert ev == pytest.approx(limit, abs=1e-9)
    assert _exact(F, y, alpha, beta / 2) < ev


def test_informative_features_beat_noise_and_sample_order_is_irrelevant():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 150)
    labels[:4] = np.arange(4)
    onehot = np.eye(4)[labels] + 0.2 * rng.normal(size=(150, 4))
    noise = rng.normal(size=(150, 4))
    assert logme(onehot, labels) > logme(noise, labels) + 0.5
    perm = rng.permutation(150)
    for F in (onehot, noise):
        assert logme(F[perm], labels[perm]) == pytest.approx(logme(F, labels), rel=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_reference(shape):
    F, labels = _data(*shape, seed=3)
    assert logme(F, labels) == pytest.approx(_dense_logme(F, labels), rel=1e-5)


def test_rank_deficient_features_match_dense_reference():
    F, labels = _data(40, 5, seed=4)
    F = np.hstack([F, F[:, :2]])  # N > D but rank 5 < D = 7: zero eigenvalues on the eigh path
    assert logme(F, labels) == pytest.approx(_dense_logme(F, labels), rel=1e-5)


def test_float32_and_float_labels_accepted():
    F, labels = _data(30, 6, seed=5)
    assert logme(F.astype(np.float32), labels.astype(float)) == pytest.approx(
        logme(F.astype(np.float32).astype(np.float64), labels), rel=1e-12
    )


@pytest.mark.parametrize(
    "features, labels, match",
    [
        (np.ones(10), np.arange(10) % 2, "2-D"),
        (np.ones((10, 3)), np.arange(9) % 2, "shape"),
        (np.ones((10, 3)), np.zeros(10, int), "at least 2 classes"),
        (np.full((10, 3), np.nan), np.arange(10) % 2, "NaN or inf"),
        (np.full((10, 3), np.inf), np.arange(10) % 2, "NaN or inf"),
        (np.zeros((10, 3)), np.arange(10) % 2, "all zero"),
        (np.ones((10, 3)), np.linspace(0, 1, 10), "integer"),
        (np.ones((1, 3)), np.array([0]), "at least 2 samples"),
    ],
)
def test_bad_input_raises(features, labels, match):
    with pytest.raises(ValueError, match=match):
        logme(features, labels)


def test_bad_target_or_hyperparameters_raise():
    F, _ = _data(10, 3)
    with pytest.raises(ValueError, match="all zero"):
        evidence_fit(F, np.zeros(10))
    with pytest.raises(ValueError, match="shape"):
        evidence_fit(F, np.ones(9))
    with pytest.raises(ValueError, match="alpha and beta"):
        log_evidence(F, np.ones(10), -1.0, 1.0)
