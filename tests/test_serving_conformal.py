"""Split-conformal math on synthetic scores: rank, factors, coverage on exchangeable data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trt_latency.serving import conformal


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


def _synthetic_log(path, est, n: int, sigma: float, seed: int) -> None:  # type: ignore[no-untyped-def]
    from trt_latency.estimator.requests import append_requests

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        v, t, out = int(rng.choice([0, 64, 256])), int(rng.integers(8, 257)), int(rng.integers(2, 49))
        pred = est.predict(v, t, out, tier_idx=0, top_k=1, num_active_blocks=4)
        noise = float(rng.lognormal(0.05, sigma))
        rows.append({"request_id": i, "vision_tokens": v, "text_tokens": t, "output_tokens": out, "tier_idx": 0,
                     "top_k": 1, "num_active_blocks": 4, "ttft_ms": pred.prefill_ms * noise,
                     "total_ms": pred.total_ms * noise})
    append_requests(path, rows)


def test_calibrate_from_log_stores_factors_and_reports_coverage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from helpers.admission import make_calibration

    from trt_latency.estimator.calibration import load_calibration, save_calibration
    from trt_latency.estimator.model import Estimator

    cal_path = tmp_path / "calibration.yaml"
    save_calibration(make_calibration(), cal_path)
    log = tmp_path / "requests.csv"
    _synthetic_log(log, Estimator(make_calibration()), 400, 0.05, seed=2)
    out = conformal.calibrate_from_log(cal_path, log)
    stored = load_calibration(cal_path).config(0, 1, 4).conformal
    assert stored is not None and stored["n"] == 400 and stored["alphas"] == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    assert out["factors"]["0,1,4"] == stored
    # The factors are quantiles of lognormal(0.05, 0.05): the 0.05 level near exp(0.05 + 1.645 * 0.05).
    assert stored["factors"][2] == pytest.approx(math.exp(0.05 + 1.645 * 0.05), rel=0.03)
    (config,) = out["coverage"]["configs"]
    assert config["n_fit"] == 200 and config["n_check"] == 200
    for level in config["levels"]:  # held-out violation rate near alpha (binomial slack)
        assert level["violation_rate"] <= level["alpha"] + 3 * math.sqrt(level["alpha"] / 200) + 0.01
    # admit(alpha=) now uses the stored factor
    est = Estimator.load(cal_path)
    d = est.admit(1e6, 64, 40, max_new_tokens=16, tier_idx=0, top_k=1, num_active_blocks=4, alpha=0.05)
    assert "conformal" in d.reason


def test_log_rows_without_block_count_go_to_the_largest_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from helpers.admission import make_calibration

    from trt_latency.estimator.model import Estimator

    est = Estimator(make_calibration())
    fits = {(0, 1, 0): conformal.fit_scores((0, 1, 0), [1.0] * 30)}
    cal = conformal.attach_conformal(make_calibration(), fits)
    assert cal.config(0, 1, 4).conformal["n"] == 30
    cols = {"vision_tokens": np.array([64, -5]), "text_tokens": np.array([40, 1]), "output_tokens": np.array([8, 8]),
            "tier_idx": np.array([0, 0]), "top_k": np.array([1, 1]), "num_active_blocks": np.array([0, 0]),
            "total_ms": np.array([est.predict(64, 40, 8).total_ms * 1.1, 5.0])}
    scored = conformal.request_scores(est, cols)
    assert list(scored.scores) == [(0, 1, 0)] and scored.scores[(0, 1, 0)] == pytest.approx([1.1])
    assert sum(scored.skipped.values()) == 1  # the negative prompt is counted, not fatal
