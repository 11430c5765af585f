"""Oracles that do not come from the kernels themselves (issue 18).

- Requests drawn from the calibration's own keys with fields in range, so Cython == reference
  compares real decisions; each request is tagged with the outcome it must get (judged, or the
  exact rejection code), and the share of each tag is fixed by construction and asserted.
- The extrapolated flag recomputed from its definition: the decode steps of n tokens read KV
  positions P .. P+n-2, the prefill reads P; either outside the measured range is extrapolation.
- max_new_tokens against a plain loop over n on predict; the fix-up search of nfit driven directly
  from a wrong first estimate (both directions); the reference's cap for budgets that overflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from helpers.kernel_cases import calibrations, close, kernels, scales
from helpers.model_cases import BAD as EST_BAD
from helpers.model_cases import make_cal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_latency.estimator import _reference
from trt_latency.estimator.calibration import Calibration, ConfigCalibration, ServingLoop
from trt_latency.estimator.model import Estimator, build_tables
from trt_latency.ext import layout

cy = pytest.importorskip("trt_latency.ext._kernels", reason="Cython extension not built")

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JUDGED, BAD = "judged", "bad"
TM = layout.TOKEN_MAX
# Per request list: 4 judged slots for every rejected one, fixed by construction (the share is asserted).
TAGS = (JUDGED, JUDGED, JUDGED, JUDGED, BAD)


def _measured(cal: Calibration, key: tuple[int, int, int]) -> ConfigCalibration | None:
    for c in cal.configs:
        if (c.tier_idx, c.top_k, c.num_active_blocks) == tuple(key):
            return c
    return None


def extrapolated_by_definition(cfg: ConfigCalibration, prompt: int, n: int) -> bool:
    """Prefill reads P tokens; decode step j (j = 0 .. n-2) runs at KV length P + j."""
    pre_lo, pre_hi = cfg.valid_prefill_len
    if not pre_lo <= prompt <= pre_hi:
        return True
    positions = range(prompt, prompt + n - 1)  # empty for n = 1: no decode step
    past_lo, past_hi = cfg.valid_past_len
    return len(positions) > 0 and (positions[0] < past_lo or positions[-1] > past_hi)


def _default_blocks(cal: Calibration, c: ConfigCalibration) -> int | None:
    """None (the tier's largest measured blocks) when that names c itself, else c's own blocks."""
    largest = max(o.num_active_blocks for o in cal.configs if o.tier_idx == c.tier_idx)
    return None if c.num_active_blocks == largest else c.num_active_blocks


_ESTIMATORS: dict[int, tuple[Calibration, Estimator]] = {}


def _reference_estimator(cal: Calibration) -> Estimator:
    if id(cal) not in _ESTIMATORS or _ESTIMATORS[id(cal)][0] is not cal:
        _ESTIMATORS.clear()
        _ESTIMATORS[id(cal)] = (cal, Estimator(cal, implementation=_reference))
    return _ESTIMATORS[id(cal)][1]


@st.composite
def judged_request(draw: st.DrawFn, cal: Calibration) -> dict[str, Any]:
    """A request the model must judge: a key of the calibration, a non-empty prompt, fields in range,
    and a budget near the request's own total (so admit, fewer and none all come up)."""
    c = draw(st.sampled_from(cal.configs))
    vision, text = draw(st.integers(0, 3000)), draw(st.integers(0, 3000))
    if vision + text == 0:
        text = 1
    req = draw(st.one_of(st.none(), st.integers(1, 3000)))
    # a budget around the model's own total for some length: fits, fewer and none all come up
    m = req if req is not None and draw(st.booleans()) else draw(st.integers(1, 3000))
    total = _reference_estimator(cal).predict(vision, text, m, c.tier_idx, c.top_k, c.num_active_blocks).total_ms
    budget = draw(st.one_of(st.floats(0.3, 1.5).map(lambda f: f * total), st.just(total), st.integers(0, 2000)))
    return {"budget": budget, "vision": vision, "text": text, "req": req, "tier": c.tier_idx, "top_k": c.top_k,
            "blocks": draw(st.sampled_from([c.num_active_blocks, c.num_active_blocks, _default_blocks(cal, c)])),
            "alpha": draw(st.one_of(st.none(), st.sampled_from([0.01, 0.05, 0.1]), st.floats(0.001, 0.999))),
            "tag": JUDGED, "code": None}


BAD_VALUES: dict[str, list[Any]] = {
    "budget": [-1.0, math.nan, math.inf, -math.inf],
    "vision": [-1, TM + 1],
    "text": [-5, TM + 1],
    "req": [0, -2, TM + 1],
    "tier": [-1, TM + 1],
    "top_k": [-1, TM + 1],
    "blocks": [-2, TM + 1],
}
FIELD_CODE = {"budget": 0, "vision": 1, "text": 2, "req": 3, "tier": 4, "top_k": 5, "blocks": 6}


@st.composite
def rejected_request(draw: st.DrawFn, cal: Calibration) -> dict[str, Any]:
    """A judged request spoilt in one way, with the exact code it must get: one field out of range
    (the first bad field in check order decides), an empty prompt, or a key the calibration lacks."""
    r = draw(judged_request(cal))
    r["tag"], r["alpha"] = BAD, None
    how = draw(st.sampled_from([*FIELD_CODE, "empty", "unknown"]))
    if how == "empty":
        r["vision"] = r["text"] = 0
        r["code"] = layout.CODE_EMPTY_PROMPT
    elif how == "unknown":
        known = {(c.tier_idx, c.top_k) for c in cal.configs}
        tier = draw(st.integers(0, 6))
        top_k = draw(st.integers(0, 6).filter(lambda k: (tier, k) not in known))
        r["tier"], r["top_k"] = tier, top_k
        r["code"] = layout.CODE_UNKNOWN_CONFIG
    else:
        r[how] = draw(st.sampled_from(BAD_VALUES[how]))
        r["code"] = layout.CODE_BAD + FIELD_CODE[how]
    return r


@st.composite
def tagged_requests(draw: st.DrawFn, cal: Calibration, size: int = 10) -> list[dict[str, Any]]:
    tags = [TAGS[i % len(TAGS)] for i in range(size)]
    out = [draw(judged_request(cal) if t == JUDGED else rejected_request(cal)) for t in tags]
    return draw(st.permutations(out))


def _check_tag(r: dict[str, Any], code: int) -> None:
    if r["tag"] == JUDGED:
        assert 0 <= code < layout.CODE_BAD, (r, code)
    else:
        assert code == r["code"], (r, code)


def _share(codes: list[int]) -> None:
    """The share the strategies promise, counted on the decisions: 8 of every 10 judged."""
    assert sum(0 <= c < layout.CODE_BAD for c in codes) == len(codes) * 4 // 5, codes


@st.composite
def cal_and_requests(draw: st.DrawFn) -> tuple[Calibration, list[dict[str, Any]]]:
    cal = draw(calibrations())
    return cal, draw(tagged_requests(cal))


def _args(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["budget"], r["vision"], r["text"], r["req"], r["tier"], r["top_k"], r["blocks"])


def _oracle_flag(cal: Calibration, kernel: Any, r: dict[str, Any], d: Any) -> None:
    """d.extrapolated from the definition, on the KV range the decision used (max of fit, requested)."""
    row = kernel.lookup(r["tier"], r["top_k"], -1 if r["blocks"] is None else r["blocks"])
    key = build_tables(cal)[1][row]
    cfg = _measured(cal, key)
    if cfg is None:
        return
    n = max(d.max_new_tokens, r["req"] or 1)
    assert d.extrapolated == extrapolated_by_definition(cfg, r["vision"] + r["text"], n), (r, tuple(d))


@SETTINGS
@given(cal_and_requests())
def test_admit_judged_cython_equals_reference(data: tuple[Calibration, list[dict[str, Any]]]) -> None:
    cal, reqs = data
    _compare_decisions(cal, reqs, [(r["alpha"],) for r in reqs], "admit")


def _compare_decisions(cal: Calibration, reqs: list[dict[str, Any]], extra: list[tuple[float, ...]],
                       method: str) -> None:
    """Cython == reference for ``method`` (admit / admit_scaled) over the requests, each decision's code
    as its tag says, the judged ones' flags against their definition, and the judged share asserted."""
    kc, kr = kernels(cal)
    codes = []
    for r, more in zip(reqs, extra, strict=True):
        dc, dr = getattr(kc, method)(*_args(r), *more), getattr(kr, method)(*_args(r), *more)
        assert (dc.admit, dc.max_new_tokens, dc.code) == (dr.admit, dr.max_new_tokens, dr.code), r
        assert close(dc.predicted_ms, dr.predicted_ms), r
        _check_tag(r, dc.code)
        codes.append(dc.code)
        if r["tag"] == JUDGED:
            _oracle_flag(cal, kr, r, dr)
    _share(codes)


@SETTINGS
@given(cal_and_requests(), st.lists(scales, min_size=10, max_size=10))
def test_admit_scaled_judged_cython_equals_reference(data: tuple[Calibration, list[dict[str, Any]]],
                                                     sc: list[tuple[float, float, float]]) -> None:
    cal, reqs = data
    _compare_decisions(cal, reqs, [tuple(s) for s in sc], "admit_scaled")


@SETTINGS
@given(cal_and_requests(), st.one_of(st.none(), st.floats(0.01, 0.5)))
def test_admit_batch_judged_and_invalid_rows(data: tuple[Calibration, list[dict[str, Any]]],
                                             alpha: float | None) -> None:
    """admit_batch (both implementations) == scalar admit row by row, the invalid-field rows included."""
    cal, reqs = data
    cols = [np.array([float(r["budget"]) for r in reqs])]
    for name in ("vision", "text", "req", "tier", "top_k", "blocks"):
        cols.append(np.array([-1 if r[name] is None else r[name] for r in reqs], dtype=np.int64))
    results = []
    for kernel in kernels(cal):
        ok, n, pred, code = kernel.admit_batch(*cols, -1.0 if alpha is None else alpha)
        for i, r in enumerate(reqs):
            d = kernel.admit(*_args(r), alpha)
            assert (bool(ok[i]), int(n[i]), int(code[i])) == (d.admit, d.max_new_tokens, d.code), r
            assert close(float(pred[i]), d.predicted_ms)
            _check_tag(r, int(code[i]))
        _share(code.tolist())
        results.append((ok, n, code))
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b)


