"""Estimator side: samples, fit, calibration file, evaluation (kernel choice, pure-Python reference). Never imports onnx/onnxruntime/tensorrt/cuda."""
