"""model.onnx / engine file + backend name -> a Runner (ONNX Runtime CPU/CUDA/TensorRT EP, or TensorRT itself).

"auto" picks the fastest backend that really works here: TensorRT (library importable and a GPU
present), else ONNX Runtime's CUDA provider if it loads, else the CPU provider.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trt_latency.engines.base import Runner
from trt_latency.errors import BackendUnavailable, InputError

# The one backend registry: name -> "module:factory", imported only when that backend is opened (so
# the CLI's choices cost no onnxruntime / tensorrt import). A factory takes (path, **options) where
# options are open_runner's keywords; "auto" is not a backend but a choice among them.
REGISTRY: dict[str, str] = {
    "ort-cpu": "trt_latency.engines.ort.runner:open_cpu",
    "ort-cuda": "trt_latency.engines.ort.runner:open_cuda",
    "ort-trt": "trt_latency.engines.ort.runner:open_trt",
    "tensorrt": "trt_latency.engines.backends:open_tensorrt",
}
BACKENDS: tuple[str, ...] = ("auto", *REGISTRY)
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort-cpu")  # fastest first; each is tried until one really works


def register_backend(name: str, factory: str) -> None:
    """Add (or replace) a backend: ``factory`` is "module:function" taking (path, **open_runner options)."""
    global BACKENDS
    REGISTRY[name] = factory
    BACKENDS = ("auto", *REGISTRY)


def resolve_backend(name: str) -> Callable[..., Runner]:
    """The factory registered under ``name`` (imported now)."""
    if name not in REGISTRY:
        raise InputError(field="backend", expected="one of " + ", ".join(BACKENDS), got=name)
    module, _, attr = REGISTRY[name].partition(":")
    factory: Callable[..., Runner] = getattr(importlib.import_module(module), attr)
    return factory


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


def open_tensorrt(path: Path, *, max_past_len: int | None = None, max_new_tokens: int | None = None,
                  device_id: int = 0, seed: int = 0, trt_options: dict[str, Any] | None = None,
                  **_ignored: Any) -> Runner:
    """Registry factory for "tensorrt" (ONNX Runtime's thread / signature options do not apply)."""
    return _open_tensorrt(path, max_past_len, max_new_tokens, device_id, seed, trt_options)


def open_runner(path: str | os.PathLike[str], backend: str = "auto", *, threads: int = 0, inter_threads: int = 0,
                max_past_len: int | None = None, max_new_tokens: int | None = None, device_id: int = 0,
                seed: int = 0, trt_options: dict[str, Any] | None = None, kv_mode: str = "auto",
                io: dict[str, str] | str | None = None, dims: dict[str, int] | str | None = None) -> Runner:
    """Open ``path`` (model.onnx, or a serialized TensorRT engine for backend 'tensorrt') as a Runner.

    ``backend``: a REGISTRY name, or "auto" (AUTO_ORDER: the first that really works here).
    ``threads``/``inter_threads``: ONNX Runtime intra/inter-op threads (0 = its default).
    ``max_past_len``/``max_new_tokens``: buffer (profile) sizes; default from the model's metadata.
    ``trt_options``: extra keywords for TrtRunner.from_onnx / from_engine (use_cuda_graph, cache_dir, ...).
    ``kv_mode`` ("auto", "concat", "shared"), ``io`` (--io NAME=ROLE overrides) and ``dims`` (--dims)
    go to the model's DecoderSignature (engines/signature.py); the ONNX Runtime runners bind by it.
    Raises BackendUnavailable when the named backend does not work on this machine.
    """
    p = Path(path)
    if backend != "auto" and backend not in REGISTRY:
        raise InputError(field="backend", expected="one of " + ", ".join(BACKENDS), got=backend)
    if not p.is_file():
        raise InputError("file not found", path=str(p), expected="an ONNX model or TensorRT engine file")
    options: dict[str, Any] = dict(threads=threads, inter_threads=inter_threads, max_past_len=max_past_len,
                                   max_new_tokens=max_new_tokens, device_id=device_id, seed=seed,
                                   trt_options=trt_options, kv_mode=kv_mode, io=io, dims=dims)
    if backend == "auto":
        if p.suffix != ".onnx":
            return resolve_backend("tensorrt")(p, **options)
        for candidate in AUTO_ORDER[:-1]:
            try:
                return resolve_backend(candidate)(p, **options)
            except BackendUnavailable:
                continue
        backend = AUTO_ORDER[-1]
    if backend.startswith("ort-") and p.suffix != ".onnx":
        raise InputError("ONNX Runtime backends need an ONNX model", path=str(p), expected="a .onnx file")
    return resolve_backend(backend)(p, **options)
