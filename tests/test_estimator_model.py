"""Estimator API: semantics of predict / max_new_tokens / admit, bad fields, flags, kernel selection."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.model_cases import BAD, make_cal
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_latency.errors import InputError
from trt_latency.estimator import _reference
from trt_latency.estimator.calibration import (
    save_calibration,
)
from trt_latency.estimator.model import Estimator

IMPLS = [_reference]
try:
    from trt_latency.ext import _kernels

    IMPLS.append(_kernels)
except ImportError:  # pragma: no cover - the reference alone is still tested
    pass


@pytest.fixture(params=IMPLS, ids=lambda m: m.IMPLEMENTATION)
def est(request: pytest.FixtureRequest) -> Estimator:
    return Estimator(make_cal(), implementation=request.param)


def test_predict_is_prefill_plus_sum_of_steps(est: Estimator) -> None:
    p = est.predict(100, 28, 50)
    prompt = 128
    loop = sum(est.decode_step_ms(prompt + j) for j in range(49))
    assert math.isclose(p.decode_ms, loop, rel_tol=1e-12)
    assert math.isclose(p.prefill_ms, 2.0 + 0.01 * 128 + 1e-6 * 128**2, rel_tol=1e-12)
    assert p.total_ms == p.prefill_ms + p.decode_ms and p.flags == ""
    assert est.predict(100, 28, 1).decode_ms == 0.0
    assert math.isclose(est.predict(100, 28, 50, quantile=0.95).total_ms, 1.25 * p.total_ms, rel_tol=1e-12)
    assert est.predict(100, 28, 50, quantile=0.999).flags == "quantile beyond calibrated"


def test_max_new_tokens_inverse(est: Estimator) -> None:
    for budget in (0.1, 3.5, 10.0, 57.3, 400.0, 1e4):
        n = est.max_new_tokens(budget, 64, 100)
        if n == 0:
            assert est.predict(64, 100, 1).total_ms > budget
        else:
            assert est.predict(64, 100, n).total_ms <= budget < est.predict(64, 100, n + 1).total_ms


def test_admit_semantics(est: Estimator) -> None:
    total64 = est.predict(64, 100, 64).total_ms
    d = est.admit(total64, 64, 100, 64)
    assert d.admit and d.max_new_tokens == 64 and d.predicted_ms == total64 and d.reason == "fits the budget"
    d = est.admit(math.nextafter(total64, 0.0), 64, 100, 64)
    assert not d.admit and d.max_new_tokens == 63 and d.predicted_ms == total64
    assert "over budget" in d.reason
    d = est.admit(total64, 64, 100)  # no requested length: as many tokens as fit
    assert d.admit and d.max_new_tokens == est.max_new_tokens(total64, 64, 100) >= 64
    d = est.admit(0.5, 64, 100, 8)
    assert not d.admit and d.max_new_tokens == 0 and "prefill alone" in d.reason
    admit, n, pred, reason = est.admit(total64, vision_tokens=64, text_tokens=100, max_new_tokens=64)  # unpacks
    assert admit and n == 64


def test_alpha_uses_conformal_then_residual(est: Estimator) -> None:
    base = est.predict(64, 100, 32).total_ms
    d = est.admit(1e6, 64, 100, 32, alpha=0.05)  # largest stored alpha <= 0.05 is 0.01 -> factor 1.5
    assert d.predicted_ms == pytest.approx(1.5 * base, rel=1e-12) and "conformal" in d.reason
    d = est.admit(1e6, 64, 100, 32, alpha=0.005)  # below every stored alpha: residual quantile of 0.995
    assert "beyond calibrated" in d.reason and d.predicted_ms == pytest.approx(1.25 * base, rel=1e-12)
    d = est.admit(1e6, 64, 100, 32, tier_idx=0, top_k=1, num_active_blocks=2, alpha=0.1)  # no conformal data
    assert "residual quantiles" in d.reason


def test_default_blocks_factorised_and_extrapolation(est: Estimator) -> None:
    assert est.admit(1e6, 64, 100, 8) == est.admit(1e6, 64, 100, 8, num_active_blocks=4)
    d = est.admit(1e6, 64, 100, 8, num_active_blocks=3)
    assert d.admit and "factorised" in d.reason
    assert (0, 1, 3) in est.estimated_configs() and (0, 1, 3) not in est.configs()
    assert est.predict(64, 100, 8, num_active_blocks=3).flags.startswith("factorised")
    d = est.admit(1e6, 4000, 0, 500)
    assert d.admit and "extrapolated" in d.reason
    # beyond the last knot: the last segment's slope continues
    slope = (3.0 - 1.2) / (4096 - 1024)
    assert est.decode_step_ms(5096) == pytest.approx(3.0 + 1000 * slope, rel=1e-12)
    assert est.decode_step_ms(0) == pytest.approx(1.0)  # below the first knot: held at the first value


@pytest.mark.parametrize("field", list(BAD))
def test_admit_never_raises_on_bad_fields(est: Estimator, field: str) -> None:
    good = {"budget_ms": 100.0, "vision_tokens": 64, "text_tokens": 100, "max_new_tokens": 16, "tier_idx": 0,
            "top_k": 1, "num_active_blocks": 4, "alpha": 0.05}
    for value in BAD[field]:
        d = est.admit(**{**good, field: value})
        assert (d.admit, d.max_new_tokens) == (False, 0) and math.isnan(d.predicted_ms), (field, value)
        assert field in d.reason, (field, value, d.reason)
    d = est.admit(**{**good, "tier_idx": 7})
    assert not d.admit and "unknown config" in d.reason
    d = est.admit(**{**good, "vision_tokens": 0, "text_tokens": 0})
    assert not d.admit and "empty prompt" in d.reason


def test_numpy_scalars_are_accepted(est: Estimator) -> None:
    a = est.admit(np.float32(100.0), np.int64(64), np.int32(100), np.uint16(16), alpha=np.float64(0.05))
    b = est.admit(100.0, 64, 100, 16, alpha=0.05)
    assert a == b


@settings(max_examples=200, deadline=None)
@given(st.tuples(*[st.one_of(st.none(), st.integers(-10, 10**20), st.floats(allow_nan=True), st.text(max_size=3),
                             st.booleans(), st.binary(max_size=2))] * 8))
def test_admit_never_raises_fuzz(args: tuple) -> None:
    for impl in IMPLS:
        d = Estimator(make_cal(), implementation=impl).admit(*args)
        assert isinstance(d.reason, str) and d.max_new_tokens >= 0


def test_predict_raises_input_error(est: Estimator) -> None:
    with pytest.raises(InputError, match="output_tokens"):
        est.predict(1, 1, 0)
    with pytest.raises(InputError, match="unknown config"):
        est.predict(1, 1, 5, tier_idx=3)
    with pytest.raises(InputError, match="budget_ms"):
        est.max_new_tokens(math.nan, 1, 1)


def test_config_lookup_and_listing(est: Estimator) -> None:
    assert est.configs() == [(0, 1, 4), (0, 1, 2)]
    assert (0, 1, 1) in est.estimated_configs()


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_import_does_not_pull_heavy_modules() -> None:
    code = (
        "import sys, trt_latency, trt_latency.estimator\n"
        "from trt_latency import Estimator\n"
        "from trt_latency.estimator import model, fit, calibration, samples, kernels, trtexec\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'cuda', 'matplotlib', 'tqdm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok', Estimator.__name__)\n"
    )
    r = _run(code)
    assert r.returncode == 0 and "ok Estimator" in r.stdout, r.stderr


def test_purepython_env_forces_reference(tmp_path: Path) -> None:
    path = tmp_path / "cal.yaml"
    save_calibration(make_cal(), path)
    code = f"from trt_latency import Estimator; e = Estimator.load({str(path)!r}); print(e.implementation, e.admit(50.0, 1, 1, 3).admit)"
    r = _run(code, TRT_LATENCY_PUREPYTHON="1")
    assert r.returncode == 0 and r.stdout.split() == ["reference", "True"], r.stderr
    if len(IMPLS) > 1:
        r = _run(code, TRT_LATENCY_PUREPYTHON="0")
        assert r.stdout.split() == ["cython", "True"], r.stderr


def test_missing_extension_warns_and_falls_back() -> None:
    code = (
        "import sys, warnings\n"
        "sys.modules['trt_latency.ext._kernels'] = None  # as if the extension were not built\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from trt_latency.estimator import kernels\n"
        "print(kernels.IMPLEMENTATION, len(w), 'Cython kernels unavailable' in str(w[0].message))\n"
    )
    r = _run(code, TRT_LATENCY_PUREPYTHON="0")
    assert r.stdout.split() == ["reference", "1", "True"], r.stderr


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.IMPLEMENTATION)
def test_serving_loop_terms_in_step_predict_and_factorised_configs(impl: object) -> None:
    """serving=True (default) adds o per step, c once (n >= 2) and o_p to the prefill; serving=False is
    the engine alone; a factorised config borrows its nearest measured config's loop terms."""
    import dataclasses

    from trt_latency.estimator.calibration import ServingLoop

    loop = ServingLoop(decode_step_ms=0.4, first_step_ms=1.5, prefill_ms=0.7, n_requests=10, source="replay")
    base = make_cal()
    cal = dataclasses.replace(base, configs=[dataclasses.replace(c, serving_loop=loop) for c in base.configs])
    est, engine = Estimator(cal, implementation=impl), Estimator(base, implementation=impl)
    for blocks in (4, 2, 3):  # 3: factorised
        kw = {"num_active_blocks": blocks}
        assert est.decode_step_ms(700, serving=False, **kw) == engine.decode_step_ms(700, **kw)
        assert est.decode_step_ms(700, **kw) == pytest.approx(engine.decode_step_ms(700, **kw) + 0.4, rel=1e-12)
        one, many = est.predict(100, 28, 1, **kw), est.predict(100, 28, 50, **kw)
        assert one.prefill_ms == pytest.approx(engine.predict(100, 28, 1, **kw).prefill_ms + 0.7, rel=1e-12)
        assert one.decode_ms == 0.0  # no decode step: neither c nor o
        assert many.decode_ms == pytest.approx(engine.predict(100, 28, 50, **kw).decode_ms + 1.5 + 49 * 0.4, rel=1e-12)
        assert est.predict(100, 28, 50, serving=False, **kw) == engine.predict(100, 28, 50, **kw)
        assert est.serving_loop(**kw) == loop
        # The inverse stays exact with the jump c at n = 2.
        budget = est.predict(100, 28, 2, **kw).total_ms
        assert est.max_new_tokens(budget, 100, 28, **kw) == 2
        assert est.max_new_tokens(math.nextafter(budget, 0.0), 100, 28, **kw) == 1
