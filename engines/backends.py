"""model.onnx / engine file + backend name -> a Runner (ONNX Runtime CPU/CUDA/TensorRT EP, or TensorRT itself).

"auto" picks the fastest backend that really works here: TensorRT (library importable, a GPU
present, the engine builds and loads), else ONNX Runtime's CUDA provider if it loads, else the CPU
provider. Any failure to open a candidate (unavailable, parse, build, out of memory) moves on to
the next one; it says why on stderr, except for a backend that is merely unavailable on a machine
without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
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
                   trt_options: dict[str, Any] | None, signature_options: Mapping[str, Any]) -> Runner:
    # tensorrt-stubs installs an importable but empty `tensorrt` namespace: find_spec alone proves nothing.
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable("backend 'tensorrt' needs the TensorRT Python package "
                                 "(pip install 'trt-latency[tensorrt-cu12]' or '[tensorrt-cu13]' on a GPU host)")
    try:
        loader: Any = importlib.import_module("trt_latency.engines.trt.loader")
        loader.import_tensorrt()  # raises BackendUnavailable for stubs-only installs
        module: Any = importlib.import_module("trt_latency.engines.trt.runner")
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT backend cannot be imported: {exc}") from None
    trt_runner = getattr(module, "TrtRunner", None)
    if trt_runner is None:
        raise BackendUnavailable("trt_latency.engines.trt.runner has no TrtRunner")
    # kv_mode / io / dims bind the engine by its DecoderSignature, as they bind the ONNX Runtime runners.
    kwargs: dict[str, Any] = {"device_id": device_id, "seed": seed, **signature_options, **(trt_options or {})}
    if max_past_len is not None:
        kwargs["max_past_len"] = max_past_len
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    constructor, accepted = tensorrt_constructor(trt_runner, path, kwargs)
    return constructor(path, **accepted)  # type: ignore[no-any-return]


def tensorrt_constructor(trt_runner: Any, path: Path, options: Mapping[str, Any]
                         ) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(TrtRunner.from_onnx or .from_engine for ``path``, the options it takes).

    An option neither takes is an InputError; a build option given with a prebuilt engine
    (opt_past_len, rebuild, workspace_bytes, ...) is dropped with a note on stderr, since nothing
    is built.
    """
    from_onnx, from_engine = trt_runner.from_onnx, trt_runner.from_engine
    takes = {name: set(inspect.signature(f).parameters) - {"path"} for name, f in
             (("onnx", from_onnx), ("engine", from_engine))}
    unknown = sorted(set(options) - takes["onnx"] - takes["engine"])
    if unknown:
        raise InputError("unknown TensorRT option", field="trt_options." + unknown[0],
                         expected="one of " + ", ".join(sorted(takes["onnx"] | takes["engine"])), got=unknown[0])
    kind = "onnx" if path.suffix == ".onnx" else "engine"
    ignored = sorted(set(options) - takes[kind])
    if ignored:
        print(f"trt-latency: {path} is a prebuilt engine: ignoring build option(s) {', '.join(ignored)}",
              file=sys.stderr)
    constructor = from_onnx if kind == "onnx" else from_engine
    return constructor, {k: v for k, v in options.items() if k in takes[kind]}


_SAID: set[str] = set()  # auto's notes already printed in this process (one per distinct reason)


@functools.cache
def _gpu_present() -> bool:
    """Whether nvidia-smi lists a GPU (the driver's view, independent of the Python CUDA packages)."""
    from trt_latency.engines import cuda

    return bool(cuda.nvidia_smi_gpus())


def open_first(path: Path, open_one: Callable[[str], Runner], candidates: tuple[str, ...] = AUTO_ORDER,
               gpu_present: Callable[[], bool] = _gpu_present) -> Runner:
    """The first of ``candidates`` that ``open_one`` opens; the last one's failure propagates.

    Any failure of an earlier candidate (TensorRT's parser or builder, CUDA out of memory, an ONNX
    Runtime provider error) is reported on stderr and the next one tried. A candidate that is merely
    unavailable (BackendUnavailable) is skipped quietly on a machine without a GPU, where the CPU is
    the expected outcome, and reported where ``gpu_present()`` (nvidia-smi lists a GPU), since a GPU
    backend switching itself off there (e.g. a driver/bindings mismatch) must not go unnoticed.
    Each distinct note is printed once per process.
    """
    for i, candidate in enumerate(candidates):
        if i == len(candidates) - 1:
            return open_one(candidate)
        try:
            return open_one(candidate)
        except BackendUnavailable as exc:
            if not gpu_present():
                continue
            why = f"unavailable: {exc}"
        except Exception as exc:  # noqa: BLE001 - parse/build/OOM/provider errors: fall back, say why
            why = f"failed on {path}: {type(exc).__name__}: {exc}"
        note = f"trt-latency: backend auto: {candidate} {why}; trying {candidates[i + 1]}"
        if note not in _SAID:
            _SAID.add(note)
            print(note, file=sys.stderr)
    raise AssertionError("unreachable: candidates is empty")


