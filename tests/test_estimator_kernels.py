"""Cython kernels == pure-Python reference (same process, both imported directly), and exactness of
max_new_tokens: predict(n) <= budget < predict(n+1) in floating point."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from helpers.kernel_cases import (
    calibrations,
    close,
    kernels,
    nonzero_loops,
    requests,
    scales,
    vlm_calibrations,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_latency.estimator import _reference
from trt_latency.estimator.calibration import (
    Calibration,
    ConfigCalibration,
)
from trt_latency.estimator.model import Estimator, build_tables
from trt_latency.ext import layout

cy = pytest.importorskip("trt_latency.ext._kernels", reason="Cython extension not built")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOOP_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(calibrations(), st.lists(requests, min_size=1, max_size=25))
def test_admit_cython_equals_reference(cal: Calibration, reqs: list[dict]) -> None:
    kc, kr = kernels(cal)
    for r in reqs:
        args = (r["budget"], r["vision"], r["text"], r["req"], r["tier"], r["top_k"], r["blocks"], r["alpha"])
        dc, dr = kc.admit(*args), kr.admit(*args)
        assert (dc.admit, dc.max_new_tokens, dc.reason) == (dr.admit, dr.max_new_tokens, dr.reason), args
        assert close(dc.predicted_ms, dr.predicted_ms), args


@SETTINGS
@given(calibrations(), st.data())
def test_predict_step_nfit_cython_equals_reference(cal: Calibration, data: st.DataObject) -> None:
    kc, kr = kernels(cal)
    tables, _, _ = build_tables(cal)
    for _ in range(10):
        c = data.draw(st.integers(0, tables["cfg"].shape[0] - 1))
        prompt = float(data.draw(st.integers(1, 7000)))
        n = float(data.draw(st.integers(1, 10000)))
        factor = data.draw(st.floats(0.5, 3.0))
        past = data.draw(st.floats(0.0, 9000.0))
        assert close(kc.step(c, past), kr.step(c, past))
        for a, b in zip(kc.predict(c, prompt, n, factor), kr.predict(c, prompt, n, factor), strict=True):
            assert close(a, b)
        budget = data.draw(st.floats(0.0, 1e5))
        assert kc.nfit(c, prompt, budget, factor) == kr.nfit(c, prompt, budget, factor)
        q = data.draw(st.floats(0.01, 0.999))
        assert kc.quantile_factor(c, q) == kr.quantile_factor(c, q)
        assert kc.alpha_factor(c, q) == kr.alpha_factor(c, q)


@SETTINGS
@given(calibrations(), st.data())
def test_max_new_tokens_is_exact(cal: Calibration, data: st.DataObject) -> None:
    """Both implementations: total(n) <= budget < total(n+1), n = 0 iff total(1) > budget."""
    for kernel in kernels(cal):
        tables, _, _ = build_tables(cal)
        for _ in range(8):
            c = data.draw(st.integers(0, tables["cfg"].shape[0] - 1))
            prompt = float(data.draw(st.integers(1, 7000)))
            factor = data.draw(st.one_of(st.just(1.0), st.floats(0.5, 3.0)))
            # budgets around interesting values: just at a total, or random
            pick = data.draw(st.integers(1, 3000))
            exact = kernel.total(c, prompt, float(pick), factor)
            budget = data.draw(st.one_of(st.just(exact), st.just(math.nextafter(exact, 0.0)), st.floats(0.0, 2e5)))
            n = kernel.nfit(c, prompt, budget, factor)
            if n == 0:
                assert kernel.total(c, prompt, 1.0, factor) > budget
            else:
                assert kernel.total(c, prompt, float(n), factor) <= budget < kernel.total(c, prompt, float(n + 1), factor)


@SETTINGS
@given(calibrations(), st.lists(requests, min_size=1, max_size=40), st.one_of(st.none(), st.floats(0.01, 0.5)))
def test_batch_equals_scalar(cal: Calibration, reqs: list[dict], alpha: float | None) -> None:
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        ok, n, pred, code = est.admit_batch(
            [float(r["budget"]) for r in reqs], [r["vision"] for r in reqs], [r["text"] for r in reqs],
            [-1 if r["req"] is None else r["req"] for r in reqs], [r["tier"] for r in reqs],
            [r["top_k"] for r in reqs], [-1 if r["blocks"] is None else r["blocks"] for r in reqs], alpha=alpha,
        )
        for i, r in enumerate(reqs):
            d = est.admit(float(r["budget"]), r["vision"], r["text"], r["req"], r["tier"], r["top_k"], r["blocks"], alpha)
            assert (bool(ok[i]), int(n[i]), est.reason_text(int(code[i]))) == (d.admit, d.max_new_tokens, d.reason)
            assert close(float(pred[i]), d.predicted_ms)


def test_predict_batch_matches_predict() -> None:
    cal = Calibration(1, {}, [ConfigCalibration(0, 1, 4, [1.0, 100.0, 1000.0], [1.0, 1.5, 4.0], [2.0, 0.01, 1e-6],
                                                {0.5: 1.0, 0.99: 1.3}, [1.0, 1000.0], [8.0, 512.0])])
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        pre, dec, tot, flags = est.predict_batch([0, 64, 0], [10, 100, 0], [5, 2000, 3], quantile=0.99)
        for i, (v, t, o) in enumerate([(0, 10, 5), (64, 100, 2000)]):
            p = est.predict(v, t, o, quantile=0.99)
            assert (pre[i], dec[i], tot[i]) == (p.prefill_ms, p.decode_ms, p.total_ms)
        assert flags[1] & layout.PB_EXTRAPOLATED and not flags[0] & layout.PB_EXTRAPOLATED  # 164 + 1998 > 1000: extrapolated
        assert flags[2] == 8 and np.isnan(tot[2])  # empty prompt


def test_closed_form_sum_matches_loop() -> None:
    """The O(log knots) sum equals the plain per-token loop over T(L) (non-integer knots too)."""
    cal = Calibration(1, {}, [ConfigCalibration(0, 1, 4, [2.5, 10.0, 33.3, 80.0], [1.0, 1.2, 2.0, 2.5], [0.5, 0.0, 0.0],
                                                {}, [2.5, 80.0], [1.0, 100.0])])
    for impl in (cy, _reference):
        k = impl.Kernel(build_tables(cal)[0])
        for prompt in (1, 5, 30, 79, 150):
            for n in (1, 2, 3, 17, 64, 200):
                loop = sum(k.step(0, float(prompt + j)) for j in range(n - 1))
                assert math.isclose(k.predict(0, float(prompt), float(n), 1.0)[1], loop, rel_tol=1e-11, abs_tol=1e-9)


@LOOP_SETTINGS
@given(calibrations(nonzero_loops), st.data())
def test_max_new_tokens_is_exact_with_serving_loop(cal: Calibration, data: st.DataObject) -> None:
    """Nonzero o, c, o_p: both implementations keep predict(n) <= budget < predict(n+1) through the
    Estimator API, and the jump at n = 2 (where c starts to apply) is handled."""
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        for _ in range(6):
            key = data.draw(st.sampled_from(est.configs()))
            vision, text = data.draw(st.integers(0, 3000)), data.draw(st.integers(1, 3000))
            kw = {"tier_idx": key.tier_idx, "top_k": key.top_k, "num_active_blocks": key.num_active_blocks}
            pick = data.draw(st.sampled_from([1, 2, 3, data.draw(st.integers(1, 3000))]))
            exact = est.predict(vision, text, pick, **kw).total_ms
            budget = data.draw(st.one_of(st.just(exact), st.just(math.nextafter(exact, 0.0)), st.floats(0.0, 2e5)))
            n = est.max_new_tokens(budget, vision, text, **kw)
            if n == 0:
                assert est.predict(vision, text, 1, **kw).total_ms > budget
            else:
                assert est.predict(vision, text, n, **kw).total_ms <= budget < est.predict(vision, text, n + 1, **kw).total_ms
            d = est.admit(budget, vision, text, None, key.tier_idx, key.top_k, key.num_active_blocks)
            assert d.max_new_tokens == n


@LOOP_SETTINGS
@given(calibrations(nonzero_loops), st.data())
def test_serving_loop_terms_are_exactly_the_documented_sum(cal: Calibration, data: st.DataObject) -> None:
    """predict(serving=True) = engine prefill + o_p, engine decode + c(P) + (n - 1) o (n >= 2), with
    c(P) = c0 + c1 P over the whole prompt (vision + text tokens); steps + o."""
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        for _ in range(5):
            key = data.draw(st.sampled_from(est.configs()))
            kw = {"tier_idx": key.tier_idx, "top_k": key.top_k, "num_active_blocks": key.num_active_blocks}
            loop = cal.config(*key).serving_loop
            assert loop is not None and est.serving_loop(**kw) == loop
            prompt, n = data.draw(st.integers(1, 5000)), data.draw(st.integers(1, 4000))
            vision = data.draw(st.integers(0, prompt - 1)) if cal.vision is None else 0
            served = est.predict(vision, prompt - vision, n, **kw)
            engine = est.predict(vision, prompt - vision, n, serving=False, **kw)
            extra = loop.first_step_ms + loop.first_step_per_token_ms * prompt + (n - 1) * loop.decode_step_ms \
                if n >= 2 else 0.0
            assert served.prefill_ms == pytest.approx(engine.prefill_ms + loop.prefill_ms, rel=1e-12, abs=1e-9)
            assert served.decode_ms == pytest.approx(engine.decode_ms + extra, rel=1e-9, abs=1e-7)
            past = data.draw(st.integers(0, 9000))
            assert est.decode_step_ms(past, serving=True, **kw) == pytest.approx(
                est.decode_step_ms(past, serving=False, **kw) + loop.decode_step_ms, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------ scaled admission (serving loop)


@SETTINGS
@given(calibrations(), st.lists(st.tuples(requests, scales), min_size=1, max_size=25))
def test_admit_scaled_cython_equals_reference(cal: Calibration, reqs: list[tuple[dict, tuple]]) -> None:
    kc, kr = kernels(cal)
    for r, (ps, ds, f) in reqs:
        args = (r["budget"], r["vision"], r["text"], r["req"], r["tier"], r["top_k"], r["blocks"], ps, ds, f)
        dc, dr = kc.admit_scaled(*args), kr.admit_scaled(*args)
        assert (dc.admit, dc.max_new_tokens, dc.reason, dc.code) == (dr.admit, dr.max_new_tokens, dr.reason,
                                                                     dr.code), args
        assert (dc.extrapolated, dc.judged) == (dr.extrapolated, dr.judged)
        assert close(dc.predicted_ms, dr.predicted_ms), args


@SETTINGS
@given(calibrations(), st.data())
def test_admit_scaled_is_exact_and_flags_extrapolation(cal: Calibration, data: st.DataObject) -> None:
    """Both implementations: on the scaled model, total_s(n) <= budget < total_s(n+1) when fewer than
    requested fit; the extrapolated flag is the kernel's range check; scales of 1 = plain admit."""
    tables, keys, _ = build_tables(cal)
    for kernel in kernels(cal):
        for _ in range(8):
            c = data.draw(st.integers(0, tables["cfg"].shape[0] - 1))
            key = keys[c]
            v, t = data.draw(st.integers(0, 3000)), data.draw(st.integers(1, 3000))
            req = data.draw(st.integers(1, 5000))
            ps, ds, f = data.draw(scales)
            prompt = float(v + t)
            budget = data.draw(st.one_of(st.floats(0.0, 1e5),
                                         st.just(kernel.total_scaled(c, prompt, float(data.draw(st.integers(1, 3000))),
                                                                     ps, ds, f))))
            d = kernel.admit_scaled(budget, v, t, req, *key, ps, ds, f)
            assert d.judged and d.code < 64
            assert d.predicted_ms == kernel.total_scaled(c, prompt, float(req), ps, ds, f)
            assert d.admit == (d.predicted_ms <= budget)
            n = d.max_new_tokens
            if not d.admit:
                assert n == kernel.nfit_scaled(c, prompt, budget, ps, ds, f)
                assert n == 0 or kernel.total_scaled(c, prompt, float(n), ps, ds, f) <= budget
                assert kernel.total_scaled(c, prompt, float(n + 1), ps, ds, f) > budget
            assert d.extrapolated == bool(kernel.extrapolated(c, prompt, float(max(n, req))))
            plain = kernel.admit(budget, v, t, req, *key, None)
            assert tuple(kernel.admit_scaled(budget, v, t, req, *key, 1.0, 1.0, 1.0)) == tuple(plain)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, None, "1", True])
