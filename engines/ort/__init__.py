"""ONNX Runtime backend: loader (session) and runner (per-position timing)."""
