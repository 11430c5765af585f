"""VLM requests in the serving loop: a Request's images (its 8th field, 1 when absent) reach the gate, the
Python path, the online correction and the threshold, compiled and reference alike.

The regression this guards: the controller's raw prefill left out the encoder, so a VLM request whose
TTFT came in exactly as predicted taught it a prefill correction of (prefill + encoder) / prefill
(14x on a Qwen2.5-VL calibration) and it then rejected requests that fitted."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from helpers.admission import make_calibration

from trt_latency.estimator import _reference
from trt_latency.estimator.calibration import Calibration
from trt_latency.estimator.model import Estimator
from trt_latency.estimator.vision import VisionCalibration
from trt_latency.serving.admission import AdmissionController, Request
from trt_latency.serving.validation import Invalid, parse

compiled = pytest.importorskip("trt_latency.ext._kernels", reason="Cython extension not built")
IMPLEMENTATIONS = [pytest.param(compiled, id="compiled"), pytest.param(_reference, id="reference")]


def vlm_calibration() -> Calibration:
    """make_calibration's exact model plus an encoder that costs far more than the text prefill
    (2 + 0.02 u + 1e-5 u^2 ms per image of u tokens, two images in one call cheaper than two calls)."""
    vision = VisionCalibration(family="vit", tokens_per_patch=1.0, images_per_call="together",
                               fits={1: [2.0, 0.02, 1e-5], 2: [3.0, 0.035, 1e-5]}, patch_range=[16.0, 1024.0],
                               embedding=[0.1, 1e-4])  # fmt: skip
    return dataclasses.replace(make_calibration(), vision=vision)


def exact(est: Estimator, v: int, t: int, n: int, images: int) -> tuple[float, float]:
    """(TTFT, total) exactly as the calibration predicts for this request."""
    p = est.predict(v, t, n, 0, 1, 4, images=images)
    return p.prefill_ms, p.total_ms


STREAM = [(256, 40, 16, 1), (512, 20, 32, 2), (128, 60, 8, 1), (900, 30, 24, 3), (300, 10, 16, 2)]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("alpha", [None, 0.1])
def test_requests_that_cost_what_was_predicted_teach_no_correction(impl: Any, alpha: float | None) -> None:
    est = Estimator(vlm_calibration(), implementation=impl)
    v, t, n, k = STREAM[1]
    ttft, total = exact(est, v, t, n, k)
    assert ttft > 5 * est.predict(0, t, n, 0, 1, 4).prefill_ms  # the encoder dominates the TTFT here
    ctl = AdmissionController(est, alpha=alpha, min_observations=4, min_budgets=4)
    for _ in range(6):
        for v, t, n, k in STREAM:
            ctl.observe(Request(v, t, n, 0, 1, 4, 1e6, k), *exact(est, v, t, n, k))
    for name, c in ctl.counters()["corrections"].items():
        assert c["prefill"] == pytest.approx(1.0) and c["decode"] == pytest.approx(1.0), name
    # With alpha the correction is the threshold on top of drift corrections of 1; residuals are all 1,
    # so the threshold is the conformal factor of exact predictions: 1.
    for v, t, n, k in STREAM:
        assert ctl.correction(Request(v, t, n, 0, 1, 4, 1e6, k)) == pytest.approx(1.0), (v, k)
        total = exact(est, v, t, n, k)[1]
        judged = not est.admit(total, v, t, n, 0, 1, 4, None, k).extrapolated  # 3 images/call: not swept
        if alpha is None and judged:  # no safety factor: the budget either side of the exact total decides
            assert ctl.decide(Request(v, t, n, 0, 1, 4, total * 1.01, k)).admit, (v, k)
            assert not ctl.decide(Request(v, t, n, 0, 1, 4, total * 0.99, k)).admit, (v, k)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_images_price_the_decision(impl: Any) -> None:
    """The same vision tokens as one image or as two (in one encoder call) are different costs; the
    controller's decision follows admit's with that images count, before and after observations."""
    est = Estimator(vlm_calibration(), implementation=impl)
    ctl = AdmissionController(est, alpha=None, min_observations=2)
    one, two = exact(est, 800, 20, 8, 1)[1], exact(est, 800, 20, 8, 2)[1]
    assert abs(one / two - 1.0) > 0.05
    for k, total in ((1, one), (2, two)):
        for budget in (total * 0.995, total * 1.005):
            d = ctl.decide(Request(800, 20, 8, 0, 1, 4, budget, k))
            want = est.admit(budget, 800, 20, 8, 0, 1, 4, None, k)
            assert (d.admit, d.max_new_tokens) == (want.admit, want.max_new_tokens)
    for _ in range(4):
        ctl.observe(Request(800, 20, 8, 0, 1, 4, 1e6, 2), *exact(est, 800, 20, 8, 2))
    d = ctl.decide(Request(800, 20, 8, 0, 1, 4, two * 1.005, 2))
    assert d.admit and d.predicted_ms == pytest.approx(two)


def test_gate_and_python_path_agree_on_image_requests() -> None:
    """The compiled gate (8-tuple Requests) and the reference implementation's Python path: the same
    decisions over a drifting stream (observations 30% slow) of one-, two- and three-image requests."""
    ctls = [AdmissionController(Estimator(vlm_calibration(), implementation=impl), alpha=0.1, min_observations=4,
                                min_budgets=4) for impl in (compiled, _reference)]  # fmt: skip
    for i in range(120):
        v, t, n, k = STREAM[i % len(STREAM)]
        ttft, total = exact(ctls[1].estimator, v, t, n, k)
        budget = total * (0.9 + 0.05 * (i % 11))
        got = [c.decide(Request(v, t, n, 0, 1, 4, budget, k)) for c in ctls]
        assert (got[0].admit, got[0].max_new_tokens, got[0].reason) == (got[1].admit, got[1].max_new_tokens,
                                                                         got[1].reason), (i, v, k)
        assert math.isclose(got[0].predicted_ms, got[1].predicted_ms, rel_tol=1e-9) or (
            math.isnan(got[0].predicted_ms) and math.isnan(got[1].predicted_ms))
        for c in ctls:
            c.observe(Request(v, t, n, 0, 1, 4, budget, k), ttft * 1.3, total * 1.3)
    a, b = (c.counters() for c in ctls)
    assert a["admits"] == b["admits"] > 0 and a["rejects"] == b["rejects"] > 0
    assert a["thresholds"].keys() == b["thresholds"].keys() and a["thresholds"]


def test_request_images_field_is_validated_in_every_shape() -> None:
    assert Request(1, 2, 3).images == 1
    assert parse((64, 10, 4, 0, 1, None, 5.0))[7] == 1  # a 7-tuple written before images existed
    assert parse((64, 10, 4, 0, 1, None, 5.0, 2))[7] == 2
    assert parse({"vision_tokens": 64, "text_tokens": 10, "max_new_tokens": 4, "images": 3})[7] == 3
    assert parse({"vision_tokens": 64, "text_tokens": 10, "max_new_tokens": 4})[7] == 1
    for bad in (0, -1, 1.5, "2", None):
        with pytest.raises(Invalid, match="images"):
            parse(Request(64, 10, 4, 0, 1, None, 5.0, bad))  # type: ignore[arg-type]
    ctl = AdmissionController(Estimator(vlm_calibration()), alpha=None)
    d = ctl.decide(Request(64, 10, 4, 0, 1, 4, 50.0, 0))
    assert not d.admit and "images" in d.reason and ctl.counters()["invalid"] == 1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_warm_start_reads_the_logs_images_column(impl: Any) -> None:
    """A request log with an images column (what calibrate's replay writes for a VLM) seeds the windows
    with each request's own encoder cost: exact observations -> corrections of 1."""
    est = Estimator(vlm_calibration(), implementation=impl)
    rows = STREAM * 3
    log = {"vision_tokens": [r[0] for r in rows], "text_tokens": [r[1] for r in rows],
           "output_tokens": [r[2] for r in rows], "tier_idx": [0] * len(rows), "top_k": [1] * len(rows),
           "num_active_blocks": [4] * len(rows), "images": [r[3] for r in rows],
           "ttft_ms": [exact(est, *r)[0] for r in rows], "total_ms": [exact(est, *r)[1] for r in rows]}  # fmt: skip
    ctl = AdmissionController(est, alpha=None, min_observations=4)
    assert ctl.warm_start(log) == len(rows)
    for c in ctl.counters()["corrections"].values():
        assert c["prefill"] == pytest.approx(1.0)
    without = dict(log)
    del without["images"]  # an old log: every request one image, so the multi-image rows are mispriced
    ctl_old = AdmissionController(est, alpha=None, min_observations=4)
    ctl_old.warm_start(without)
    assert max(abs(c["prefill"] - 1.0) for c in ctl_old.counters()["corrections"].values()) > 0.05
