"""Statistics every layer shares (no layer imports: engines/ and estimator/ both use them).

``drift_adjusted``: the sweep's repetitions with the machine's drift divided out. The sweep (engines/) uses
it for the precision it reports and the fit (estimator/) for the medians it fits, so both speak of the same
medians.
"""

from __future__ import annotations

import numpy as np


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
