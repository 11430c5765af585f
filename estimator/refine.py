"""Per-position medians + their standard errors -> which positions the sweep should measure further.

This is the fit's half of the adaptive sweep. The sweep (engines/adaptive.py) only knows "a position is
done when the relative SE of its median is under its target"; this module, which knows the fit, says
where that target must be tighter. It satisfies engines' ``Refiner`` protocol structurally (plain numpy
in, plain numpy out), so neither package imports the other; the calibrate pipeline (trt_latency/pipeline.py) wires them.

Rules, per phase (decode: the monotone piecewise-linear fit of estimator.fit; prefill: the quadratic):
- a position whose leave-one-position-out residual is large compared with its noise
  (|r| > SIGNIFICANCE * sqrt(se_i^2 + se_neighbours^2)) is re-measured, and so are its two neighbours
  (they make the prediction it is compared with): their targets halve, down to FLOOR * precision, so an
  outlier gets at most two rounds of re-measurement and then stands as measured, never averaged away;
- a knot of the chosen decode fit is measured to KNOT_FACTOR * precision (the fit hinges on it).
"""

from __future__ import annotations

import math

import numpy as np

from trt_latency.estimator.fit import fit_decode, fit_prefill, prefill_eval

SIGNIFICANCE = 2.5
TIGHTEN = 0.5
FLOOR = 0.25
KNOT_FACTOR = 0.6


def prefill_lopo(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed relative leave-one-length-out error of the quadratic prefill fit (nan below 4 lengths)."""
    n = s.shape[0]
    out = np.full(n, np.nan)
    if n < 4:
        return out
    for i in range(n):
        keep = np.arange(n) != i
        coeffs = fit_prefill(s[keep], y[keep])
        out[i] = float(prefill_eval(coeffs, s[i: i + 1])[0]) / y[i] - 1.0
    return out


class LopoRefiner:
    """Tighter SE targets where the leave-one-position-out check says a position matters."""

    def __init__(self, significance: float = SIGNIFICANCE, tighten: float = TIGHTEN, floor: float = FLOOR,
                 knot_factor: float = KNOT_FACTOR) -> None:
        self.significance = significance
        self.tighten = tighten
        self.floor = floor
        self.knot_factor = knot_factor
        self.last_loo: dict[str, np.ndarray] = {}  # per phase, the residuals of the last call (reports)

    def targets(self, phase: str, x: np.ndarray, median: np.ndarray, se_rel: np.ndarray,
                precision: float) -> tuple[np.ndarray, list[str]]:
        n = x.shape[0]
        out = np.full(n, math.inf)
        why = [""] * n
        knots: set[float] = set()
        if phase == "decode":
            dfit = fit_decode(x, median)
            loo = dfit.loo_rel
            if dfit.knots.shape[0] > 2:  # a straight line's endpoints are not decisions
                knots = {float(k) for k in dfit.knots[1:-1]}
        else:
            loo = prefill_lopo(x, median)
        self.last_loo[phase] = loo
        se = np.where(np.isfinite(se_rel), se_rel, np.nan)
        floor = precision * self.floor
        for i in range(n):
            if float(x[i]) in knots:
                out[i] = min(out[i], precision * self.knot_factor)
                why[i] = "knot"
            r = loo[i]
            if not math.isfinite(float(r)):
                continue
            neighbours = [se[j] for j in (i - 1, i + 1) if 0 <= j < n and math.isfinite(float(se[j]))]
            se_pred = float(np.mean(neighbours)) if neighbours else 0.0
            noise = math.hypot(float(se[i]) if math.isfinite(float(se[i])) else 0.0, se_pred)
            if noise <= 0 or abs(float(r)) <= self.significance * noise:
                continue
            for j in (i - 1, i, i + 1):
                if 0 <= j < n and math.isfinite(float(se[j])):
                    tgt = max(float(se[j]) * self.tighten, floor)
                    if tgt < out[j]:
                        out[j] = tgt
                        why[j] = "lopo_residual" if j == i else "lopo_neighbour"
        return out, why
