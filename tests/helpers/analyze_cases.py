"""A calibration with a straight T(L) = A + B L, whose request logs have known numbers."""

from __future__ import annotations

from trt_latency.estimator.calibration import Calibration, ConfigCalibration

A, B = 2.0, 0.004  # ms, ms per KV token


KV_BYTES = 2 * 2 * 1 * 32 * 4  # 2 * blocks * kv_heads * head_dim * fp32


def straight_calibration(slope: float = B) -> Calibration:
    cfg = ConfigCalibration(
        tier_idx=0, top_k=1, num_active_blocks=2, decode_knots=[0.0, 1024.0],
        decode_values_ms=[A, A + slope * 1024.0], prefill_coeffs=[1.0, 0.01, 0.0],
        residual_quantiles={0.5: 1.0, 0.9: 1.05}, valid_past_len=[0.0, 1024.0], valid_prefill_len=[1.0, 256.0],
        fit_error={"loo_median_rel": 0.0, "loo_max_rel": 0.0, "n_positions": 2}, kv_bytes_per_token=KV_BYTES)
    return Calibration(1, {"backend": "ort-cpu", "device": "test"}, [cfg])

