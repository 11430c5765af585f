"""The fit's refiner: an outlier position and its neighbours get tighter targets, knots too; prefill LOPO."""

from __future__ import annotations

import numpy as np

from trt_latency.estimator.refine import FLOOR, LopoRefiner, prefill_lopo


def test_outlier_and_its_neighbours_are_sent_back_quiet_positions_are_not() -> None:
    x = np.array([1, 2, 4, 8, 16, 64, 128, 256, 512, 1024, 2048, 4096], dtype=np.float64)
    y = 1.0 + 2e-4 * x
    y[6] *= 1.05  # 5 % off its neighbours at past_len 128
    se = np.full(x.shape, 0.003)
    targets, why = LopoRefiner().targets("decode", x, y, se, precision=0.004)
    flagged = {int(x[i]) for i in np.flatnonzero(np.isfinite(targets))}
    assert {64, 128, 256} <= flagged
    assert why[6] == "lopo_residual" and why[5] == why[7] == "lopo_neighbour"
    assert targets[6] == max(0.003 * 0.5, 0.004 * FLOOR)
    assert np.isinf(targets[[0, 1, 2, 3, 11]]).all()  # far from the outlier, on the line: no opinion
    # The same deviation inside the noise (SE 5 %) is not significant: nothing is re-measured for it.
    targets, why = LopoRefiner().targets("decode", x, y, np.full(x.shape, 0.05), precision=0.004)
    assert "lopo_residual" not in why


def test_knots_of_a_bent_curve_get_a_tighter_target() -> None:
    x = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=np.float64)
    y = np.where(x < 512, 1.0, 1.0 + 1e-3 * (x - 512))  # flat, then a slope: a knot near 512
    knee = int(np.flatnonzero(x == 512)[0])
    # Well measured: leaving the knee out mispredicts it by 20 %, far beyond its noise: re-measured.
    targets, why = LopoRefiner().targets("decode", x, y, np.full(x.shape, 1e-4), precision=0.004)
    assert why[knee] == "lopo_residual" and targets[knee] == 0.004 * FLOOR
    # Noisy (SE 50 %): the residual proves nothing, but the fit still hinges on its knot there.
    targets, why = LopoRefiner().targets("decode", x, y, np.full(x.shape, 0.5), precision=0.004)
    assert why[knee] == "knot" and targets[knee] == 0.004 * 0.6 and why.count("knot") == 1


def test_prefill_lopo_of_an_exact_quadratic_is_zero() -> None:
    s = np.array([8, 16, 32, 64, 128, 256, 512], dtype=np.float64)
    y = 0.5 + 0.01 * s + 1e-5 * s * s
    assert np.abs(prefill_lopo(s, y)).max() < 1e-6
    assert np.isnan(prefill_lopo(s[:3], y[:3])).all()