def test_admit_batch_every_invalid_field() -> None:
    """Every bad value of every field, as a row next to a valid one: each gets its exact code from
    both implementations, in the arrays and in scalar admit alike; the valid rows are judged."""
    cal = _one_config()
    good = {"budget": 50.0, "vision": 0, "text": 20, "req": 8, "tier": 0, "top_k": 1, "blocks": 2}
    rows = [dict(good)]
    want = [None]
    for name, values in BAD_VALUES.items():
        for value in values:
            rows += [{**good, name: value}, dict(good)]
            want += [layout.CODE_BAD + FIELD_CODE[name], None]
    rows += [{**good, "vision": 0, "text": 0}, {**good, "tier": 1}, {**good, "top_k": 0}, {**good, "blocks": 3}]
    want += [layout.CODE_EMPTY_PROMPT] + [layout.CODE_UNKNOWN_CONFIG] * 3
    cols = [np.array([float(r["budget"]) for r in rows])]
    for name in ("vision", "text", "req", "tier", "top_k", "blocks"):
        cols.append(np.array([-1 if r[name] is None else r[name] for r in rows], dtype=np.int64))
    for kernel in kernels(cal):
        ok, n, _, code = kernel.admit_batch(*cols, -1.0)
        for i, (r, w) in enumerate(zip(rows, want, strict=True)):
            if w is None:
                assert 0 <= code[i] < layout.CODE_BAD and ok[i] and n[i] == 8, (r, code[i])
            else:
                assert code[i] == w and not ok[i] and n[i] == 0, (r, code[i], w)
            assert int(code[i]) == kernel.admit(*_args(r), None).code


