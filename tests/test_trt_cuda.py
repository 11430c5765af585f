"""The shared CUDA layer (engines/cuda.py): error handling everywhere, real GPU work where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest

from trt_latency.engines import cuda
from trt_latency.errors import BackendUnavailable

rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")

HAS_GPU = cuda.device_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device on this machine")
without_gpu = pytest.mark.skipif(HAS_GPU, reason="a CUDA device is present")


@without_gpu
def test_require_device_says_why_there_is_no_device() -> None:
    status = cuda.cuda_status()
    assert status.device_count == 0 and status.error is not None
    with pytest.raises(cuda.CudaUnavailable) as info:
        cuda.require_device()
    assert status.explain() in str(info.value)  # the same diagnosis the GPU check prints


def test_check_returns_outputs_by_arity() -> None:
    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok,), "cudaX") is None
    assert cuda.check((ok, 7), "cudaX") == 7
    assert cuda.check((ok, 1, 2), "cudaX") == (1, 2)


def test_check_names_call_and_error() -> None:
    with pytest.raises(cuda.CudaError) as info:
        cuda.check((rt.cudaError_t.cudaErrorInvalidValue, None), "cudaMemcpyAsync")
    err = info.value
    assert not isinstance(err, BackendUnavailable)  # a wrong call is not "no GPU"
    assert err.call == "cudaMemcpyAsync" and err.name == "cudaErrorInvalidValue"
    assert err.code == int(rt.cudaError_t.cudaErrorInvalidValue)
    assert "cudaMemcpyAsync" in str(err) and "cudaErrorInvalidValue" in str(err)


@pytest.mark.parametrize("name", ["cudaErrorNoDevice", "cudaErrorInsufficientDriver"])
def test_check_maps_missing_gpu_to_backend_unavailable(name: str) -> None:
    with pytest.raises(BackendUnavailable, match=name):
        cuda.check((getattr(rt.cudaError_t, name),), "cudaMalloc")


@without_gpu
def test_device_count_is_zero_quietly() -> None:
    raw = rt.cudaGetDeviceCount()
    assert int(raw[0]) != 0  # the raw call fails here (no driver / no device) ...
    assert cuda.device_count() == 0  # ... and the layer reports 0 without raising


@without_gpu
@pytest.mark.parametrize(
    "make", [lambda: cuda.DeviceBuffer(1024), cuda.Stream, cuda.EventTimer, cuda.require_device,
             lambda: cuda.memcpy_bandwidth_gbps(1 << 20)],
    ids=["DeviceBuffer", "Stream", "EventTimer", "require_device", "memcpy_bandwidth_gbps"],
)
def test_gpu_objects_raise_backend_unavailable(make: object) -> None:
    with pytest.raises(BackendUnavailable) as info:
        make()  # type: ignore[operator]
    assert "CUDA" in str(info.value) or "cuda" in str(info.value)


@without_gpu
def test_device_buffer_error_is_clear() -> None:
    with pytest.raises(cuda.CudaUnavailable) as info:
        cuda.DeviceBuffer(4096)
    assert info.value.call == "cudaMalloc"
    assert info.value.name in {"cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorInitializationError"}


def test_negative_buffer_size_rejected_before_cuda() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        cuda.DeviceBuffer(-1)


@needs_gpu
def test_device_buffer_round_trip_and_memset() -> None:
    data = np.arange(1000, dtype=np.float32)
    with cuda.DeviceBuffer(data.nbytes) as buf, cuda.Stream() as stream:
        assert buf.ptr != 0 and buf.nbytes == data.nbytes
        buf.copy_from_host(data)
        np.testing.assert_array_equal(buf.copy_to_host(np.empty_like(data)), data)
        half = np.empty(500, dtype=np.float32)
        buf.copy_to_host(half, offset=500 * 4, stream=stream)
        np.testing.assert_array_equal(half, data[500:])
        buf.memset(0, stream=stream)
        stream.synchronize()
        assert not buf.copy_to_host(np.empty_like(data)).any()
        with pytest.raises(ValueError, match="overruns"):
            buf.copy_from_host(np.zeros(1001, dtype=np.float32))
    assert cuda.device_name()  # non-empty


@needs_gpu
def test_event_timer_and_graph_replay() -> None:
    nbytes = 64 << 20
    src_host = np.full(nbytes, 7, dtype=np.uint8)
    with (
        cuda.DeviceBuffer(nbytes) as src,
        cuda.DeviceBuffer(nbytes) as dst,
        cuda.Stream() as stream,
        cuda.EventTimer() as timer,
    ):
        src.copy_from_host(src_host)
        ms = timer.time_ms(stream, lambda: dst.copy_from_device(src, stream=stream))
        assert ms > 0
        dst.memset(0, stream=stream)
        with cuda.CudaGraph(stream, lambda: dst.copy_from_device(src, stream=stream)) as graph:
            stream.synchronize()
            graph.launch(stream)
            stream.synchronize()
        assert (dst.copy_to_host(np.empty(nbytes, dtype=np.uint8)) == 7).all()
    times = cuda.time_device_copy_ms(16 << 20, reps=3)
    assert times.shape == (3,) and (times > 0).all()
    assert cuda.memcpy_bandwidth_gbps(16 << 20, reps=3) > 0


@needs_gpu
def test_pinned_buffer_async_round_trip_on_one_stream() -> None:
    n = 1 << 18
    with (
        cuda.PinnedHostBuffer(n * 4) as host,
        cuda.DeviceBuffer(n * 4) as dev,
        cuda.Stream() as stream,
    ):
        src = host.array(np.float32, (n,))
        src[:] = np.arange(n, dtype=np.float32)
        dev.memset(0, stream=stream)  # ordered before the copy: same stream
        dev.copy_from_host(src, stream=stream)  # truly async from pinned memory:
        stream.synchronize()  # ... so wait before reusing it
        out = host.array(np.float32, (n,))  # the same pinned memory, read back over it
        out[:] = 0
        dev.copy_to_host(out, stream=stream)
        np.testing.assert_array_equal(out, np.arange(n, dtype=np.float32))
        with pytest.raises(ValueError, match="needs"):
            host.array(np.float32, (n + 1,))


@needs_gpu
def test_failed_capture_is_recoverable() -> None:
    with cuda.DeviceBuffer(1024) as a, cuda.DeviceBuffer(1024) as b, cuda.Stream() as stream:
        # Synchronizing a capturing stream is illegal: the capture fails, the stream must stay usable.
        with pytest.raises(cuda.CaptureFailed):
            cuda.CudaGraph(stream, stream.synchronize)
        b.memset(3, stream=stream)
        a.copy_from_device(b, stream=stream)
        with cuda.CudaGraph(stream, lambda: a.copy_from_device(b, stream=stream)) as graph:
            graph.launch(stream)  # uploaded at construction; launch still works
        assert (a.copy_to_host(np.empty(1024, dtype=np.uint8), stream=stream) == 3).all()
