"""model.onnx -> onnxruntime.InferenceSession on the provider that really loads.

onnxruntime-gpu lists the CUDA and TensorRT execution providers even where their libraries (CUDA,
cuDNN, TensorRT) are missing; asking for them then prints errors and silently falls back to CPU.
So each GPU provider is probed once, quietly (stdout/stderr silenced at the file-descriptor level,
because ONNX Runtime's C++ logger writes there), on a one-node model; only providers that load are
ever requested, and the provider used is what ``session.get_providers()`` reports afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from trt_latency.errors import BackendUnavailable

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Silence fd 1 and 2 (C++ loggers, dlopen errors, ORT's 'EP Error' banner) for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        # ORT's Python layer prints its fallback banner with print(): silence sys.stdout/err objects too.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _tiny_model_bytes() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    # Relu (not Identity) so the provider must actually take a kernel.
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@functools.cache
def provider_loads(provider: str) -> bool:
    """True when ``provider`` (e.g. "CUDAExecutionProvider") really takes a session here. Cached."""
    import onnxruntime as ort

    if provider == "CPUExecutionProvider":
        return True
    if provider not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = 4
    with tempfile.TemporaryDirectory() as tmp, quiet_fds():
        path = os.path.join(tmp, "probe.onnx")
        with open(path, "wb") as fh:
            fh.write(_tiny_model_bytes())
        try:
            sess = ort.InferenceSession(path, so, providers=[provider, "CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any failure means "this provider does not load here"
            return False
        return provider in sess.get_providers()


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0, *, optimize: bool = True) -> Any:
    """SessionOptions with the plan's thread counts (0 = ONNX Runtime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return so


def trt_provider_options(cache_dir: str | None, profile: dict[str, tuple[str, str, str]] | None) -> dict[str, str]:
    """TensorRT EP options: engine cache and one explicit optimization profile (min/opt/max shape strings)."""
    opts: dict[str, str] = {}
    if cache_dir:
        opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=cache_dir, trt_timing_cache_enable="True")
    if profile:
        opts["trt_profile_min_shapes"] = ",".join(f"{k}:{v[0]}" for k, v in profile.items())
        opts["trt_profile_opt_shapes"] = ",".join(f"{k}:{v[1]}" for k, v in profile.items())
        opts["trt_profile_max_shapes"] = ",".join(f"{k}:{v[2]}" for k, v in profile.items())
    return opts


def create_session(path: str | os.PathLike[str], device: str = "cpu", *, intra_op_threads: int = 0,
                   inter_op_threads: int = 0, device_id: int = 0,
                   trt_options: dict[str, str] | None = None) -> tuple[Any, str]:
    """Session on ``device`` ("cpu", "cuda" or "trt"); returns (session, provider actually used).

    Raises BackendUnavailable when a GPU provider does not load here (never a silent CPU fallback:
    timings from the wrong provider would be worse than no timings).
    """
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise BackendUnavailable(f"unknown ONNX Runtime device {device!r}; expected one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device]
    if not provider_loads(wanted):
        raise BackendUnavailable(f"ONNX Runtime {wanted} does not load on this machine "
                                 f"(onnxruntime {ort.__version__}; its CUDA/cuDNN/TensorRT libraries or a GPU are missing)")
    so = session_options(intra_op_threads, inter_op_threads)
    providers: list[Any]
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        providers = [(wanted, {"device_id": str(device_id)}), "CPUExecutionProvider"]
    else:
        opts = {"device_id": str(device_id), **(trt_options or {})}
        providers = [(wanted, opts), ("CUDAExecutionProvider", {"device_id": str(device_id)}), "CPUExecutionProvider"]
    sess = ort.InferenceSession(os.fspath(path), so, providers=providers)
    used = sess.get_providers()[0]
    if used != wanted:
        raise BackendUnavailable(f"ONNX Runtime fell back to {used} instead of {wanted} for {os.fspath(path)}")
    return sess, used