@pytest.mark.parametrize("alpha", [math.nan, 1.0, 1.5])
def test_admit_batch_bad_alpha_rejects_valid_rows_only(alpha: float) -> None:
    cal = _one_config()
    rows = [np.array([100.0, -1.0]), *(np.array(v, dtype=np.int64) for v in ([0, 0], [50, 50], [-1, -1], [0, 0],
                                                                                [1, 1], [2, 2]))]
    for kernel in kernels(cal):
        ok, _, _, code = kernel.admit_batch(*rows, alpha)
        assert code.tolist() == [layout.CODE_BAD + 7, layout.CODE_BAD + 0] and not ok.any()


# ------------------------------------------------------------------------------ Estimator.admit fuzz, mostly judged

EST_FIELDS = list(EST_BAD)  # budget_ms, vision_tokens, ..., alpha: each with its known-invalid values


@st.composite
def estimator_request(draw: st.DrawFn, spoil: str | None) -> dict[str, Any]:
    """Valid fields for test_estimator_model's calibration (numpy scalars too), or one field spoilt."""
    ints = st.one_of(st.integers(0, 2000), st.integers(0, 2000).map(np.int64), st.integers(0, 2000).map(np.int32))
    r = {"budget_ms": draw(st.one_of(st.floats(0.0, 3e3), st.integers(0, 3000), st.floats(0.0, 3e3).map(np.float32))),
         "vision_tokens": draw(ints), "text_tokens": draw(ints) + 1,
         "max_new_tokens": draw(st.one_of(st.none(), st.integers(1, 3000))),
         "tier_idx": 0, "top_k": 1, "num_active_blocks": draw(st.sampled_from([4, 2, 3, None])),  # 3: factorised
         "alpha": draw(st.one_of(st.none(), st.sampled_from([0.01, 0.05, 0.1]), st.floats(0.001, 0.999)))}
    if spoil is not None:
        r[spoil] = draw(st.sampled_from(EST_BAD[spoil]))
    return r


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_estimator_admit_fuzz_mostly_judged(data: st.DataObject) -> None:
    """4 valid requests for each spoilt one: the valid ones are judged (and both implementations
    agree on them), the spoilt one is rejected naming its field."""
    ests = [Estimator(make_cal(), implementation=impl) for impl in (cy, _reference)]
    spoils: list[str | None] = [None, None, None, None, data.draw(st.sampled_from(EST_FIELDS))]
    judged = 0
    for spoil in data.draw(st.permutations(spoils)):
        r = data.draw(estimator_request(spoil))
        dc, dr = (e.admit(**r) for e in ests)
        assert (dc.admit, dc.max_new_tokens, dc.reason) == (dr.admit, dr.max_new_tokens, dr.reason), r
        assert close(dc.predicted_ms, dr.predicted_ms)
        if spoil is None:
            judged += dc.judged
            assert dc.max_new_tokens >= (0 if dc.code >> 4 == layout.ST_NONE else 1) and dc.predicted_ms > 0.0
        else:
            assert not dc.admit and dc.max_new_tokens == 0 and math.isnan(dc.predicted_ms)
            assert spoil in dc.reason, (spoil, r[spoil], dc.reason)
    assert judged == 4