def test_admit_scaled_refuses_bad_scales(bad: Any) -> None:
    cal = Calibration(1, {}, [ConfigCalibration(
        tier_idx=0, top_k=1, num_active_blocks=2, decode_knots=[0.0, 100.0], decode_values_ms=[1.0, 2.0],
        prefill_coeffs=[1.0, 0.01, 0.0], residual_quantiles={}, valid_past_len=[0.0, 100.0],
        valid_prefill_len=[1.0, 100.0])])  # fmt: skip
    for kernel in kernels(cal):
        for pos in range(3):
            s: list[Any] = [1.0, 1.0, 1.0]
            s[pos] = bad
            d = kernel.admit_scaled(100.0, 0, 10, 4, 0, 1, 2, *s)
            assert not d.admit and d.code == layout.CODE_BAD_SCALE and not d.judged and "scale" in d.reason


# ------------------------------------------------------------------------------ choose (a config within budget)

candidate_lists = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.one_of(st.none(), st.integers(0, 7))),
                           max_size=8)


def _choose_by_admit(kernel: Any, r: dict, cands: list[tuple], alpha: Any, images: Any = None) -> tuple[Any, Any]:
    """The rule choose implements, spelt with admit: the first candidate that admits, else candidate 0."""
    if not cands:
        return None, None
    for cand in cands:
        d = kernel.admit(r["budget"], r["vision"], r["text"], r["req"], *cand, alpha, images)
        if d.admit:
            return tuple(d), cand
    return tuple(kernel.admit(r["budget"], r["vision"], r["text"], r["req"], *cands[0], alpha, images)), cands[0]


