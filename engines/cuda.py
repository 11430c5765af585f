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

from collections.abc import Callable
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
    except ImportError as exc:  # cuda-python is the optional `tensorrt` extra
        raise BackendUnavailable(
            "CUDA is not usable: the 'cuda-bindings' package is not installed "
            "(pip install 'trt-latency[tensorrt]')"
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
    """Number of CUDA devices; 0 (quietly) when cuda-bindings, the driver or a GPU is missing."""
    try:
        rt = _runtime()
        result = rt.cudaGetDeviceCount()
    except (BackendUnavailable, RuntimeError, OSError):
        return 0
    if int(result[0]) != 0 or result[1] is None:
        return 0
    return int(result[1])


def require_device(index: int = 0) -> None:
    """Raise :class:`BackendUnavailable` unless device ``index`` exists; make it current."""
    rt = _runtime()
    result = rt.cudaGetDeviceCount()
    if int(result[0]) != 0:
        name, desc = _error_text(rt, result[0])
        hint = ""
        if name == "cudaErrorInsufficientDriver":
            # cuda-bindings 13.x needs a CUDA 13 driver; pick the major that matches the driver.
            hint = "; install the cuda-python/cuda-bindings major version that matches your NVIDIA driver"
        raise CudaUnavailable("cudaGetDeviceCount", int(result[0]), name, desc + hint)
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
    """A non-blocking, non-default CUDA stream (TensorRT syncs extra on the legacy default stream)."""

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



class CudaGraph(Closing):
    """Work enqueued by a callable on a stream, captured once and replayed with one launch.

    The callable must only enqueue (no synchronization, no allocation) and must have been run
    once before capture where the library requires it (TensorRT: one ``execute_async_v3`` after
    every shape change). Replays use the addresses and shapes seen at capture.
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
        except BaseException:
            # End the capture anyway, or the stream stays unusable; drop the partial graph.
            end = rt.cudaStreamEndCapture(stream.handle)
            if int(end[0]) == 0 and end[1] is not None:
                rt.cudaGraphDestroy(end[1])
            raise
        self._graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        try:
            self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        except CudaError:
            self.close()
            raise

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