# ------------------------------------------------------------------------------ max_new_tokens, brute force


def _one_config(loop: Any = None) -> Calibration:
    return Calibration(1, {}, [ConfigCalibration(
        tier_idx=0, top_k=1, num_active_blocks=2, decode_knots=[0.0, 40.0, 300.0, 900.0],
        decode_values_ms=[0.5, 0.7, 1.9, 2.2], prefill_coeffs=[3.0, 0.02, 1e-5], residual_quantiles={0.9: 1.2},
        valid_past_len=[0.0, 900.0], valid_prefill_len=[1.0, 400.0], serving_loop=loop)])  # fmt: skip


def brute_max_new_tokens(est: Estimator, budget: float, vision: int, text: int, kw: dict[str, Any],
                         limit: int) -> int:
    """Largest n <= limit with predict(n).total <= budget, by walking n up from 1 (totals never decrease)."""
    n = 0
    while n < limit and est.predict(vision, text, n + 1, **kw).total_ms <= budget:
        n += 1
    return n


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calibrations(), st.data())
def test_max_new_tokens_equals_brute_force(cal: Calibration, data: st.DataObject) -> None:
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        for _ in range(3):
            key = data.draw(st.sampled_from(est.configs()))
            kw = {"tier_idx": key.tier_idx, "top_k": key.top_k, "num_active_blocks": key.num_active_blocks}
            vision, text = data.draw(st.integers(0, 2000)), data.draw(st.integers(1, 2000))
            pick = data.draw(st.integers(1, 400))
            p = est.predict(vision, text, pick, **kw)
            exact = p.total_ms
            # Budgets around total(pick), moved by a share of its steady steps (not of the total: with a
            # prefill-heavy calibration 1.3 x total buys thousands of tokens; nor of its decode part, which
            # holds the first step's c(P): 73 ms of c1 x P over 0.01-ms steps bought 1900 more). T(L) is
            # non-decreasing, so 0.3 x (total(pick) - total(2)) more buys at most ~0.3 x pick more steps.
            steady = exact - est.predict(vision, text, 2, **kw).total_ms if pick > 2 else 0.0
            budget = data.draw(st.sampled_from([exact, math.nextafter(exact, 0.0), exact - 0.3 * steady,
                                                exact + 0.3 * steady]))
            want = brute_max_new_tokens(est, budget, vision, text, kw, limit=2000)
            assert want < 2000
            assert est.max_new_tokens(budget, vision, text, **kw) == want
            if budget == exact:
                assert want >= pick  # total(pick) == budget fits


