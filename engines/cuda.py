"""Shared CUDA layer over ``cuda.bindings`` (runtime API): buffers, streams, event timing, graphs.

Used by the TensorRT backend and available to any other GPU backend. ``cuda.bindings`` is imported
inside functions so that importing this module costs nothing on a machine without CUDA.

Return convention of ``cuda.bindings``: every call returns a tuple whose first element is a
``cudaError_t`` and whose remaining elements are the outputs, e.g. ``cudaMalloc(n) -> (err, ptr)``,
``cudaMemcpy(...) -> (err,)``, ``cudaEventElapsedTime(a, b) -> (err, ms)``. :func:`check` turns a
non-success code into :class:`CudaError` (or :class:`CudaUnavailable` when there is no usable
driver or device) and returns the outputs.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from trt_latency.engines.base import Closing
from trt_latency.errors import BackendUnavailable, TrtLatencyError

# cudaError_t names that mean "no usable GPU here" rather than "your call was wrong".
_UNAVAILABLE_ERRORS = frozenset(
    {
        "cudaErrorInsufficientDriver",
        "cudaErrorNoDevice",
        "cudaErrorInitializationError",
        "cudaErrorStubLibrary",
        "cudaErrorSystemDriverMismatch",
        "cudaErrorCompatNotSupportedOnDevice",
        "cudaErrorDevicesUnavailable",
        "cudaErrorCallRequiresNewerDriver",
    }
)


class CudaError(TrtLatencyError):
    """A CUDA runtime call failed; carries the call name and the ``cudaError_t`` name."""

    def __init__(self, call: str, code: int, name: str, description: str) -> None:
        self.call = call
        self.code = code
        self.name = name
        super().__init__(f"CUDA call {call} failed: {name} ({code}): {description}")


class CudaUnavailable(CudaError, BackendUnavailable):
    """No usable CUDA driver or device (a :class:`BackendUnavailable`, so callers can fall back)."""


def _runtime() -> ModuleType:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:  # cuda-bindings comes with the `test`, `tensorrt-cu12/13`, `cu12` and `cu13` extras
        raise BackendUnavailable(
            "CUDA is not usable: the 'cuda-bindings' package is not installed (pip install "
            "'trt-latency[cu12]' or 'trt-latency[cu13]', matching the NVIDIA driver's CUDA major)"
        ) from exc
    return runtime


def _error_text(rt: ModuleType, err: Any) -> tuple[str, str]:
    name_res = rt.cudaGetErrorName(err)
    desc_res = rt.cudaGetErrorString(err)
    name = name_res[1].decode() if name_res[1] is not None else str(err)
    desc = desc_res[1].decode() if desc_res[1] is not None else ""
    return name, desc


def check(result: tuple[Any, ...], call: str) -> Any:
    """Raise on a failed ``cuda.bindings`` call; return its outputs.

    ``result`` is the tuple the call returned. Returns None for ``(err,)``, the single output for
    ``(err, x)`` and the tuple of outputs otherwise.
    """
    err = result[0]
    if int(err) != 0:
        rt = _runtime()
        name, desc = _error_text(rt, err)
        cls = CudaUnavailable if name in _UNAVAILABLE_ERRORS else CudaError
        raise cls(call, int(err), name, desc)
    outputs = result[1:]
    if not outputs:
        return None
    if len(outputs) == 1:
        return outputs[0]
    return outputs


def device_count() -> int:
    """Number of CUDA devices; 0 when cuda-bindings, the driver or a GPU is missing.

    0 also when the driver is too old for the installed cuda-bindings major (13.x on a CUDA 12
    driver): :func:`cuda_status` says which, and tests/test_trt_driver.py fails on that case when
    nvidia-smi sees a GPU.
    """
    try:
        rt = _runtime()
        result = rt.cudaGetDeviceCount()
    except (BackendUnavailable, RuntimeError, OSError):
        return 0
    if int(result[0]) != 0 or result[1] is None:
        return 0
    return int(result[1])


def bindings_version() -> str:
    """Version of the installed cuda-bindings package ('' when it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("cuda-bindings")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _version_int(call: str) -> int:
    """cudaDriverGetVersion / cudaRuntimeGetVersion as 1000 * major + 10 * minor (0 = no driver)."""
    try:
        rt = _runtime()
        result = getattr(rt, call)()
    except (BackendUnavailable, RuntimeError, OSError):
        return 0
    if int(result[0]) != 0 or result[1] is None:
        return 0
    return int(result[1])


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def explain_no_device(error: str, *, bindings: str, runtime_version: int, driver_version: int) -> str:
    """Why cudaGetDeviceCount failed, and what to install: one sentence for error messages.

    ``runtime_version`` / ``driver_version`` are cudaRuntimeGetVersion / cudaDriverGetVersion
    (1000 * major + 10 * minor; a driver version of 0 means no NVIDIA driver could be loaded).
    """
    if driver_version <= 0:
        return f"{error}: no NVIDIA driver could be loaded (no GPU on this machine?)"
    need, have = runtime_version // 1000, driver_version // 1000
    if runtime_version > 0 and have < need:
        return (
            f"{error}: driver/bindings mismatch: cuda-bindings {bindings or '?'} is built for CUDA "
            f"{_cuda_text(runtime_version)} and needs a CUDA {need} driver, but the NVIDIA driver supports "
            f"CUDA {_cuda_text(driver_version)}; install the bindings that match it: "
            f"pip install 'trt-latency[cu{have}]' (cuda-bindings {have}.x), or upgrade the driver"
        )
    return (f"{error}: the NVIDIA driver (CUDA {_cuda_text(driver_version)}) and cuda-bindings "
            f"{bindings or '?'} (CUDA {_cuda_text(runtime_version)}) see no usable device")


@dataclass(frozen=True)
class CudaStatus:
    """What the bindings see, next to what the driver reports: for the GPU tests and error messages."""

    bindings: str
    runtime_version: int
    driver_version: int
    device_count: int
    error: str | None  # cudaGetDeviceCount's error name, None when it succeeded

    def explain(self) -> str:
        if not self.bindings:
            return str(self.error)  # _runtime()'s message: not installed, and what to install
        if self.error is None:
            return (f"cuda-bindings {self.bindings} (CUDA {_cuda_text(self.runtime_version)}) sees "
                    f"{self.device_count} device(s); driver supports CUDA {_cuda_text(self.driver_version)}")
        return explain_no_device(self.error, bindings=self.bindings, runtime_version=self.runtime_version,
                                 driver_version=self.driver_version)


def cuda_status() -> CudaStatus:
    """The bindings' device count and versions; never raises (error names why there is no device)."""
    bindings = bindings_version()
    try:
        rt = _runtime()
        result = rt.cudaGetDeviceCount()
    except (BackendUnavailable, RuntimeError, OSError) as exc:  # not installed, or its libraries do not load
        return CudaStatus(bindings, 0, 0, 0, str(exc))
    error = None if int(result[0]) == 0 else _error_text(rt, result[0])[0]
    count = int(result[1]) if error is None and result[1] is not None else 0
    return CudaStatus(bindings, _version_int("cudaRuntimeGetVersion"), _version_int("cudaDriverGetVersion"),
                      count, error)


def nvidia_smi_gpus(timeout_s: float = 20.0) -> list[str] | None:
    """GPU names nvidia-smi lists (the driver's view, independent of cuda-bindings); None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return []  # nvidia-smi present but no driver / no GPU ("NVIDIA-SMI has failed ...")
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def require_device(index: int = 0) -> None:
    """Raise :class:`BackendUnavailable` unless device ``index`` exists; make it current.

    When the bindings see no device the message says why, naming a driver/bindings mismatch
    (cuda-bindings 13.x on a CUDA 12 driver) and the extra that fixes it.
    """
    rt = _runtime()
    result = rt.cudaGetDeviceCount()
    if int(result[0]) != 0:
        name, desc = _error_text(rt, result[0])
        why = explain_no_device(name, bindings=bindings_version(),
                                runtime_version=_version_int("cudaRuntimeGetVersion"),
                                driver_version=_version_int("cudaDriverGetVersion"))
        raise CudaUnavailable("cudaGetDeviceCount", int(result[0]), name, f"{desc}; {why}")
    count = int(result[1])
    if not 0 <= index < count:
        raise BackendUnavailable(f"no CUDA device {index}: {count} device(s) visible")
    check(rt.cudaSetDevice(index), "cudaSetDevice")


def device_name(index: int = 0) -> str:
    """Marketing name of device ``index`` (e.g. 'NVIDIA H100 80GB HBM3')."""
    rt = _runtime()
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    raw = props.name
    text = raw.decode(errors="replace") if isinstance(raw, bytes | bytearray) else str(raw)
    return text.split("\x00", 1)[0].strip()


def synchronize() -> None:
    """Wait for all work on the current device."""
    rt = _runtime()
    check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


class Stream(Closing):
    """A non-blocking, non-default CUDA stream (TensorRT syncs extra on the legacy default stream).

    Non-blocking means it does not order itself against the legacy default stream: every copy and
    memset meant to precede work on it must be enqueued on it (``stream=``), never stream-less.
    """

    def __init__(self) -> None:
        rt = _runtime()
        self._rt = rt
        self.handle: Any = check(
            rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )

    @property
    def ptr(self) -> int:
        """The raw ``cudaStream_t`` as an int (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(self._rt.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class DeviceBuffer(Closing):
    """``nbytes`` of device memory from ``cudaMalloc``, with host copies and memset."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"DeviceBuffer size must be >= 0, got {nbytes}")
        rt = _runtime()
        self._rt = rt
        self.nbytes = int(nbytes)
        # cudaMalloc(0) may hand back NULL; keep one byte so every buffer has a real address.
        self._handle: Any = check(rt.cudaMalloc(max(self.nbytes, 1)), "cudaMalloc")

    @property
    def ptr(self) -> int:
        """Device address as an int (what ``set_tensor_address`` takes)."""
        if self._handle is None:
            raise ValueError("DeviceBuffer used after close()")
        return int(self._handle)

    def _check_host(self, array: np.ndarray, offset: int) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous")
        if offset < 0 or offset + array.nbytes > self.nbytes:
            raise ValueError(
                f"copy of {array.nbytes} bytes at offset {offset} overruns a {self.nbytes}-byte buffer"
            )

    def copy_from_host(self, array: np.ndarray, *, offset: int = 0, stream: Stream | None = None) -> None:
        """Copy a C-contiguous host array into the buffer at byte ``offset``.

        With a stream the copy is enqueued on it (keep ``array`` alive until the stream syncs);
        without, it is synchronous.
        """
        self._check_host(array, offset)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        dst = self.ptr + offset
        if stream is None:
            check(self._rt.cudaMemcpy(dst, array.ctypes.data, array.nbytes, kind), "cudaMemcpy(H2D)")
        else:
            check(
                self._rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, kind, stream.handle),
                "cudaMemcpyAsync(H2D)",
            )

    def copy_to_host(self, out: np.ndarray, *, offset: int = 0, stream: Stream | None = None) -> np.ndarray:
        """Fill the C-contiguous host array ``out`` from the buffer at byte ``offset``; return it.

        With a stream, the copy is enqueued and the stream synchronized before returning.
        """
        self._check_host(out, offset)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        src = self.ptr + offset
        if stream is None:
            check(self._rt.cudaMemcpy(out.ctypes.data, src, out.nbytes, kind), "cudaMemcpy(D2H)")
        else:
            check(
                self._rt.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, kind, stream.handle),
                "cudaMemcpyAsync(D2H)",
            )
            stream.synchronize()
        return out

    def copy_from_device(self, src: DeviceBuffer, nbytes: int | None = None, *, stream: Stream | None = None) -> None:
        """Device-to-device copy of ``nbytes`` (default: all of ``src``) into this buffer."""
        count = src.nbytes if nbytes is None else int(nbytes)
        if count > self.nbytes or count > src.nbytes:
            raise ValueError(f"device copy of {count} bytes exceeds a buffer ({src.nbytes} -> {self.nbytes})")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        if stream is None:
            check(self._rt.cudaMemcpy(self.ptr, src.ptr, count, kind), "cudaMemcpy(D2D)")
        else:
            check(
                self._rt.cudaMemcpyAsync(self.ptr, src.ptr, count, kind, stream.handle),
                "cudaMemcpyAsync(D2D)",
            )

    def memset(self, value: int = 0, *, stream: Stream | None = None) -> None:
        """Set every byte to ``value`` (0-255)."""
        if stream is None:
            check(self._rt.cudaMemset(self.ptr, int(value), self.nbytes), "cudaMemset")
        else:
            check(
                self._rt.cudaMemsetAsync(self.ptr, int(value), self.nbytes, stream.handle),
                "cudaMemsetAsync",
            )

    def close(self) -> None:
        if self._handle is not None:
            check(self._rt.cudaFree(self._handle), "cudaFree")
            self._handle = None


class PinnedHostBuffer(Closing):
    """``nbytes`` of page-locked host memory (``cudaMallocHost``) viewed as numpy arrays.

    Copies between pinned memory and the device run truly asynchronously on a stream; from
    pageable memory ``cudaMemcpyAsync`` stages through a driver buffer and may block the host.
    Serving loops (and the TensorRT runner's ``generate``) keep their per-step inputs and logits here.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"PinnedHostBuffer size must be >= 0, got {nbytes}")
        rt = _runtime()
        self._rt = rt
        self.nbytes = int(nbytes)
        self._ptr: Any = check(rt.cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost")

    def array(self, dtype: np.dtype[Any] | type[np.generic], shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of the first ``prod(shape)`` elements (valid until close())."""
        if self._ptr is None:
            raise ValueError("PinnedHostBuffer used after close()")
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dt.itemsize > self.nbytes:
            raise ValueError(f"a {shape} {dt} view needs {count * dt.itemsize} bytes; buffer has {self.nbytes}")
        raw = (ctypes.c_uint8 * max(count * dt.itemsize, 1)).from_address(int(self._ptr))
        return np.frombuffer(memoryview(raw), dtype=dt, count=count).reshape(shape)

    def close(self) -> None:
        if self._ptr is not None:
            check(self._rt.cudaFreeHost(self._ptr), "cudaFreeHost")
            self._ptr = None


class EventTimer(Closing):
    """A start/end CUDA event pair: GPU time between two points of one stream, in ms."""

    def __init__(self) -> None:
        rt = _runtime()
        self._rt = rt
        self._start: Any = check(rt.cudaEventCreate(), "cudaEventCreate")
        self._end: Any = check(rt.cudaEventCreate(), "cudaEventCreate")

    def start(self, stream: Stream) -> None:
        check(self._rt.cudaEventRecord(self._start, stream.handle), "cudaEventRecord")

    def stop(self, stream: Stream) -> None:
        check(self._rt.cudaEventRecord(self._end, stream.handle), "cudaEventRecord")

    def elapsed_ms(self) -> float:
        """Wait for the end event; milliseconds between start and end (resolution ~0.5 us)."""
        check(self._rt.cudaEventSynchronize(self._end), "cudaEventSynchronize")
        return float(check(self._rt.cudaEventElapsedTime(self._start, self._end), "cudaEventElapsedTime"))

    def time_ms(self, stream: Stream, work: Callable[[], object]) -> float:
        """Enqueue ``work()`` between the two events on ``stream``; its GPU time in ms."""
        self.start(stream)
        work()
        self.stop(stream)
        return self.elapsed_ms()

    def close(self) -> None:
        for attr in ("_start", "_end"):
            event = getattr(self, attr)
            if event is not None:
                check(self._rt.cudaEventDestroy(event), "cudaEventDestroy")
                setattr(self, attr, None)


class CaptureFailed(TrtLatencyError):
    """``work`` could not be captured into a CUDA graph; the stream is usable again (run it uncaptured)."""


class CudaGraph(Closing):
    """Work enqueued by a callable on a stream, captured once and replayed with one launch.

    The callable must only enqueue (no synchronization, no allocation) and must have been run
    once before capture where the library requires it (TensorRT: one ``execute_async_v3`` after
    every shape change). Replays use the addresses and shapes seen at capture.

    A capture that fails (``work`` raises, e.g. TensorRT's enqueue returning False, or the
    capture is invalidated, or instantiation fails) raises :class:`CaptureFailed` after ending the
    capture and clearing the error, as trtexec does, so the caller can fall back to plain enqueue.
    After instantiation the graph is uploaded (``cudaGraphUpload``) and the stream synchronized,
    so the first timed launch does not pay for the upload.
    """

    def __init__(self, stream: Stream, work: Callable[[], object]) -> None:
        rt = _runtime()
        self._rt = rt
        self._graph: Any = None
        self._exec: Any = None
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        try:
            work()
        except Exception as exc:
            self._end_capture_on_error(stream)
            raise CaptureFailed(f"CUDA graph capture failed while enqueuing: {exc}") from exc
        except BaseException:
            self._end_capture_on_error(stream)
            raise
        end = rt.cudaStreamEndCapture(stream.handle)
        if int(end[0]) != 0 or end[1] is None:
            name = _error_text(rt, end[0])[0] if int(end[0]) != 0 else "no graph"
            rt.cudaGetLastError()  # capture errors must not leak into the next call
            raise CaptureFailed(f"CUDA graph capture was invalidated ({name}): the work is not capturable")
        self._graph = end[1]
        try:
            self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
            # Upload now, not inside the first (timed) launch.
            check(rt.cudaGraphUpload(self._exec, stream.handle), "cudaGraphUpload")
            stream.synchronize()
        except CudaError as exc:
            self.close()
            rt.cudaGetLastError()
            raise CaptureFailed(f"CUDA graph could not be instantiated or uploaded: {exc}") from exc

    def _end_capture_on_error(self, stream: Stream) -> None:
        # End the capture anyway, or the stream stays unusable; drop the partial graph (trtexec's
        # endCaptureOnError), then clear the error it leaves (cudaErrorStreamCaptureInvalidated).
        end = self._rt.cudaStreamEndCapture(stream.handle)
        if int(end[0]) == 0 and end[1] is not None:
            self._rt.cudaGraphDestroy(end[1])
        self._rt.cudaGetLastError()

    def launch(self, stream: Stream) -> None:
        if self._exec is None:
            raise ValueError("CudaGraph used after close()")
        check(self._rt.cudaGraphLaunch(self._exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        if self._exec is not None:
            check(self._rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            check(self._rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None


def time_device_copy_ms(nbytes: int, reps: int = 10, warmup: int = 2) -> np.ndarray:
    """Event-timed device-to-device copies of ``nbytes``: one float64 ms value per repetition."""
    if nbytes <= 0 or reps <= 0:
        raise ValueError(f"nbytes and reps must be positive, got {nbytes}, {reps}")
    require_device()
    times = np.empty(reps, dtype=np.float64)
    with (
        DeviceBuffer(nbytes) as src,
        DeviceBuffer(nbytes) as dst,
        Stream() as stream,
        EventTimer() as timer,
    ):
        src.memset(1, stream=stream)
        for _ in range(warmup):
            dst.copy_from_device(src, stream=stream)
        stream.synchronize()
        for i in range(reps):
            times[i] = timer.time_ms(stream, lambda: dst.copy_from_device(src, stream=stream))
    return times


def memcpy_bandwidth_gbps(nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Device memory bandwidth in GB/s (1e9 B/s) from the median event-timed D2D copy.

    A copy reads and writes ``nbytes`` each, so it moves ``2 * nbytes`` (as CUDA's bandwidthTest
    counts): the figure comparable to the HBM peak for a roofline.
    """
    median_ms = float(np.median(time_device_copy_ms(nbytes, reps=reps)))
    return 2.0 * nbytes / (median_ms * 1e-3) / 1e9