@SETTINGS
@given(calibrations(), st.lists(st.tuples(requests, candidate_lists), min_size=1, max_size=15))
def test_choose_agrees_with_admit_per_candidate(cal: Calibration, reqs: list[tuple[dict, list[tuple]]]) -> None:
    """Both implementations: choose == admit per candidate in order (first that admits, else the first)."""
    for kernel in kernels(cal):
        for r, cands in reqs:
            d = kernel.choose(r["budget"], r["vision"], r["text"], r["req"], cands, r["alpha"])
            want, config = _choose_by_admit(kernel, r, cands, r["alpha"])
            if want is None:
                assert not d.admit and d.code == layout.CODE_NO_CANDIDATE and d.config is None
                continue
            assert d.config == config
            assert (d.admit, d.max_new_tokens, d.reason) == want[:2] + want[3:], (r, cands)
            assert close(d.predicted_ms, want[2])
    kc, kr = kernels(cal)
    for r, cands in reqs:
        dc = kc.choose(r["budget"], r["vision"], r["text"], r["req"], cands, r["alpha"])
        dr = kr.choose(r["budget"], r["vision"], r["text"], r["req"], cands, r["alpha"])
        assert (dc.admit, dc.max_new_tokens, dc.code, dc.config) == (dr.admit, dr.max_new_tokens, dr.code, dr.config)


