"""The table layout (layout.py) and the compiled math core and kernels (Cython; optional: trt_latency.estimator.kernels falls back to the reference)."""
