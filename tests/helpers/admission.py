"""A small, exactly known calibration and requests against it (the admission tests share them)."""

from __future__ import annotations

from trt_latency.estimator.calibration import Calibration, ConfigCalibration
from trt_latency.estimator.model import Estimator
from trt_latency.serving.admission import Request

KEY = (0, 1, 4)


def make_calibration(conformal: dict | None = None) -> Calibration:
    """A small, exactly known model: T(L) = 1 ms + 1 us * L, prefill = 2 ms + 0.01 ms * S."""
    cfg = ConfigCalibration(
        tier_idx=0, top_k=1, num_active_blocks=4,
        decode_knots=[0.0, 4096.0], decode_values_ms=[1.0, 1.0 + 4.096],
        prefill_coeffs=[2.0, 0.01, 0.0], residual_quantiles={0.5: 1.0, 0.9: 1.02, 0.99: 1.05},
        valid_past_len=[0.0, 4096.0], valid_prefill_len=[1.0, 1024.0],
        fit_error={"loo_median_rel": 0.0, "loo_max_rel": 0.0, "n_positions": 10},
        conformal=conformal, kv_bytes_per_token=2048,
    )  # fmt: skip
    return Calibration(schema_version=1, provenance={"backend": "test"}, configs=[cfg])


def req(v: int = 64, t: int = 40, n: int = 16, budget: float = 1e6) -> Request:
    return Request(v, t, n, 0, 1, 4, budget)


def true_total(est: Estimator, r: Request, slow: float = 1.0) -> tuple[float, float]:
    p = est.predict(r.vision_tokens, r.text_tokens, r.max_new_tokens, tier_idx=0, top_k=1, num_active_blocks=4)
    return p.prefill_ms * slow, (p.prefill_ms + p.decode_ms) * slow