@pytest.mark.parametrize("make", [lambda: None, lambda: 3, lambda: "ab", lambda: [(0, 1)], lambda: [None],
                                  lambda: iter([(0, 1, 2)])])
def test_choose_never_raises_on_bad_candidates(make: Any) -> None:
    cal = Calibration(1, {}, [ConfigCalibration(
        tier_idx=0, top_k=1, num_active_blocks=2, decode_knots=[0.0, 100.0], decode_values_ms=[1.0, 2.0],
        prefill_coeffs=[1.0, 0.01, 0.0], residual_quantiles={}, valid_past_len=[0.0, 100.0],
        valid_prefill_len=[1.0, 100.0])])  # fmt: skip
    results = [k.choose(100.0, 0, 10, 4, make(), None) for k in kernels(cal)]
    assert [(d.admit, d.code, d.config) for d in results] == [(results[1].admit, results[1].code, results[1].config)] * 2
    if not isinstance(make(), str | list | int | type(None)):
        assert results[0].admit and results[0].config == (0, 1, 2)  # any iterable of candidates works
    else:
        assert not results[0].admit


@SETTINGS
@given(vlm_calibrations(), st.lists(requests, min_size=1, max_size=25))
def test_vision_term_cython_equals_reference_and_is_the_documented_sum(cal: Calibration, reqs: list[dict]) -> None:
    """The prefill term with the VLM vision term: both implementations equal (admit with 1-3 images, choose,
    predict_batch), admit's prediction = the engine prediction + vision(v) (+ embedding) exactly as the
    tables say, and = the Python path's predict(images=k) (the calibration's own vision_ms)."""
    kc, kr = kernels(cal)
    est = Estimator(cal, implementation=_reference)
    assert cal.vision is not None
    native_tokens = int(cal.vision.native_patches * cal.vision.tokens_per_patch)
    if native_tokens:  # requests at the native grid: the measured ms, not the quadratic
        reqs = reqs + [{**r, "vision": native_tokens} for r in reqs[:3]]
        assert kr.vision(0, float(native_tokens), 0.0) == cal.vision.native_ms[1] + max(
            cal.vision.embedding_ms(0.0), 0.0)
    for r in reqs:
        args = (r["budget"], r["vision"], r["text"], r["req"], r["tier"], r["top_k"], r["blocks"], r["alpha"])
        dc, dr = kc.admit(*args), kr.admit(*args)
        assert (dc.admit, dc.max_new_tokens, dc.reason) == (dr.admit, dr.max_new_tokens, dr.reason), args
        assert close(dc.predicted_ms, dr.predicted_ms), args
        k = 1 + r["text"] % 3  # images of this request
        ic, ir = kc.admit(*args, k), kr.admit(*args, k)
        assert (ic.admit, ic.max_new_tokens, ic.reason) == (ir.admit, ir.max_new_tokens, ir.reason), (args, k)
        assert close(ic.predicted_ms, ir.predicted_ms), (args, k)
        bad = [kern.admit(*args, im) for kern in (kc, kr) for im in (0, 1.5, layout.TOKEN_MAX + 1)]
        assert len({d.reason for d in bad}) == 1 and not any(d.admit for d in bad)
        cc, cr = kc.choose(*args[:4], None, r["alpha"]), kr.choose(*args[:4], None, r["alpha"])
        assert (cc.admit, cc.max_new_tokens, cc.reason) == (cr.admit, cr.max_new_tokens, cr.reason)
        row = kr.lookup(r["tier"], r["top_k"], -1 if r["blocks"] is None else r["blocks"])
        if dr.judged and r["alpha"] is None and r["vision"] + r["text"] > 0 and row >= 0:
            prompt = float(r["vision"] + r["text"])
            need = r["req"] if r["req"] else 1
            want = kr.total(row, prompt, float(need), 1.0) + kr.vision(row, float(r["vision"]), prompt)
            assert close(dr.predicted_ms, want) or abs(dr.predicted_ms - want) <= 1e-9 * (1 + want)
            if r["vision"] > 0:
                p = est.predict(r["vision"], r["text"], need, r["tier"], r["top_k"], r["blocks"])
                assert abs(p.total_ms - dr.predicted_ms) <= 1e-6 * (1.0 + abs(p.total_ms))
                pk = est.predict(r["vision"], r["text"], need, r["tier"], r["top_k"], r["blocks"], images=k)
                assert abs(pk.total_ms - ir.predicted_ms) <= 1e-6 * (1.0 + abs(pk.total_ms)), (args, k)
                if r["req"]:  # without one the decision judges its own max_new_tokens, not `need`
                    assert ir.extrapolated == ("extrapolated" in pk.flags), (args, k, pk.flags)
    arrays = [np.array([r[k] for r in reqs], dtype=np.int64) for k in ("vision", "text")]
    out = np.array([r["req"] or 1 for r in reqs], dtype=np.int64)
    keys = [np.array([r[k] for r in reqs], dtype=np.int64) for k in ("tier", "top_k")]
    blocks = np.array([-1 if r["blocks"] is None else r["blocks"] for r in reqs], dtype=np.int64)
    bc = kc.predict_batch(*arrays, out, *keys, blocks, -1.0)
    br = kr.predict_batch(*arrays, out, *keys, blocks, -1.0)
    for a, b in zip(bc, br, strict=True):
        assert all(close(float(x), float(y)) for x, y in zip(a, b, strict=True))


