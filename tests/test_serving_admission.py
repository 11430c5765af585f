"""AdmissionController: online correction, outliers, bounded memory, threads, policies."""

from __future__ import annotations

import math
import threading

import pytest
from helpers.admission import KEY, make_calibration, req, true_total

from trt_latency.estimator.model import Estimator
from trt_latency.serving.admission import AdmissionController, Request
from trt_latency.serving.conformal import fit_scores


@pytest.fixture()
def estimator() -> Estimator:
    return Estimator(make_calibration())


def test_no_correction_before_min_observations(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None, window=16, min_observations=6)
    r = req()
    for _ in range(5):
        ctl.observe(r, *true_total(estimator, r, slow=2.0))
    assert ctl.correction(r) == 1.0
    ctl.observe(r, *true_total(estimator, r, slow=2.0))
    assert ctl.correction(r) == pytest.approx(2.0)


def test_correction_follows_a_step_change_within_half_a_window(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None, window=32, min_observations=8)
    r = req()
    for _ in range(100):
        ctl.observe(r, *true_total(estimator, r))
    assert ctl.correction(r) == pytest.approx(1.0)
    steps = 0
    while ctl.correction(r) < 1.49:
        ctl.observe(r, *true_total(estimator, r, slow=1.5))
        steps += 1
        assert steps <= 17, "a window median must flip after window/2 + 1 new observations"
    assert steps == 17
    # A tight budget that fits the old speed but not the new one is now rejected.
    _, total = true_total(estimator, r)
    assert not ctl.decide(req(budget=total * 1.2)).admit
    assert AdmissionController(estimator, alpha=None).decide(req(budget=total * 1.2)).admit


def test_decode_and_prefill_drift_are_separated(estimator: Estimator) -> None:
    # A per-decode-step stall slows long requests much more than short ones: one window per
    # component gives each request its own correction.
    ctl = AdmissionController(estimator, alpha=None, window=16, min_observations=4)
    for n in (2, 8, 32, 64) * 10:
        r = req(n=n)
        ttft, total = true_total(estimator, r)
        ctl.observe(r, ttft, total + 0.5 * (n - 1))  # +0.5 ms per decode step
    for n in (2, 64):
        r = req(n=n)
        ttft, total = true_total(estimator, r)
        expected = (total + 0.5 * (n - 1)) / total
        assert ctl.correction(r) == pytest.approx(expected, rel=0.02)


def test_a_single_outlier_does_not_swing_the_correction(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None, window=16, min_observations=4)
    r = req()
    for _ in range(20):
        ctl.observe(r, *true_total(estimator, r))
    ttft, total = true_total(estimator, r)
    ctl.observe(r, ttft * 100, total * 100)
    assert ctl.correction(r) == pytest.approx(1.0)
    assert ctl.counters()["violations"] == 0  # budget 1e6 is not exceeded


def test_correction_is_clamped(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None, window=8, min_observations=2, clamp=(0.8, 1.25))
    r = req()
    for _ in range(8):
        ctl.observe(r, *true_total(estimator, r, slow=10.0))
    assert ctl.correction(r) == pytest.approx(1.25)
    for _ in range(8):
        ctl.observe(r, *true_total(estimator, r, slow=0.1))
    assert ctl.correction(r) == pytest.approx(0.8)