# ------------------------------------------------------------------------------ the fix-up search itself


def _fixup_both(cal: Calibration, prompt: float, budget: float, factor: float, start: int, ps: float = 1.0,
                ds: float = 1.0) -> tuple[int, int]:
    kc, kr = kernels(cal)
    pre, cp = kr.prefill(0, prompt) * ps, kr.cumsum(0, prompt)
    return (kc._fixup_from(0, prompt, budget, factor, start, ps, ds),
            kr._fixup(0, prompt, budget, factor, start, pre, cp, ds))


@pytest.mark.parametrize("offset", [-10, -1, 0, 1, 10, 1000])
@pytest.mark.parametrize("where", ["exact", "between"])
def test_fixup_from_a_wrong_estimate(offset: int, where: str) -> None:
    """Started `offset` away from the answer, the search still lands on the largest n that fits,
    including when the budget equals total(n) exactly (a `<` for `<=` returns n - 1 there)."""
    cal = _one_config()
    kr = kernels(cal)[1]
    prompt, factor, ps, ds = 37.0, 1.1, 1.3, 0.8
    for answer in (2, 12, 300, 777):
        exact = kr.total_scaled(0, prompt, float(answer), ps, ds, factor)
        budget = exact if where == "exact" else (exact + kr.total_scaled(0, prompt, answer + 1.0, ps, ds, factor)) / 2
        start = max(1, answer + offset)
        assert _fixup_both(cal, prompt, budget, factor, start, ps, ds) == (answer, answer), (answer, start)
        # the search from the kernel's own estimate agrees
        assert kr.nfit_scaled(0, prompt, budget, ps, ds, factor) == answer


def test_fixup_caps_at_token_max() -> None:
    cal = _one_config()
    kr = kernels(cal)[1]
    big = kr.total(0, 10.0, float(TM), 1.0) * 2
    for start in (1, TM - 10, TM):
        assert _fixup_both(cal, 10.0, big, 1.0, start) == (TM, TM)


@pytest.mark.parametrize("budget", [1e300, 1e308, 1.7976931348623157e308])
def test_nfit_overflowing_budget_is_capped(budget: float) -> None:
    """A budget whose inverse overflows (inf / inf = NaN in the quadratic solve) is capped, not an error."""
    cal = _one_config()
    for kernel in kernels(cal):
        assert kernel.nfit(0, 10.0, budget, 0.5) == TM
        d = kernel.admit(budget, 0, 10, None, 0, 1, 2)
        assert d.admit and d.max_new_tokens == TM and d.extrapolated


def test_nfit_target_below_the_first_piece() -> None:
    """A first-step transient c (50 ms) larger than what the budget leaves after the prefill: the
    closed-form target is negative (below every piece), the estimate is clamped to piece 0, r = 0, and
    the search from there finds n = 1 (the prefill fits, the first decode step with c does not)."""
    loop = ServingLoop(decode_step_ms=0.0, first_step_ms=50.0, prefill_ms=0.0, n_requests=8, source="replay")
    cal = _one_config(loop)
    for kernel in kernels(cal):
        one, two = kernel.total(0, 2.0, 1.0, 1.0), kernel.total(0, 2.0, 2.0, 1.0)
        assert two - one > 50.0
        for budget in (one, one + 10.0, two - 1e-9):
            assert kernel.nfit(0, 2.0, budget, 1.0) == 1, budget
        assert kernel.nfit(0, 2.0, two, 1.0) == 2
        assert kernel.nfit(0, 2.0, math.nextafter(one, 0.0), 1.0) == 0


