"""A hand-made calibration and the bad request fields the Estimator must refuse."""

from __future__ import annotations

import math

from trt_latency.estimator.calibration import (
    Calibration,
    ConfigCalibration,
    FactorisedModel,
)


def make_cal() -> Calibration:
    measured = ConfigCalibration(
        0, 1, 4, [1.0, 1024.0, 4096.0], [1.0, 1.2, 3.0], [2.0, 0.01, 1e-6], {0.5: 1.0, 0.9: 1.1, 0.99: 1.25},
        [1.0, 4096.0], [8.0, 2048.0], {"loo_median_rel": 0.003, "loo_max_rel": 0.01, "n_positions": 19},
        {"alphas": [0.01, 0.1], "factors": [1.5, 1.2], "n": 100},
    )
    small = ConfigCalibration(0, 1, 2, [1.0, 4096.0], [0.6, 1.5], [1.0, 0.005, 5e-7], {0.5: 1.0, 0.99: 1.3},
                              [1.0, 4096.0], [8.0, 2048.0])
    fact = FactorisedModel(0, 0.2, 0.2, 0.0, 1e-4, [1.0, 4096.0], 2, 0.02, 0.05)
    return Calibration(1, {"backend": "test"}, [measured, small], [fact])


JUNK = ["12", b"1", 1 + 2j, True, [1], object()]


INT_BAD = [*JUNK, math.nan, 1.5, 2.0, -1, 2**31, 2**64, 10**30]  # integers only, in [lo, 2**31 - 1]


BAD = {
    "budget_ms": [*JUNK, None, math.nan, math.inf, -math.inf, -1, -0.5, 10**400],
    "vision_tokens": [*INT_BAD, None],
    "text_tokens": [*INT_BAD, None],
    "max_new_tokens": [*INT_BAD, 0],
    "tier_idx": [*INT_BAD, None],
    "top_k": [*INT_BAD, None],
    "num_active_blocks": INT_BAD,
    "alpha": [*JUNK, math.nan, math.inf, 0.0, 1.0, -0.1, 2],
}

