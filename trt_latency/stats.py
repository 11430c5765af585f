"""Statistics every layer shares (no layer imports: engines/ and estimator/ both use them).

``drift_adjusted``: the sweep's repetitions with the machine's drift divided out. The sweep (engines/) uses
it for the precision it reports and the fit (estimator/) for the medians it fits, so both speak of the same
medians.

``median_se`` / ``median_se_rel``: THE standard error of a median. The sweep stops a position on it
(engines/adaptive.py) and the fit judges its held-out misses with it (estimator/fit.py, ``loo_within_2se``),
so "within 2 SE" means the same thing on both sides.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def median_se(values: np.ndarray | list[float]) -> float:
    """Standard error of the median of ``values`` (same unit), from its order-statistic 95% interval.

    Ranks (1-based) j = round(n/2 - 1.96 sqrt(n)/2), k = round(1 + n/2 + 1.96 sqrt(n)/2), clipped to [1, n]
    (n = 10: x_(2), x_(9)); SE = (x_(k) - x_(j)) / (2 * 1.96). inf below 3 values.

    Why this estimator and not the MAD-normal one (1.2533 * 1.4826 * MAD / sqrt(n)): step latencies are few
    per position (3-30 repetitions) and right-skewed, with occasional slow visits. The binomial interval of
    the median is distribution-free (the count of values under the true median is Binomial(n, 1/2) whatever
    the distribution), so its width tracks the real spread around the median, tails included; the MAD
    formula assumes a normal shape and an asymptotic n, and on skewed timings at n = 5-15 its "2 SE" held
    the true median only 81-91% of the time against 94-99% here (tests/test_stats.py simulates it).
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = v.shape[0]
    if n < 3:
        return math.inf
    half = Z95 * math.sqrt(n) / 2.0
    lo = max(int(round(n / 2.0 - half)), 1)
    hi = min(int(round(1.0 + n / 2.0 + half)), n)
    return float(v[hi - 1] - v[lo - 1]) / (2.0 * Z95)


def median_se_rel(values: np.ndarray | list[float]) -> float:
    """``median_se`` divided by the median: inf below 3 values or for a median <= 0."""
    med = float(np.median(values)) if len(values) else math.nan
    if not med > 0:
        return math.inf
    return median_se(values) / med


def drift_adjusted(keys: np.ndarray, values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The repetitions with the machine's drift divided out, and the drift (log level per repetition).

    ``keys``/``values`` in measuring order (samples.csv is append-only, so file order is time order). The
    sweep visits every position once per round, so the machine's level at a repetition is the running median,
    over ``window`` repetitions (one round: the number of positions) centred on it, of each repetition's log
    ratio to its own position's median; a position's own shape cancels out of that ratio, so what is left is
    what all positions measured then had in common. It is divided out and the overall level kept
    (the median level). Twice: the position medians are re-taken from the adjusted values.

    Why: on the shared 2-core VM that level wanders by 10-27% (robust sd) over seconds, far more than one
    step's own noise, and a position's median otherwise carries whatever the machine did while it was being
    visited. Over four default calibrates it cut the SE of the per-position medians by a third on average
    and the leave-one-position-out median error in 14 of 16 configs (docs/decisions.md, 10). A blocked design
    corrected for its blocks; it cannot create structure: a step's position effect is untouched, only the
    common level of its time is removed. Too few repetitions (< 2 windows): returned as they are.
    """
    v = np.maximum(np.asarray(values, dtype=np.float64), 1e-12)
    k = np.asarray(keys)
    level = np.zeros(v.shape[0])
    if window < 3 or v.shape[0] < 2 * window:
        return v, level
    from numpy.lib.stride_tricks import sliding_window_view

    _, inverse = np.unique(k, return_inverse=True)
    half = window // 2
    adjusted = v
    for _ in range(2):
        med = np.array([float(np.median(adjusted[inverse == i])) for i in range(int(inverse.max()) + 1)])
        ratio = np.log(v / med[inverse])
        padded = np.concatenate([np.full(half, np.nan), ratio, np.full(half, np.nan)])
        level = np.nanmedian(sliding_window_view(padded, 2 * half + 1), axis=1)
        level = level - float(np.median(level))
        adjusted = v * np.exp(-level)
    return adjusted, level
