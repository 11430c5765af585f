"""The driver check: cuda-bindings must see the GPUs the NVIDIA driver (nvidia-smi) sees.

Kept apart from tests/test_trt_cuda.py, which skips as a whole without cuda-bindings: a GPU host whose
bindings are missing or built for a newer CUDA than its driver must fail here, not skip green.
"""

from __future__ import annotations

import pytest

from trt_latency.engines import cuda


def test_bindings_see_every_gpu_nvidia_smi_sees() -> None:
    # nvidia-smi speaks for the driver; if it lists GPUs the bindings must see them too. A CUDA 12
    # driver with cuda-bindings 13.x makes cudaGetDeviceCount fail, and every GPU test below would
    # skip green: fail here instead, naming the mismatch.
    gpus = cuda.nvidia_smi_gpus()
    if not gpus:
        pytest.skip("nvidia-smi is absent or lists no GPU" if gpus is None else "nvidia-smi lists no GPU")
    status = cuda.cuda_status()
    assert status.device_count == len(gpus), f"nvidia-smi lists {gpus}, but {status.explain()}"


@pytest.mark.parametrize(("runtime", "driver", "extra"), [(13050, 12040, "cu12"), (13000, 12090, "cu12"),
                                                          (14000, 13020, "cu13")])
def test_no_device_message_names_driver_bindings_mismatch(runtime: int, driver: int, extra: str) -> None:
    text = cuda.explain_no_device("cudaErrorInsufficientDriver", bindings="13.5.0", runtime_version=runtime,
                                  driver_version=driver)
    assert "driver/bindings mismatch" in text and f"trt-latency[{extra}]" in text
    assert f"CUDA {driver // 1000}.{driver % 1000 // 10}" in text and "cuda-bindings 13.5.0" in text


def test_no_device_message_without_driver_or_with_matching_majors() -> None:
    none = cuda.explain_no_device("cudaErrorInsufficientDriver", bindings="13.5.0", runtime_version=13050,
                                  driver_version=0)
    assert "no NVIDIA driver" in none and "mismatch" not in none
    same = cuda.explain_no_device("cudaErrorNoDevice", bindings="12.9.0", runtime_version=12090,
                                  driver_version=12080)
    assert "mismatch" not in same and same.startswith("cudaErrorNoDevice")
