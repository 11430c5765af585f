"""Split-conformal math on synthetic scores: rank, factors, coverage on exchangeable data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trt_latency.estimator import conformal


def test_rank_is_ceil_n_plus_one_times_one_minus_alpha() -> None:
    assert conformal.conformal_rank(19, 0.05) == 19  # ceil(20 * 0.95) = 19 despite float noise
    assert conformal.conformal_rank(99, 0.1) == 90
    assert conformal.conformal_rank(10, 0.01) == 11  # > n: no finite factor
    assert conformal.conformal_rank(100, 0.2) == 81


def test_factor_is_the_ranked_score_and_inf_when_n_too_small() -> None:
    scores = np.arange(1, 20, dtype=float)  # 1..19
    assert conformal.conformal_factor(scores, 0.05) == 19.0
    assert conformal.conformal_factor(scores, 0.5) == 10.0
    assert math.isinf(conformal.conformal_factor(scores[:18], 0.05))
    assert math.isinf(conformal.conformal_factor([], 0.2))
    assert conformal.min_requests_for(0.05) == 19
    assert conformal.min_requests_for(0.01) == 99


def test_factor_ignores_non_finite_scores() -> None:
    scores = [1.0, 2.0, float("nan"), 3.0, float("inf")]
    assert conformal.conformal_factor(scores, 0.5) == 2.0


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_on_exchangeable_data(alpha: float) -> None:
    # Marginal guarantee: P(new score > factor) <= alpha, averaged over calibration draws.
    rng = np.random.default_rng(7)
    n, trials, violations = 60, 400, 0
    for _ in range(trials):
        scores = rng.lognormal(0.0, 0.1, size=n + 1)
        factor = conformal.conformal_factor(scores[:n], alpha)
        violations += scores[n] > factor
    rate = violations / trials
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    # ... and not absurdly conservative: the bound is within 1/(n+1) of exact.
    assert rate >= alpha - 1 / (n + 1) - 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_fit_scores_stores_center_and_drops_unbackable_levels() -> None:
    rng = np.random.default_rng(1)
    fit = conformal.fit_scores((0, 1, 4), rng.lognormal(0, 0.05, 40))
    assert fit.n == 40
    assert 0.5 in fit.alphas and all(a in fit.alphas for a in conformal.DEFAULT_ALPHAS)
    # 40 scores back 0.05 and above, not 0.01 / 0.02
    assert set(fit.unavailable) == {0.01, 0.02}
    stored = fit.as_dict()
    assert 0.01 not in stored["alphas"] and stored["n"] == 40
    assert stored["factors"] == sorted(stored["factors"], reverse=True)
    assert all(math.isfinite(f) for f in stored["factors"])
    assert fit.factor(0.05) >= fit.factor(0.2) >= fit.factor(0.5)