@SETTINGS
@given(vlm_calibrations(), st.lists(st.tuples(requests, candidate_lists, st.sampled_from([None, 1, 2, 3, 5, 0, -2])),
                                    min_size=1, max_size=20))
def test_images_reach_choose_and_the_batch_entry_points(cal: Calibration,
                                                        reqs: list[tuple[dict, list[tuple], Any]]) -> None:
    """A request's image count (None = 1; 0 and negatives are bad fields) is judged the same way by admit,
    choose (every candidate), admit_batch and predict_batch, compiled and reference alike; a batch row
    with a bad count refuses (admit_batch) or is invalid (predict_batch) on its own."""
    kc, kr = kernels(cal)
    for kernel in (kc, kr):
        for r, cands, im in reqs:
            d = kernel.choose(r["budget"], r["vision"], r["text"], r["req"], cands, r["alpha"], im)
            want, config = _choose_by_admit(kernel, r, cands, r["alpha"], im)
            if want is None:
                assert d.code == layout.CODE_NO_CANDIDATE
                continue
            assert d.config == config and (d.admit, d.max_new_tokens, d.reason) == want[:2] + want[3:], (r, cands, im)
            assert close(d.predicted_ms, want[2])
            if im is not None and im < 1:
                assert d.code == layout.CODE_BAD_IMAGES or d.code >= layout.CODE_BAD, (r, im)
    rs = [r for r, _, _ in reqs]
    ims = [1 if im is None else im for _, _, im in reqs]
    results = []
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        ok, n, pred, code = est.admit_batch(
            [float(r["budget"]) for r in rs], [r["vision"] for r in rs], [r["text"] for r in rs],
            [-1 if r["req"] is None else r["req"] for r in rs], [r["tier"] for r in rs], [r["top_k"] for r in rs],
            [-1 if r["blocks"] is None else r["blocks"] for r in rs], alpha=0.05, images=ims)
        outs = [r["req"] or 1 for r in rs]
        keys = ([r["vision"] for r in rs], [r["text"] for r in rs], outs, [r["tier"] for r in rs],
                [r["top_k"] for r in rs], [-1 if r["blocks"] is None else r["blocks"] for r in rs])
        pre, dec, tot, flags = est.predict_batch(*keys, images=ims)
        one = est.predict_batch(*keys)  # images None: one image per request
        for i, (r, k) in enumerate(zip(rs, ims, strict=True)):
            d = est.admit(float(r["budget"]), r["vision"], r["text"], r["req"], r["tier"], r["top_k"], r["blocks"],
                          0.05, k)
            assert (bool(ok[i]), int(n[i]), int(code[i])) == (d.admit, d.max_new_tokens, d.code), (r, k)
            assert close(float(pred[i]), d.predicted_ms)
            if k < 1:
                assert flags[i] == 8 and math.isnan(tot[i])
                continue
            row = est._kernel.lookup(r["tier"], r["top_k"], -1 if r["blocks"] is None else r["blocks"])
            if row < 0 or r["vision"] + r["text"] == 0:
                assert flags[i] == 8
                continue
            prompt = float(r["vision"] + r["text"])
            want_pre = est._kernel.prefill(row, prompt) + est._kernel.vision(row, float(r["vision"]), prompt, float(k))
            assert close(float(pre[i]), want_pre) and close(float(tot[i]), float(pre[i]) + float(dec[i]))
            assert bool(flags[i] & layout.PB_EXTRAPOLATED) == est._kernel.extrapolated(row, prompt, float(outs[i]), float(r["vision"]),
                                                                  float(k))
            if k == 1:
                assert close(float(one[2][i]), float(tot[i])) and one[3][i] == flags[i]
        results.append((ok, n, pred, code, pre, dec, tot, flags))
    for a, b in zip(*results, strict=True):
        assert all(close(float(x), float(y)) for x, y in zip(a, b, strict=True))


def test_batch_entry_points_refuse_an_images_array_of_another_length() -> None:
    cal = Calibration(1, {}, [ConfigCalibration(0, 1, 4, [1.0, 100.0], [1.0, 2.0], [2.0, 0.01, 0.0], {},
                                                [1.0, 100.0], [8.0, 512.0])])
    two = np.array([0, 0], dtype=np.int64)
    for kernel in kernels(cal):
        with pytest.raises(ValueError, match="same length"):
            kernel.admit_batch(np.array([100.0, 100.0]), two, two + 10, two - 1, two, two + 1, two - 1, -1.0,
                               np.array([1, 2, 3], dtype=np.int64))
        with pytest.raises(ValueError, match="same length"):
            kernel.predict_batch(two, two + 10, two + 4, two, two + 1, two - 1, -1.0, np.array([1, 2, 3], dtype=np.int64))
    for impl in (cy, _reference):  # the Estimator broadcasts scalars; arrays of other lengths do not broadcast
        with pytest.raises(ValueError):
            Estimator(cal, implementation=impl).admit_batch([100.0, 100.0], 0, 10, images=[1, 2, 3])
