"""Estimator side: samples, fit, calibration file, evaluation (kernel choice, pure-Python reference), log analysis. Never imports onnx/onnxruntime/tensorrt/cuda."""
