"""TensorRT backend: loader (build/deserialize engine) and runner (per-position timing)."""