def open_tensorrt(path: Path, *, max_past_len: int | None = None, max_new_tokens: int | None = None,
                  device_id: int = 0, seed: int = 0, trt_options: dict[str, Any] | None = None, kv_mode: str = "auto",
                  io: dict[str, str] | str | None = None, dims: dict[str, int] | str | None = None,
                  threads: int = 0, inter_threads: int = 0, huge_pages: bool = True,
                  max_batch: int | None = None) -> Runner:
    """Registry factory for "tensorrt".

    ``kv_mode``, ``io`` and ``dims`` are honoured: the engine's profiles and bindings come from the model's
    DecoderSignature (engines/trt/loader.py); kv_mode shared is refused in one line (TensorRT binds past and
    present as separate buffers). ``threads``, ``inter_threads``, ``huge_pages`` and ``max_batch`` size ONNX
    Runtime's CPU sessions and buffers: a TensorRT engine runs on the GPU at batch 1, so they do not apply.
    """
    del threads, inter_threads, huge_pages, max_batch
    return _open_tensorrt(path, max_past_len, max_new_tokens, device_id, seed, trt_options,
                          {"kv_mode": kv_mode, "io": io, "dims": dims})


def open_runner(path: str | os.PathLike[str], backend: str = "auto", *, threads: int = 0, inter_threads: int = 0,
                max_past_len: int | None = None, max_new_tokens: int | None = None, device_id: int = 0,
                seed: int = 0, trt_options: dict[str, Any] | None = None, kv_mode: str = "auto",
                io: dict[str, str] | str | None = None, dims: dict[str, int] | str | None = None,
                max_batch: int | None = None, huge_pages: bool = False) -> Runner:
    """Open ``path`` (model.onnx, or a serialized TensorRT engine for backend 'tensorrt') as a Runner.

    ``backend``: a REGISTRY name, or "auto" (AUTO_ORDER: the first that really works here).
    ``threads``/``inter_threads``: ONNX Runtime intra/inter-op threads (0 = its default).
    ``max_past_len``/``max_new_tokens``: buffer (profile) sizes; default from the model's metadata.
    ``trt_options``: extra keywords for TrtRunner.from_onnx / from_engine (use_cuda_graph, cache_dir, ...);
    build options are dropped (with a note) for a prebuilt engine, unknown ones are an InputError.
    ``kv_mode`` ("auto", "concat", "shared"), ``io`` (--io NAME=ROLE overrides) and ``dims`` (--dims)
    go to the model's DecoderSignature (engines/signature.py); the ONNX Runtime runners bind by it.
    ``max_batch``: rows the ONNX Runtime runner's batch buffers hold (time_batch_step); default its own.
    ``huge_pages``: the CPU provider's memory on 2 MiB pages (engines/hugepages.py; the plan's runtime.huge_pages).
    Raises BackendUnavailable when the named backend does not work on this machine.
    """
    p = Path(path)
    if backend != "auto" and backend not in REGISTRY:
        raise InputError(field="backend", expected="one of " + ", ".join(BACKENDS), got=backend)
    if not p.is_file():
        raise InputError("file not found", path=str(p), expected="an ONNX model or TensorRT engine file")
    options: dict[str, Any] = dict(threads=threads, inter_threads=inter_threads, max_past_len=max_past_len,
                                   max_new_tokens=max_new_tokens, device_id=device_id, seed=seed,
                                   trt_options=trt_options, kv_mode=kv_mode, io=io, dims=dims,
                                   huge_pages=huge_pages)
    if max_batch is not None:
        options["max_batch"] = max_batch
    if backend == "auto":
        if p.suffix != ".onnx":
            return resolve_backend("tensorrt")(p, **options)
        if trt_options:  # a misspelt option is the user's error, not a reason to fall back
            runner_module: Any = importlib.import_module("trt_latency.engines.trt.runner")
            tensorrt_constructor(runner_module.TrtRunner, p, trt_options)
        return open_first(p, lambda candidate: resolve_backend(candidate)(p, **options))
    if backend.startswith("ort-") and p.suffix != ".onnx":
        raise InputError("ONNX Runtime backends need an ONNX model", path=str(p), expected="a .onnx file")
    return resolve_backend(backend)(p, **options)
