"""Knot selection on known truths (issue 18): the count the one-standard-error rule decides, the knot
positions, and greedy_knots' candidate range reaching the first and last interior positions."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.fit_data import POSITIONS

from trt_latency.estimator.fit import fit_decode, greedy_knots

X = np.array(POSITIONS, dtype=np.float64)  # the default sweep grid: 19 positions, 1 .. 4096


def hinge(L: np.ndarray) -> np.ndarray:
    """Two straight pieces meeting at 2048: three knots (1, 2048, 4096) state it exactly."""
    return 1.0 + 1e-4 * L + 6e-4 * np.maximum(L - 2048.0, 0.0)


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_one_se_rule_keeps_the_true_three_knots(seed: int) -> None:
    """0.4% noise: the lowest CV score sits at 6-8 knots (noise fitted), but 3 knots are within one
    standard error of it, so the rule keeps 3, at the true kink."""
    rng = np.random.default_rng(seed)
    y = hinge(X) * (1.0 + 0.004 * rng.standard_normal(X.shape[0]))
    fit = fit_decode(X, y)
    best = min(fit.cv_scores, key=lambda k: fit.cv_scores[k])
    assert best > 3, fit.cv_scores  # the rule, not the minimum, decides this case
    assert fit.cv_scores[3] > fit.cv_scores[best]
    assert len(fit.knots) == 3, fit.knots
    assert fit.knots[0] == X[0] and fit.knots[-1] == X[-1]
    assert abs(fit.knots[1] - 2048.0) <= 0.1 * 2048.0, fit.knots
    truth = hinge(fit.knots)
    assert np.max(np.abs(fit.values / truth - 1.0)) < 0.01


@pytest.mark.parametrize("j", [1, len(POSITIONS) - 2])
def test_greedy_reaches_the_first_and_last_interior_position(j: int) -> None:
    """An exact kink at X[1] or X[-2]: forward selection must be able to pick it as the third knot."""
    kink = X[j]
    y = 1.0 + 2e-4 * X + (0.05 if j == 1 else 2e-3) * np.maximum(X - kink, 0.0) * (-1.0 if j == 1 else 1.0)
    y = np.maximum.accumulate(y)  # j = 1: steep rise to X[1], then the gentle slope (kept monotone)
    sets = greedy_knots(X, y, 3)
    assert [s.tolist() for s in sets[:2]] == [[X[0], X[-1]], sorted([X[0], kink, X[-1]])]
