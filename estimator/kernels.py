"""The evaluation kernels: the Cython extension, or the pure-Python reference.

The choice is trt_latency._native's (the one switch for every compiled module; TRT_LATENCY_PUREPYTHON=1
forces the reference, a missing extension falls back with one warning). Both modules expose the same
names: Kernel, Decision, IMPLEMENTATION. The table layout, codes and reasons are trt_latency.ext.layout's
(re-exported here: reason_text, REASONS).
"""

from __future__ import annotations

from types import ModuleType

from trt_latency import _native
from trt_latency.estimator import _reference
from trt_latency.ext.layout import REASONS, reason_text

FORCE_ENV = _native.FORCE_ENV
impl: ModuleType = _native.kernels if _native.kernels is not None else _reference
Kernel = impl.Kernel
Decision = impl.Decision
IMPLEMENTATION: str = impl.IMPLEMENTATION
__all__ = ["FORCE_ENV", "IMPLEMENTATION", "REASONS", "Decision", "Kernel", "impl", "reason_text"]
