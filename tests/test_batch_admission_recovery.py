"""BatchAdmissionController's recovery from a factor that rejects everything (issue 25): rate-limited probes
plus a time horizon on the scores, on an injected clock, compiled BatchState and the pure-Python path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_serving_batch import PREFILL, synthetic_section

from trt_latency.serving import batch_reference as ref
from trt_latency.serving.batch_admission import BatchAdmissionController, BatchEstimator

try:
    from trt_latency.serving import _batch
except ImportError:  # pragma: no cover - depends on the build
    _batch = None

PATHS = [pytest.param(False, id="compiled",
                      marks=pytest.mark.skipif(_batch is None, reason="serving/_batch.pyx not built")),
         pytest.param(True, id="python")]


class Clock:
    """The controller's clock (ms), moved by the test."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def controller(pure: bool, clock: Clock, **kw: object) -> BatchAdmissionController:
    est = BatchEstimator(synthetic_section(), PREFILL, pure_python=pure)
    ctl = BatchAdmissionController(est, alpha=0.05, max_batch=8, clock=clock, **kw)  # type: ignore[arg-type]
    assert (ctl._state is None) == pure
    return ctl


PROMPT, TOKENS = 100, 16


@pytest.mark.parametrize("pure", PATHS)
def test_a_controller_stuck_at_the_clamp_recovers_through_probes_and_the_horizon(pure: bool) -> None:
    """Scores near the clamp (4) from a bad start; then every request finishes in half its unscaled predicted
    time. Without the fix nothing is admitted again; with it: one probe per interval while the stale scores
    live, then (one horizon later) the start-up factor, regular admissions and an online factor near 0.5."""
    clock = Clock()
    ctl = controller(pure, clock, horizon_ms=30_000.0, probe_interval_ms=1_000.0)
    stuck = controller(pure, Clock(), horizon_ms=None, probe_interval_ms=None)
    alone = ctl.estimator.total_with([], PROMPT, TOKENS)  # unscaled prediction into an empty batch
    for c in (ctl, stuck):  # the bad start: 100 requests that took 3.9 x their prediction
        for i in range(100):
            c.started(("bad", i), PROMPT, TOKENS, 1e6, now=clock.t)
            c.finished(("bad", i), 3.9 * alone, alone)
    assert ctl.base_factor * ctl.correction(1) > 3.5 and stuck.base_factor == ctl.base_factor
    # fits the model, not the model x the stuck factor (nor x 2: the probes alone bring the batch-1 bucket's
    # scale down to the clamp's 0.5 within ~16 s, 4 x 0.5 = 2; what is left of 4 is the stale pooled scores)
    budget = 1.5 * alone
    log: list[tuple[float, bool, str]] = []
    for k in range(1, 901):  # 90 s of arrivals every 100 ms, each one alone in the batch
        clock.t = 100.0 * k
        assert not stuck.decide(("s", k), PROMPT, TOKENS, budget, now=clock.t).admit
        d = ctl.decide(k, PROMPT, TOKENS, budget, now=clock.t)
        log.append((clock.t, bool(d.admit), str(d.reason)))
        if d.admit:
            ctl.started(k, PROMPT, TOKENS, budget, now=clock.t)
            unscaled = d.predicted_ms / ctl.last_factor  # the model's own prediction, probe or not
            assert unscaled == pytest.approx(alone)
            ctl.finished(k, 0.5 * alone, unscaled)  # finished before the next arrival: twice as fast as predicted
    probes = [t for t, a, r in log if a and r == ref.PROBE_REASON]
    regular = [t for t, a, r in log if a and r != ref.PROBE_REASON]
    # while the stale scores live (30 s): only probes, at most one a second, each one after a second's rejects
    assert all(t > 30_000.0 for t in regular) and len(probes) >= 25
    assert all(b - a >= 1_000.0 for a, b in zip(probes, probes[1:], strict=False))
    # one horizon after the bad start the factor fell back and regular admissions resumed: every request of
    # the last 50 s admitted, the online factor learned from them (0.5 x, at the clamp's floor)
    assert all(a for t, a, _ in log if t > 40_000.0)
    c = ctl.counters()
    assert c["factor_source"].startswith("online") and ctl.base_factor * ctl.correction(1) == pytest.approx(0.5)
    assert c["probes"] == len(probes) and c["expired_scores"] >= 100 and c["admits"] == len(probes) + len(regular)
    assert c["decisions"] == c["admits"] + c["rejects"] == 900
    assert stuck.counters()["admits"] == 0 and stuck.counters()["probes"] == 0


