"""Estimator side: fit, calibration file, evaluation, admission. Never imports onnx/onnxruntime/tensorrt/cuda."""
