"""trt_latency.stats: the one median-SE function, checked by simulation on skewed timing-like data."""

from __future__ import annotations

import math

import numpy as np

from trt_latency.stats import median_se, median_se_rel


def _timings(rng: np.random.Generator, size: int) -> np.ndarray:
    """Right-skewed step times: lognormal body, 10% slow visits at 1.3-3x (the shape a shared VM gives)."""
    base = rng.lognormal(0.0, 0.25, size)
    return np.where(rng.random(size) < 0.1, base * rng.uniform(1.3, 3.0, size), base)


def _mad_normal_se(v: np.ndarray) -> float:
    """The formula the fit used before (normal shape assumed): what the order-statistic SE replaced."""
    return 1.2533 * 1.4826 * float(np.median(np.abs(v - np.median(v)))) / math.sqrt(v.shape[0])


def test_two_se_holds_the_true_median_about_95_percent_at_small_n() -> None:
    rng = np.random.default_rng(20261207)
    true = float(np.median(_timings(rng, 1_000_000)))
    trials = 1500
    for n in (5, 10, 20):
        hit = hit_mad = 0
        for _ in range(trials):
            v = _timings(rng, n)
            m = float(np.median(v))
            hit += abs(m - true) <= 1.96 * median_se(v)
            hit_mad += abs(m - true) <= 1.96 * _mad_normal_se(v)
        cover, cover_mad = hit / trials, hit_mad / trials
        assert 0.92 <= cover <= 0.999, (n, cover)
        assert cover > cover_mad, (n, cover, cover_mad)  # the normal formula under-covers on skewed data


def test_edges() -> None:
    assert median_se([1.0, 2.0]) == math.inf
    assert median_se_rel([1.0, 2.0]) == math.inf
    assert median_se_rel([-1.0, -1.0, -1.0]) == math.inf
    assert median_se([3.0, 3.0, 3.0, 3.0]) == 0.0
    # relative = absolute / median
    v = [1.0, 1.1, 1.2, 1.5, 2.0, 1.05, 1.3]
    assert math.isclose(median_se_rel(v), median_se(v) / float(np.median(v)))