@pytest.mark.parametrize("prompt", [1, 16, 256, 1024, 2048, 4096])
def test_first_step_growing_with_the_prompt(prompt: int) -> None:
    """c(P) = c0 + c1 P (genai's first step after a prefill: +2 .. +212 ms at P = 16 .. 4096, issue 24):
    the jump from n = 1 to n = 2 is the step at KV P plus c0 + c1 P, computed from the table's own values,
    and max_new_tokens equals the brute-force walk over predict, for the vision tokens counted in P too."""
    c0, c1 = 2.0, 0.05
    loop = ServingLoop(decode_step_ms=0.1, first_step_ms=c0, prefill_ms=0.3, n_requests=8, source="replay",
                       first_step_per_token_ms=c1)
    cal = _one_config(loop)
    for kernel in kernels(cal):
        jump = kernel.total(0, float(prompt), 2.0, 1.0) - kernel.total(0, float(prompt), 1.0, 1.0)
        assert jump == pytest.approx(kernel.step(0, float(prompt)) + c0 + c1 * prompt, rel=1e-12)
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        one = est.predict(0, prompt, 1).total_ms
        for budget in (one, one + c0 + c1 * prompt, one + c0 + c1 * prompt + 40.0, one + 500.0):
            for vision in {0, prompt // 2}:
                want = brute_max_new_tokens(est, budget, vision, prompt - vision, {}, 2000)
                assert est.max_new_tokens(budget, vision, prompt - vision) == want, (budget, vision)
                assert est.admit(budget, vision, prompt - vision, None).max_new_tokens == want


# ------------------------------------------------------------------------------ predict_batch flags


def test_predict_batch_flags_by_definition() -> None:
    cal = _one_config()
    cfg = cal.configs[0]
    prompts = [1, 2, 399, 400, 401, 899, 900, 901]
    ns = [1, 2, 3, 500, 501, 502, 899, 900, 901]
    v = np.array([0] * (len(prompts) * len(ns)), dtype=np.int64)
    t = np.array([p for p in prompts for _ in ns], dtype=np.int64)
    o = np.array([n for _ in prompts for n in ns], dtype=np.int64)
    want = [extrapolated_by_definition(cfg, p, n) for p in prompts for n in ns]
    assert 0 < sum(want) < len(want)
    for impl in (cy, _reference):
        est = Estimator(cal, implementation=impl)
        flags = est.predict_batch(v, t, o)[3]
        assert [bool(f & 1) for f in flags] == want
        for p, n in ((400, 501), (400, 502), (1, 900), (1, 901)):
            assert ("extrapolated" in est.predict(0, p, n).flags) == extrapolated_by_definition(cfg, p, n)


def test_alpha_factor_takes_the_largest_stored_alpha_not_above() -> None:
    """By definition: the conformal factor of the largest stored alpha <= alpha (an alpha equal to a
    stored one takes that one); below every stored alpha, the residual quantile of 1 - alpha."""
    base = _one_config().configs[0]
    cfg = ConfigCalibration(**{**base.__dict__, "conformal": {"alphas": [0.05, 0.1], "factors": [1.6, 1.3], "n": 100},
                               "residual_quantiles": {0.9: 1.2, 0.99: 1.4}})
    cal = Calibration(1, {}, [cfg])
    cases = [(0.05, 1.6, layout.F_CONFORMAL), (0.07, 1.6, layout.F_CONFORMAL), (0.1, 1.3, layout.F_CONFORMAL),
             (0.5, 1.3, layout.F_CONFORMAL), (0.01, 1.4, layout.F_RESIDUAL), (0.001, 1.4, layout.F_CLIPPED)]
    for kernel in kernels(cal):
        raw = kernel.total(0, 30.0, 10.0, 1.0)
        for alpha, factor, src in cases:
            assert kernel.alpha_factor(0, alpha) == (factor, src), alpha
            d = kernel.admit(1e6, 0, 30, 10, 0, 1, 2, alpha)
            assert d.code & 3 == src and d.predicted_ms == pytest.approx(factor * raw, rel=1e-12), alpha
