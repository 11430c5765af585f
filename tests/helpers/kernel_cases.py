"""Hypothesis strategies of calibrations and requests, and both kernels over one calibration."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from trt_latency.estimator import _reference
from trt_latency.estimator.calibration import (
    Calibration,
    ConfigCalibration,
    FactorisedModel,
    ServingLoop,
    schema_version_for,
    validate_calibration,
)
from trt_latency.estimator.model import build_tables

serving_loops = st.one_of(
    st.none(),
    st.builds(ServingLoop, decode_step_ms=st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
              first_step_ms=st.one_of(st.just(0.0), st.floats(0.0, 20.0)),
              prefill_ms=st.one_of(st.just(0.0), st.floats(0.0, 10.0)), n_requests=st.integers(0, 100),
              source=st.sampled_from(["replay", "none"]),
              first_step_per_token_ms=st.one_of(st.just(0.0), st.floats(0.0, 0.1))),  # c(P) = c0 + c1 P
)


nonzero_loops = st.builds(ServingLoop, decode_step_ms=st.floats(1e-3, 2.0), first_step_ms=st.floats(1e-3, 20.0),
                          prefill_ms=st.floats(1e-3, 10.0), n_requests=st.just(8), source=st.just("replay"),
                          first_step_per_token_ms=st.one_of(st.just(0.0), st.floats(1e-6, 0.1)))


@st.composite
def config_cal(draw: st.DrawFn, key: tuple[int, int, int],
               loops: st.SearchStrategy[ServingLoop | None] = serving_loops) -> ConfigCalibration:
    n = draw(st.one_of(st.integers(2, 8), st.integers(15, 30)))  # > 16 pieces: the bisection path too
    integer_knots = draw(st.booleans())
    knots: list[float]
    if integer_knots:
        knots = [float(k) for k in sorted(draw(st.sets(st.integers(0, 6000), min_size=n, max_size=n)))]
    else:
        knots = sorted(draw(st.sets(st.floats(0.0, 6000.0, allow_nan=False).map(lambda x: round(x, 3)),
                                    min_size=n, max_size=n)))
    assume(all(b > a for a, b in zip(knots, knots[1:], strict=False)))
    first = draw(st.floats(0.01, 50.0))
    steps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 5.0)), min_size=n - 1, max_size=n - 1))
    values = [first]
    for s in steps:
        values.append(values[-1] + s)
    a = draw(st.floats(0.0, 100.0))
    b = draw(st.floats(0.0, 0.5))
    c = draw(st.floats(0.0, 1e-4))
    qs = sorted(draw(st.sets(st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]), min_size=0, max_size=5)))
    ratios = sorted(draw(st.lists(st.floats(0.5, 3.0), min_size=len(qs), max_size=len(qs))))
    conformal = None
    if draw(st.booleans()):
        alphas = sorted(draw(st.sets(st.sampled_from([0.01, 0.05, 0.1, 0.2]), min_size=1, max_size=4)))
        factors = sorted(draw(st.lists(st.floats(1.0, 3.0), min_size=len(alphas), max_size=len(alphas))), reverse=True)
        conformal = {"alphas": alphas, "factors": factors, "n": 100}
    return ConfigCalibration(
        tier_idx=key[0], top_k=key[1], num_active_blocks=key[2], decode_knots=[float(k) for k in knots],
        decode_values_ms=values, prefill_coeffs=[a, b, c], residual_quantiles=dict(zip(qs, ratios, strict=True)),
        valid_past_len=[float(knots[0]), float(knots[-1])],
        valid_prefill_len=sorted(draw(st.lists(st.integers(0, 4000).map(float), min_size=2, max_size=2))),
        conformal=conformal,
        serving_loop=draw(loops),
    )


@st.composite
def calibrations(draw: st.DrawFn, loops: st.SearchStrategy[ServingLoop | None] = serving_loops) -> Calibration:
    keys = sorted(draw(st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 6)), min_size=1,
                               max_size=4)))
    configs = [draw(config_cal(k, loops)) for k in keys]
    factorised = []
    for tier in sorted({k[0] for k in keys}):
        if draw(st.booleans()):
            factorised.append(FactorisedModel(tier_idx=tier, t0=draw(st.floats(0.01, 5.0)), u=draw(st.floats(0.0, 1.0)),
                                              w=draw(st.floats(-0.1, 0.5)), v=draw(st.floats(0.0, 1e-3)),
                                              valid_past_len=[1.0, 4096.0], n_configs=2))
    cal = Calibration(schema_version_for(configs), {}, configs, factorised)
    validate_calibration(cal)
    return cal


requests = st.fixed_dictionaries({
    "budget": st.one_of(st.floats(0.0, 5e4), st.integers(0, 10**5)),
    "vision": st.integers(0, 3000),
    "text": st.integers(0, 3000),
    "req": st.one_of(st.none(), st.integers(1, 5000)),
    "tier": st.integers(0, 4),
    "top_k": st.integers(0, 4),
    "blocks": st.one_of(st.none(), st.integers(0, 7)),
    "alpha": st.one_of(st.none(), st.sampled_from([0.005, 0.01, 0.05, 0.1, 0.3]), st.floats(0.001, 0.999)),
})


def kernels(cal: Calibration) -> tuple[Any, Any]:
    """(compiled, reference) Kernel over one calibration's tables (the caller skips without the extension)."""
    from trt_latency.ext import _kernels as cy

    tables, _, _ = build_tables(cal)
    return cy.Kernel(tables), _reference.Kernel(tables)


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))


scales = st.tuples(st.floats(0.25, 8.0), st.floats(0.25, 8.0), st.floats(0.5, 3.0))


@st.composite
def vlm_calibrations(draw: st.DrawFn) -> Calibration:
    """calibrations() with a vision section (VIS_* / EMB_* columns filled; sometimes a native grid)."""
    import dataclasses

    from trt_latency.estimator.vision import VisionCalibration

    cal = draw(calibrations())
    lo = draw(st.integers(1, 200))
    vision = VisionCalibration(
        family="vit", tokens_per_patch=draw(st.sampled_from([1.0, 0.25])),
        images_per_call=draw(st.sampled_from(["together", "separate"])),
        fits={1: [draw(st.floats(-1.0, 5.0)), draw(st.floats(0.0, 0.05)), draw(st.floats(0.0, 1e-4))],
              **({2: [0.5, 0.02, 2e-5]} if draw(st.booleans()) else {})},
        patch_range=[float(lo), float(lo + draw(st.integers(0, 3000)))],
        embedding=draw(st.one_of(st.none(), st.tuples(st.floats(-0.1, 0.5), st.floats(0.0, 1e-3)).map(list))),
        native_patches=draw(st.sampled_from([0.0, 196.0, 256.0])),
    )
    if vision.native_patches:
        vision.native_ms = {1: draw(st.floats(0.0, 5.0)), **({2: 1.0} if 2 in vision.fits else {})}
    return dataclasses.replace(cal, vision=vision)

