"""The compiled serving-loop Gate (serving/_gate.pyx) decides exactly as the pure-Python reference
kernel's scaled model, with the gate's own rules (what it hands back, probing) spelt out here."""

from __future__ import annotations

import math
from typing import Any

import pytest
from helpers.kernel_cases import calibrations, close, kernels, scales, vlm_calibrations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_latency.estimator.calibration import Calibration
from trt_latency.estimator.model import build_tables
from trt_latency.ext.layout import ADMIT_BELOW, EXTRAPOLATED_BIT, F_NONE, TOKEN_MAX

gate_mod = pytest.importorskip("trt_latency.serving._gate", reason="Cython extension not built")


def _plain(r: tuple) -> bool:
    """The requests the gate takes: plain ints in range (blocks may be None), a float budget > 0, and
    when an 8th field (images) is there, a plain int >= 1."""
    ints = [0 if (i == 5 and x is None) else x for i, x in enumerate(r[:6])]
    images_ok = len(r) == 7 or (type(r[7]) is int and 1 <= r[7] <= TOKEN_MAX)
    return (all(type(x) is int and 0 <= x <= TOKEN_MAX for x in ints) and type(r[6]) is float
            and 0.0 < r[6] < math.inf and ints[2] >= 1 and ints[0] + ints[1] > 0 and images_ok)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(calibrations(), vlm_calibrations()), st.data())
def test_gate_equals_reference_scaled_model(cal: Calibration, data: st.DataObject) -> None:
    """Same decisions (or None where the gate hands the request back), same counts, same traffic ring;
    a VLM request's images (the Request's 8th field, absent = 1) price its encoder term."""
    tables, keys, _ = build_tables(cal)
    kc, kr = kernels(cal)
    c = data.draw(st.integers(0, tables["cfg"].shape[0] - 1))
    key = keys[c]
    edges = sorted(data.draw(st.sets(st.integers(1, 8000), max_size=6)))
    bucket_scales = [data.draw(scales)[:2] for _ in range(len(edges) + 1)]
    factor = data.draw(st.floats(0.5, 3.0))
    online = data.draw(st.booleans())
    probe_after = data.draw(st.integers(1, 5))
    gate = gate_mod.Gate(kc, c, edges, bucket_scales, factor, online, probe_after, gate_mod.Tally(),
                         gate_mod.Traffic(8))
    counts = [0, 0, 0, 0, 0]  # decisions, admits, rejects, probes, streak
    ring: list[Any] = []
    fields = st.one_of(st.integers(0, 3000), st.just(-1), st.just(True), st.just(1.5), st.just(1 << 32))
    for _ in range(20):
        r = (data.draw(fields), data.draw(fields), data.draw(st.one_of(st.integers(0, 400), fields)), key[0], key[1],
             data.draw(st.sampled_from([None, key[2]])),
             data.draw(st.one_of(st.floats(0.0, 5e3), st.just(math.nan), st.just(-1.0), st.integers(1, 10))))
        images = data.draw(st.sampled_from([None, 1, 2, 3, 0, True, 1.5]))
        if images is not None:
            r = r + (images,)
        d = gate.decide(r)
        if not _plain(r):
            assert d is None, r
            continue
        prompt, n, budget = r[0] + r[1], r[2], r[6]
        bucket = sum(1 for e in edges if e <= prompt + n)
        probe = online and counts[4] >= probe_after
        ps, ds = bucket_scales[bucket]
        im = 1 if images is None else images
        code, nout, pred = kr.decide_scaled(c, float(prompt), budget, n, 1.0 if probe else factor, F_NONE, ps, ds,
                                            float(r[0]), float(im))
        if code & EXTRAPOLATED_BIT:
            assert d is None, r
            continue
        assert d is not None and (d.admit, d.max_new_tokens, d.code) == (code < ADMIT_BELOW, nout, code), r
        assert close(d.predicted_ms, pred) and not d.extrapolated and d.judged
        ring = (ring + [(budget, prompt, n, bucket, r[0], im)])[-8:]
        counts[0] += 1
        if d.admit:
            counts[1] += 1
            counts[3] += probe
            counts[4] = 0
        else:
            counts[2] += 1
            counts[4] += 1
    t = gate.tally
    assert [t.decisions, t.admits, t.rejects, t.probes, t.streak] == counts
    assert gate.traffic.snapshot() == ring