@pytest.mark.parametrize("pure", PATHS)
def test_a_healthy_controller_is_unchanged(pure: bool) -> None:
    """Dense traffic whose scores stay inside the horizon and a batch that keeps admitting: the same decisions,
    factor and corrections as a controller without probes and horizon, no probe, nothing expired."""
    clock = Clock()
    new = controller(pure, clock)
    old = controller(pure, clock, horizon_ms=None, probe_interval_ms=None)
    rng = np.random.default_rng(7)
    running: list[tuple[int, float]] = []
    for rid in range(600):
        clock.t += float(rng.uniform(0, 20))
        args = (rid, int(rng.integers(1, 1500)), int(rng.integers(1, 40)), float(rng.uniform(30, 900)))
        a, b = new.decide(*args, want_fit=True), old.decide(*args, want_fit=True)
        assert (a.admit, a.max_new_tokens, a.code, a.reason) == (b.admit, b.max_new_tokens, b.code, b.reason)
        if a.admit:
            for c in (new, old):
                c.started(*args)
            running.append((rid, a.predicted_ms / (old.base_factor * old.correction(old.running()))))
        if running and rng.integers(2):
            gone, pred = running.pop(int(rng.integers(len(running))))
            actual = pred * float(rng.lognormal(0.1, 0.2))
            for c in (new, old):
                c.finished(gone, actual, pred)
        for c in (new, old):
            c.step()
    cn, co = new.counters(), old.counters()
    assert cn["probes"] == 0 and cn["expired_scores"] == 0 and cn["factor_source"].startswith("online")
    for key in ("decisions", "admits", "rejects", "factor", "correction_by_batch_bucket"):
        assert cn[key] == co[key], key
    assert 50 < cn["admits"] < 550


@pytest.mark.skipif(_batch is None, reason="serving/_batch.pyx not built")
def test_compiled_probes_equal_the_python_probes() -> None:
    """A high start factor, random budgets and gaps: the compiled decide's probes are the reference's."""
    clock = Clock()
    fast, slow = controller(False, clock, probe_interval_ms=300.0), controller(True, clock, probe_interval_ms=300.0)
    for c in (fast, slow):
        c.base_factor = 3.0
    rng = np.random.default_rng(11)
    running: list[int] = []
    for rid in range(500):
        clock.t += float(rng.exponential(120.0))
        args = (rid, int(rng.integers(1, 1500)), int(rng.integers(1, 40)), float(rng.uniform(10, 400)))
        a, b = fast.decide(*args, want_fit=True), slow.decide(*args, want_fit=True)
        assert (a.admit, a.max_new_tokens, a.code, a.pushed, a.reason) == \
            (b.admit, b.max_new_tokens, b.code, b.pushed, b.reason)
        assert a.predicted_ms == pytest.approx(b.predicted_ms, rel=1e-12, nan_ok=True)
        assert fast.last_factor == pytest.approx(slow.last_factor, rel=1e-12)
        if a.admit:
            for c in (fast, slow):
                c.started(*args)
            running.append(rid)
        if running and rng.integers(3) == 0:  # the batch empties now and then: where probes may happen
            for gone in running:
                for c in (fast, slow):
                    c.finished(gone)
            running.clear()
    cf, cs = fast.counters(), slow.counters()
    assert cf["probes"] == cs["probes"] > 5, cf and cf["admits"] == cs["admits"] > cf["probes"]


