"""Compiled kernels (Cython). Optional: trt_latency.estimator.kernels falls back to the reference."""
