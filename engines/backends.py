"""model.onnx / engine file + backend name -> a Runner (ONNX Runtime CPU/CUDA/TensorRT EP, or TensorRT itself).

"auto" picks the fastest backend that really works here: TensorRT (library importable and a GPU
present), else ONNX Runtime's CUDA provider if it loads, else the CPU provider.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from trt_latency.engines.base import Runner
from trt_latency.errors import BackendUnavailable, InputError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
_ORT_DEVICES = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-trt": "trt"}


def _open_tensorrt(path: Path, max_past_len: int | None, max_new_tokens: int | None, device_id: int, seed: int,
                   trt_options: dict[str, Any] | None) -> Runner:
    # tensorrt-stubs installs an importable but empty `tensorrt` namespace: find_spec alone proves nothing.
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable("backend 'tensorrt' needs the TensorRT Python package "
                                 "(pip install 'trt-latency[tensorrt]' on a GPU host)")
    try:
        loader: Any = importlib.import_module("trt_latency.engines.trt.loader")
        loader.import_tensorrt()  # raises BackendUnavailable for stubs-only installs
        module: Any = importlib.import_module("trt_latency.engines.trt.runner")
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT backend cannot be imported: {exc}") from None
    trt_runner = getattr(module, "TrtRunner", None)
    if trt_runner is None:
        raise BackendUnavailable("trt_latency.engines.trt.runner has no TrtRunner")
    kwargs: dict[str, Any] = {"device_id": device_id, "seed": seed, **(trt_options or {})}
    if max_past_len is not None:
        kwargs["max_past_len"] = max_past_len
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    if path.suffix == ".onnx":
        return trt_runner.from_onnx(path, **kwargs)  # type: ignore[no-any-return]
    return trt_runner.from_engine(path, **kwargs)  # type: ignore[no-any-return]


def open_runner(path: str | os.PathLike[str], backend: str = "auto", *, threads: int = 0, inter_threads: int = 0,
                max_past_len: int | None = None, max_new_tokens: int | None = None, device_id: int = 0,
                seed: int = 0, trt_options: dict[str, Any] | None = None, kv_mode: str = "auto",
                io: dict[str, str] | str | None = None, dims: dict[str, int] | str | None = None) -> Runner:
    """Open ``path`` (model.onnx, or a serialized TensorRT engine for backend 'tensorrt') as a Runner.

    ``threads``/``inter_threads``: ONNX Runtime intra/inter-op threads (0 = its default).
    ``max_past_len``/``max_new_tokens``: buffer (profile) sizes; default from the model's metadata.
    ``trt_options``: extra keywords for TrtRunner.from_onnx / from_engine (use_cuda_graph, cache_dir, ...).
    ``kv_mode`` ("auto", "concat", "shared"), ``io`` (--io NAME=ROLE overrides) and ``dims`` (--dims)
    go to the model's DecoderSignature (engines/signature.py); the ONNX Runtime runners bind by it.
    Raises BackendUnavailable when the named backend does not work on this machine.
    """
    p = Path(path)
    if backend not in BACKENDS:
        raise InputError(field="backend", expected="one of " + ", ".join(BACKENDS), got=backend)
    if not p.is_file():
        raise InputError("file not found", path=str(p), expected="an ONNX model or TensorRT engine file")
    if backend == "auto":
        if p.suffix != ".onnx":
            return _open_tensorrt(p, max_past_len, max_new_tokens, device_id, seed, trt_options)
        for candidate in ("tensorrt", "ort-cuda"):
            try:
                return open_runner(p, candidate, threads=threads, inter_threads=inter_threads,
                                   max_past_len=max_past_len, max_new_tokens=max_new_tokens,
                                   device_id=device_id, seed=seed, trt_options=trt_options, kv_mode=kv_mode,
                                   io=io, dims=dims)
            except BackendUnavailable:
                continue
        backend = "ort-cpu"
    if backend == "tensorrt":
        return _open_tensorrt(p, max_past_len, max_new_tokens, device_id, seed, trt_options)
    if p.suffix != ".onnx":
        raise InputError("ONNX Runtime backends need an ONNX model", path=str(p), expected="a .onnx file")
    from trt_latency.engines.ort.runner import OrtRunner

    return OrtRunner(p, _ORT_DEVICES[backend], intra_op_threads=threads, inter_op_threads=inter_threads,
                     max_past_len=max_past_len, max_new_tokens=max_new_tokens, device_id=device_id, seed=seed,
                     kv_mode=kv_mode, io=io, dims=dims)
