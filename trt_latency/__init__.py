"""trt-latency: per-KV-position latency calibration and sub-microsecond admission decisions.

The embedding surface::

    from trt_latency import Estimator
    est = Estimator.load("calibration.yaml")
    est.admit(120.0, vision_tokens=576, text_tokens=40, max_new_tokens=64, alpha=0.01)
    trt_latency.apply_backing(est)   # once, after the serving model is loaded: the calibration's page backing

Names are resolved lazily so `import trt_latency` costs numpy + yaml at most, and never
onnx, onnxruntime, tensorrt or cuda (tests/test_imports.py checks it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Estimator": "trt_latency.estimator.model",
    "Prediction": "trt_latency.estimator.model",
    "Decision": "trt_latency.estimator.model",
    "AdmissionController": "trt_latency.serving.admission",
    "ConfigKey": "trt_latency.schema",
    "Calibration": "trt_latency.estimator.calibration",
    "load_calibration": "trt_latency.estimator.calibration",
    "save_calibration": "trt_latency.estimator.calibration",
    "fit_samples": "trt_latency.estimator.fit",
    "TrtLatencyError": "trt_latency.errors",
    "InputError": "trt_latency.errors",
    "CalibrationError": "trt_latency.errors",
    "apply_backing": "trt_latency.backing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trt_latency' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
