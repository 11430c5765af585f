"""The one switch between compiled code and the pure-Python reference (msgpack-python's pattern).

Every compiled module is chosen here, together: the kernels (``trt_latency.ext._kernels``: ``Kernel``),
the serving gate (``trt_latency.serving._gate``: ``Gate``) and the batch kernel
(``trt_latency.serving._batch``: ``BatchKernel``). ``TRT_LATENCY_PUREPYTHON=1`` forces the reference for
all of them; otherwise a missing or broken extension (not built, wrong platform, a partial build) makes
ALL of them fall back, with one warning per process, so a process never mixes a compiled kernel with a
Python gate. ``IMPLEMENTATION`` is the decision: "cython" or "reference".

Callers keep their own fallback (estimator/kernels.py takes estimator._reference, serving/admission.py its
Python decide path, serving/batch_admission.py serving.batch_reference): this module decides, they bind.
It sits below the layers (tests/test_boundaries.py: it may import the compiled extension modules and
nothing else of the package), so estimator/ and serving/ both read the same decision.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

FORCE_ENV = "TRT_LATENCY_PUREPYTHON"  # the one place this variable is read
CYTHON = "cython"
REFERENCE = "reference"


def _select() -> tuple[str, ModuleType | None, ModuleType | None, ModuleType | None]:
    if os.environ.get(FORCE_ENV) == "1":
        return REFERENCE, None, None, None
    try:
        from trt_latency.ext import _kernels
        from trt_latency.serving import _batch, _gate
    except ImportError as exc:
        warnings.warn(
            f"trt-latency: Cython kernels unavailable ({exc}); using the pure-Python reference "
            "(about 10-50x slower per admit). Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return REFERENCE, None, None, None
    return CYTHON, _kernels, _gate, _batch


IMPLEMENTATION, kernels, gate, batch = _select()
"""The compiled modules when IMPLEMENTATION is "cython", else None (the caller binds its reference)."""

__all__ = ["CYTHON", "FORCE_ENV", "IMPLEMENTATION", "REFERENCE", "batch", "gate", "kernels"]