def test_probe_due_rule() -> None:
    assert ref.probe_due(0, 2.0, 1000.0, 0.0, 1000.0)
    assert not ref.probe_due(1, 2.0, 1000.0, 0.0, 1000.0)  # a running request could be pushed
    assert not ref.probe_due(0, 1.0, 1000.0, 0.0, 1000.0)  # factor 1: the probe admits nothing more
    assert not ref.probe_due(0, 2.0, 999.0, 0.0, 1000.0)  # admitted less than an interval ago
    assert not ref.probe_due(0, 2.0, 1e12, 0.0, math.inf)  # probes off


@pytest.mark.parametrize("pure", PATHS)
def test_the_upper_clamp_lets_each_bucket_keep_its_own_bias(pure: bool) -> None:
    """A server 5-6x slower than its model (handlers sharing the GIL with the engine under overload): batches
    of 5-8 at 5x, smaller ones at 6x. Under the controller's default clamp (4) every bucket's scale stops at 4
    and the pooled quantile makes up the rest, so the 5-8 bucket is priced at the small batches' 6x; serve's
    default `--factor-max 8` keeps each bucket at its own bias."""
    rng = np.random.default_rng(3)
    factors = {}
    for hi in (4.0, 8.0):
        ctl = controller(pure, Clock(), clamp=(0.5, hi))
        assert ctl.clamp == (0.5, hi)
        alone = ctl.estimator.total_with([], PROMPT, TOKENS)
        for g in range(40):  # groups of 8 admitted one after another: batch sizes 1..8 at admission
            rids = [(g, k) for k in range(8)]
            for rid in rids:
                ctl.started(rid, PROMPT, TOKENS, 1e6, now=0.0)
            for k, rid in enumerate(rids):
                bias = 5.0 if k + 1 >= 5 else 6.0
                ctl.finished(rid, bias * float(1.0 + 0.01 * rng.standard_normal()) * alone, alone)
        factors[hi] = (ctl.base_factor * ctl.correction(1), ctl.base_factor * ctl.correction(8))
    assert factors[4.0][1] == pytest.approx(6.0, rel=0.04)  # the 5-8 bucket over-priced by a fifth
    assert factors[8.0][0] == pytest.approx(6.0, rel=0.04) and factors[8.0][1] == pytest.approx(5.0, rel=0.04)


def test_serve_parses_factor_max() -> None:
    from trt_latency.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "-c", "x.yaml"]).factor_max == 8.0
    assert parse(["serve", "-c", "x.yaml", "--factor-max", "4"]).factor_max == 4.0


# --- the adaptive level (a risk budget on the quantile's level) ----------------------------------------

def _feed(ctl: BatchAdmissionController, clock: Clock, scores: list[float]) -> None:
    """Requests admitted alone (no model_ms: they spend nothing), finishing with these actual / predicted."""
    alone = ctl.estimator.total_with([], PROMPT, TOKENS)
    for s in scores:
        clock.t += 10.0
        rid = ("feed", clock.t)
        ctl.started(rid, PROMPT, TOKENS, 1e6, now=clock.t)
        ctl.finished(rid, s * alone, alone, late=False)


def _admit(ctl: BatchAdmissionController, clock: Clock, budget_over_model: float, n: int) -> None:
    """n regular admissions whose budget is this multiple of their model total (they finish at once, unscored)."""
    alone = ctl.estimator.total_with([], PROMPT, TOKENS)
    for _ in range(n):
        clock.t += 1.0
        rid = ("admit", clock.t)
        ctl.started(rid, PROMPT, TOKENS, budget_over_model * alone, now=clock.t, model_ms=alone)
        ctl.finished(rid)