def _simulate(est: Estimator, ctl: AdmissionController, n: int, step_at: int, step: float,
              sigma: float, seed: int) -> list[tuple[bool, bool, bool]]:
    """Synthetic serving loop: true total = raw prediction * drift * lognormal noise.
    Returns (admitted, oracle_admit, violation) per request; the controller sees admitted ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = Request(int(rng.choice([0, 64, 256])), int(rng.integers(8, 257)), int(rng.integers(2, 49)), 0, 1, 4, 0.0)
        ttft, total = true_total(est, r, slow=step if i >= step_at else 1.0)
        noise = float(rng.lognormal(0.0, sigma))
        ttft, total = ttft * noise, total * noise
        budget = true_total(est, r)[1] * float(rng.uniform(0.6, 1.6))
        r = r._replace(budget_ms=budget)
        admitted = ctl.decide(r).admit
        if admitted:
            ctl.observe(r, ttft, total)
        out.append((admitted, total <= budget, admitted and total > budget))
    return out


def _rate(rows: list[tuple[bool, bool, bool]]) -> tuple[float, float]:
    admitted = sum(a for a, _, _ in rows)
    return sum(v for _, _, v in rows) / max(1, admitted), admitted / max(1, sum(o for _, o, _ in rows))


def test_online_threshold_keeps_the_promise_and_recovers_from_a_step(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=0.05, window=32, min_observations=8, residual_window=100)
    # 30% slower from request 1500 on (budgets reach 1.6x the raw prediction, so requests still fit).
    rows = _simulate(estimator, ctl, 3000, step_at=1500, step=1.3, sigma=0.03, seed=3)
    violation, vs_oracle = _rate(rows[100:1500])
    assert violation <= 0.05 + 0.03  # the conformal bound, with sampling slack
    assert vs_oracle >= 0.85
    after, vs_oracle_after = _rate(rows[1700:])
    assert after <= 0.07
    assert vs_oracle_after >= 0.6  # recovered, not starved
    th = ctl.counters()["thresholds"]["0,1,4"]
    assert 0.9 < th["threshold"] < 1.2 and th["residuals"] == 100 and th["budgets"] == 256


def test_warm_up_uses_the_stored_conformal_factor() -> None:
    fit = fit_scores(KEY, [1.0] * 30 + [1.3] * 10)  # stored factor at alpha 0.05: 1.3
    est = Estimator(make_calibration(fit.as_dict()))
    ctl = AdmissionController(est, alpha=0.05)
    r = req()
    _, total = true_total(est, r)
    assert not ctl.decide(r._replace(budget_ms=total * 1.25)).admit
    assert ctl.decide(r._replace(budget_ms=total * 1.35)).admit
    assert ctl.correction(r) == 1.0


def test_memory_is_bounded(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None, window=16, min_observations=4, max_buckets=4)
    for i in range(5000):
        r = Request(i % 300, 40, 1 + i % 50, 0, 1 + i % 3, 1 + i % 6, 1e6)
        ctl.observe(r, 1.0, 2.0 + i % 7)
    c = ctl.counters()
    assert c["buckets"] <= 4
    states = list(ctl._states.values())
    assert len(states) + sum(len(s.buckets) for s in states) <= 4
    assert all(s.pooled is None or len(s.pooled.prefill) <= 16 and len(s.pooled.decode) <= 16 for s in states)
    assert all(len(b.prefill) <= ctl.bucket_window for s in states for b in s.buckets.values())
    assert all(len(s.residuals or ()) <= ctl.residual_window for s in states)
    assert c["observations"] + c["ignored_observations"] == 5000


def test_violations_and_counters(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None)
    r = req(budget=50.0)
    ctl.observe(r, 10.0, 49.0)
    ctl.observe(r, 10.0, 51.0)
    ctl.observe(r, float("nan"), 51.0)
    c = ctl.counters()
    assert (c["observations"], c["violations"], c["ignored_observations"]) == (2, 1, 1)
    ctl.decide(req(budget=1e6))
    ctl.decide(req(budget=0.001))
    ctl.decide({"vision_tokens": 1})
    c = ctl.counters()
    assert (c["decisions"], c["admits"], c["rejects"], c["invalid"]) == (3, 1, 2, 1)


@pytest.mark.parametrize("policy", ["reject", "admit", "cap"])
def test_policy_for_requests_the_estimator_cannot_judge(estimator: Estimator, policy: str) -> None:
    ctl = AdmissionController(estimator, alpha=None, policy=policy, cap_tokens=4)
    unknown_tier = Request(64, 40, 16, 9, 1, 4, 1e6)
    d = ctl.decide(unknown_tier)
    assert d.reason
    if policy == "reject":
        assert not d.admit and d.max_new_tokens == 0
    elif policy == "admit":
        assert d.admit and d.max_new_tokens == 16
    else:
        assert d.admit and d.max_new_tokens == 4
    assert ctl.counters()["unjudged"] == 1
    # Malformed requests are rejected whatever the policy.
    bad = ctl.decide(Request(64, float("nan"), 16, 0, 1, 4, 1e6))  # type: ignore[arg-type]
    assert not bad.admit and "text_tokens" in bad.reason


def test_dict_and_request_agree(estimator: Estimator) -> None:
    ctl = AdmissionController(estimator, alpha=None)
    r = req(budget=30.0)
    a = ctl.decide(r)
    b = ctl.decide(r._asdict())
    assert a.admit == b.admit and a.max_new_tokens == b.max_new_tokens
    assert a.predicted_ms == pytest.approx(b.predicted_ms)


@pytest.mark.parametrize("alpha", [None, 0.05])
def test_eight_threads_give_the_same_counters_as_one(estimator: Estimator, alpha: float | None) -> None:
    # Budgets far from the threshold (beyond any clamped correction), and one ratio per bucket,
    # so the counts and the final corrections do not depend on the interleaving.
    stream = []
    for i in range(4000):
        r = Request(i % 256, 8 + i % 100, 1 + i % 40, 0, 1, 4, 0.0)
        _, total = true_total(estimator, r)
        fits = i % 3 != 0
        r = r._replace(budget_ms=total * (100.0 if fits else 0.01))
        stream.append((r, *true_total(estimator, r, slow=1.3)))

    def work(ctl: AdmissionController, items: list) -> None:
        for r, ttft, total in items:
            if ctl.decide(r).admit:
                ctl.observe(r, ttft, total)

    one = AdmissionController(estimator, alpha=alpha, window=16, min_observations=4)
    work(one, stream)
    many = AdmissionController(estimator, alpha=alpha, window=16, min_observations=4)
    threads = [threading.Thread(target=work, args=(many, stream[k::8])) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = one.counters(), many.counters()
    for name in ("decisions", "admits", "rejects", "observations", "violations", "buckets"):
        assert a[name] == b[name], name
    assert a["decisions"] == 4000 and a["admits"] > 0 and a["violations"] == 0
    assert a["corrections"].keys() == b["corrections"].keys()
    for k in a["corrections"]:
        assert a["corrections"][k]["decode"] == pytest.approx(b["corrections"][k]["decode"])
        assert math.isclose(a["corrections"][k]["prefill"], 1.3, rel_tol=1e-9)


def test_a_starving_controller_falls_back_to_the_calibration(estimator: Estimator) -> None:
    # A burst 3x slower than the model: the correction rejects a budget of 1.5x the raw
    # prediction for ever, unless the stale windows are dropped after reset_after rejections.
    def burst(reset_after: int | None) -> AdmissionController:
        ctl = AdmissionController(estimator, alpha=0.05, residual_window=40, reset_after=reset_after,
                                  probe_after=None)
        for _ in range(40):
            ctl.observe(req(), *true_total(estimator, req(), slow=3.0))
        return ctl

    _, total = true_total(estimator, req())
    budget = req(budget=total * 1.5)
    plain, resetting = burst(None), burst(10)
    assert not any(plain.decide(budget).admit for _ in range(50))
    decisions = [resetting.decide(budget).admit for _ in range(12)]
    assert decisions == [False] * 10 + [True] * 2  # back to the stored factors (none: residual quantiles)
    c = resetting.counters()
    assert c["resets"] == 1 and c["corrections"] == {} and c["thresholds"] == {}
    assert plain.counters()["resets"] == 0


def test_probe_breaks_a_starvation(estimator: Estimator) -> None:
    # Ratios 3.0 / 3.6 alternate: the corrected median is 3.3x the raw prediction and the
    # threshold lifts it to 3.6x. A budget of 3.4x fits the median, not the promise: it is
    # rejected for ever, unless probes are on.
    def starving(probe_after: int | None) -> AdmissionController:
        ctl = AdmissionController(estimator, alpha=0.05, window=8, min_observations=4, residual_window=40,
                                  min_budgets=10, probe_after=probe_after)
        for i in range(40):
            ctl.observe(req(), *true_total(estimator, req(), slow=3.0 if i % 2 else 3.6))
        return ctl

    _, total = true_total(estimator, req())
    budget = req(budget=total * 3.4)
    plain, probing = starving(None), starving(10)
    assert not any(plain.decide(budget).admit for _ in range(100))
    decisions = [probing.decide(budget).admit for _ in range(22)]
    assert decisions == ([False] * 10 + [True]) * 2
    assert probing.counters()["probes"] == 2 and plain.counters()["probes"] == 0


def test_compiled_gate_decides_as_the_reference_controller() -> None:
    """The same stream through a controller over the compiled kernels and one over the pure-Python
    reference (no compiled gate: every decision on the Python path): identical decisions, counters and
    thresholds (the compiled gate is only a faster path)."""
    import numpy as np

    from trt_latency.estimator import _reference

    compiled = pytest.importorskip("trt_latency.ext._kernels", reason="Cython extension not built")
    cal = make_calibration({"alphas": [0.05, 0.5], "factors": [1.1, 1.0], "n": 100})
    fast, slow = Estimator(cal, implementation=compiled), Estimator(cal, implementation=_reference)
    ctls = [AdmissionController(e, alpha=0.05, min_budgets=10, probe_after=20) for e in (fast, slow)]
    rng = np.random.default_rng(3)
    for i in range(600):
        r = Request(int(rng.choice([0, 64, 256])), int(rng.integers(8, 257)), int(rng.integers(2, 49)), 0, 1,
                    int(rng.choice([4, 0])) or None, float(rng.uniform(5.0, 200.0)))
        ttft, total = true_total(fast, r, slow=float(rng.lognormal(0.0, 0.1)) * (1.4 if i >= 300 else 1.0))
        decisions = [c.decide(r) for c in ctls]
        fast_d, slow_d = decisions
        assert (fast_d.admit, fast_d.max_new_tokens, fast_d.reason) == (slow_d.admit, slow_d.max_new_tokens,
                                                                      slow_d.reason), (i, r)
        assert fast_d.predicted_ms == pytest.approx(slow_d.predicted_ms, rel=1e-9, nan_ok=True), (i, r)
        if decisions[0].admit:
            for c in ctls:
                c.observe(r, ttft, total)
    a, b = (c.counters() for c in ctls)
    assert a["thresholds"].keys() == b["thresholds"].keys() and a["thresholds"]
    for name in ("decisions", "admits", "rejects", "probes", "observations", "violations"):
        assert a[name] == b[name], name
    assert a["admits"] > 0 and a["rejects"] > 0
    assert ctls[0]._gates and not ctls[1]._gates  # the compiled one went through its gates, the other could not
