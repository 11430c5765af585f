"""The compiled Gate's probe and AdmissionController.reset, step by step on a known model (issue 18:
both were CPU-runnable and unexercised by a check that could fail)."""

from __future__ import annotations

import math

import pytest
from helpers.admission import make_calibration, req, true_total

from trt_latency.estimator import _reference
from trt_latency.estimator.model import Estimator
from trt_latency.serving.admission import AdmissionController, Request

gate_mod = pytest.importorskip("trt_latency.serving._gate", reason="Cython extension not built")
# The compiled kernels by name (TRT_LATENCY_PUREPYTHON=1 makes the default the reference, which a Gate
# cannot sit on: the gate has no Python twin by design, docs/decisions.md 5).
compiled = pytest.importorskip("trt_latency.ext._kernels", reason="Cython extension not built")


@pytest.mark.parametrize("online", [True, False])
def test_gate_probes_once_every_probe_after_rejections(online: bool) -> None:
    """A factor of 10 rejects a budget of 2 x the raw total; after probe_after rejections in a row an
    online gate decides with factor 1 (the budget fits: admitted, counted as a probe, streak back to 0)."""
    est = Estimator(make_calibration(), implementation=compiled)
    r = req(v=0, t=100, n=20)
    _, total = true_total(est, r)
    budget = 2.0 * total
    gate = gate_mod.Gate(est._kernel, 0, [], [(1.0, 1.0)], 10.0, online, 3, gate_mod.Tally(), gate_mod.Traffic(4))
    admits = []
    for i in range(9):
        d = gate.decide(Request(0, 100, 20, 0, 1, 4, budget))
        assert d is not None and d.judged and d.predicted_ms == pytest.approx((10.0 if not d.admit else 1.0) * total)
        admits.append(d.admit)
        t = gate.tally
        assert t.decisions == i + 1 and t.admits + t.rejects == i + 1
    if online:
        assert admits == [False, False, False, True] * 2 + [False]
        assert (gate.tally.probes, gate.tally.streak) == (2, 1)
    else:
        assert not any(admits) and (gate.tally.probes, gate.tally.streak) == (0, 9)
    assert gate.traffic.snapshot() == [(budget, 100, 20, 0, 0, 1)] * 4


def _drifted(est: Estimator) -> AdmissionController:
    """A controller that learnt a 3x slowdown: it rejects a budget of 2x the raw total."""
    ctl = AdmissionController(est, alpha=None, window=8, min_observations=4, probe_after=None)
    for _ in range(8):
        ctl.observe(req(), *true_total(est, req(), slow=3.0))
    return ctl


@pytest.mark.parametrize("impl", ["cython", "reference"])
def test_reset_forgets_everything(impl: str) -> None:
    est = Estimator(make_calibration(), implementation=compiled if impl == "cython" else _reference)
    _, total = true_total(est, req())
    tight = req(budget=2.0 * total)
    ctl = _drifted(est)
    assert ctl.correction(tight) == pytest.approx(3.0)
    assert [ctl.decide(tight).admit for _ in range(3)] == [False] * 3
    ctl.decide({"vision_tokens": -1})  # an invalid one, counted
    before = ctl.counters()
    assert before["decisions"] == 4 and before["invalid"] == 1 and before["observations"] == 8
    assert before["corrections"] and before["buckets"] > 0
    ctl.reset()
    after = ctl.counters()
    fresh = AdmissionController(est, alpha=None, window=8, min_observations=4, probe_after=None).counters()
    assert after == fresh
    assert ctl.correction(tight) == 1.0
    d = ctl.decide(tight)
    assert d.admit and d.predicted_ms == pytest.approx(total)  # the raw model again, not the learnt 3x
    assert ctl.counters()["decisions"] == 1 and ctl.counters()["admits"] == 1
    # and it learns again from scratch after the reset
    for _ in range(4):
        ctl.observe(req(), *true_total(est, req(), slow=3.0))
    assert not ctl.decide(tight).admit and math.isclose(ctl.correction(tight), 3.0, rel_tol=1e-9)