@pytest.mark.parametrize("pure", PATHS)
def test_the_level_spends_the_slack_of_admitted_requests_and_returns_to_alpha_at_the_edge(pure: bool) -> None:
    """Scores spread 1..2 (uniform; the bucket's scale, their median, ~1.5). Admissions with a budget 3x their
    model total (normalised 2: no score above it, predicted miss 0) move the level from alpha up to its bound
    0.5: the factor falls from the 95th percentile (~1.95) to the median (~1.5), and a request whose budget lies
    between the two, rejected at alpha, is admitted. Admissions at the edge (predicted miss ~0.17) bring it
    back to alpha; late outcomes below it. Without level_step the same admissions leave it at alpha."""
    rng = np.random.default_rng(3)
    scores = list(rng.uniform(1.0, 2.0, 200))
    clock, fixed_clock = Clock(), Clock()
    ctl = controller(pure, clock, level_step=0.05, horizon_ms=None, probe_interval_ms=None)
    fixed = controller(pure, fixed_clock, horizon_ms=None, probe_interval_ms=None)
    for c, k in ((ctl, clock), (fixed, fixed_clock)):
        _feed(c, k, scores)
        _admit(c, k, 3.0, 200)
    at_alpha = fixed.base_factor * fixed.correction(1)
    assert fixed.level == 0.05 and at_alpha > 1.85
    assert ctl.miss_chance(1.0, 3.0, 1) == 0.0
    assert ctl.level == pytest.approx(0.5)  # +0.05 x (0.05 - 0) per admission, bounded
    assert ctl.counters()["level"] == pytest.approx(0.5) and ctl.counters()["on_time"] == 200
    adapted = ctl.base_factor * ctl.correction(1)
    assert adapted == pytest.approx(1.5, abs=0.15) and adapted < at_alpha - 0.3  # the median score, about
    alone = ctl.estimator.total_with([], PROMPT, TOKENS)
    budget = 0.5 * (at_alpha + adapted) * alone  # between the two factors' totals
    assert not fixed.decide("x", PROMPT, TOKENS, budget, now=fixed_clock.t).admit
    assert ctl.decide("x", PROMPT, TOKENS, budget, now=clock.t).admit
    # admissions at the edge: budget 1.8x the model = 1.2 x the scale, 15-20 % of the scores above it
    edge = ctl.miss_chance(alone, 1.8 * alone, 1)
    assert edge is not None and 0.1 < edge < 0.3
    _admit(ctl, clock, 1.8, 300)
    counters = ctl.counters()
    assert ctl.level == counters["level_predicted"] == pytest.approx(0.05)  # the mean predicted miss is above alpha
    assert counters["level_observed"] == pytest.approx(0.5)  # while every outcome was on time
    assert fixed.miss_chance(alone, 1.8 * alone, 1) == pytest.approx(edge)
    # late outcomes pull the observed tracker, and so the level, below alpha: a factor above alpha's. Half of
    # them as `serve` reports them: the request leaves the batch, its outcome comes when it is delivered
    for i in range(20):
        clock.t += 1.0
        ctl.started(("late", clock.t), PROMPT, TOKENS, 1e6, now=clock.t)
        if i % 2:
            ctl.finished(("late", clock.t), late=True)
        else:
            ctl.finished(("late", clock.t))
            ctl.outcome(late=True)
    assert ctl.level == pytest.approx(0.025) and ctl.late == 20 and ctl.running() == 0
    assert ctl.base_factor * ctl.correction(1) >= at_alpha


def test_the_level_bounds_are_checked_and_off_keeps_alpha() -> None:
    est = BatchEstimator(synthetic_section(), PREFILL, pure_python=True)
    with pytest.raises(ValueError, match="level_bounds"):
        BatchAdmissionController(est, alpha=0.05, level_step=0.1, level_bounds=(0.1, 0.5))
    ctl = BatchAdmissionController(est, alpha=0.05)
    ctl.started("a", PROMPT, TOKENS, 1e6, model_ms=1.0)
    ctl.finished("a", 1.0, 1.0, late=True)
    assert ctl.level == 0.05 and ctl.late == 1  # counted, not adapted
    assert ctl.miss_chance(1.0, 2.0, 1) is None  # before the online regime: no scores to price it
