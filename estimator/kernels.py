"""Pick the evaluation kernels: the Cython extension, or the pure-Python reference.

`TRT_LATENCY_PUREPYTHON=1` forces the reference; if the extension is missing (not built, wrong
platform) the reference is used and a warning says so once per process. Both modules expose the
same names: Kernel, Decision, IMPLEMENTATION. The table layout, codes and reasons are
trt_latency.ext.layout's (re-exported here: reason_text, REASONS).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from trt_latency.estimator import _reference
from trt_latency.ext.layout import REASONS, reason_text

FORCE_ENV = "TRT_LATENCY_PUREPYTHON"
_warned = False


def _select() -> ModuleType:
    global _warned
    if os.environ.get(FORCE_ENV) == "1":
        return _reference
    try:
        from trt_latency.ext import _kernels
    except ImportError as exc:
        if not _warned:
            _warned = True
            warnings.warn(
                f"trt-latency: Cython kernels unavailable ({exc}); using the pure-Python reference "
                "(about 10-50x slower per admit). Rebuild with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _reference
    return _kernels


impl: ModuleType = _select()
Kernel = impl.Kernel
Decision = impl.Decision
IMPLEMENTATION: str = impl.IMPLEMENTATION
__all__ = ["FORCE_ENV", "IMPLEMENTATION", "REASONS", "Decision", "Kernel", "impl", "reason_text"]
