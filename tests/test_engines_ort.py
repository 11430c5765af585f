"""ONNX Runtime runner on real sessions: preallocated bindings, generate() feeding present KV back, backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from helpers.plans import write_plan  # noqa: E402

from trt_latency.engines.backends import open_runner  # noqa: E402
from trt_latency.engines.config import load_plan  # noqa: E402
from trt_latency.engines.export import export_decoder  # noqa: E402
from trt_latency.engines.ort.loader import provider_loads  # noqa: E402
from trt_latency.engines.ort.runner import OrtRunner  # noqa: E402
from trt_latency.errors import BackendUnavailable, InputError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ort")
    plan = load_plan(write_plan(d))
    dense = export_decoder(plan.tier(0), 1, 2, d / "dense.onnx")
    moe = export_decoder(plan.tier(1), 2, 1, d / "moe.onnx")
    return dense, moe


def test_time_step_writes_into_preallocated_buffers(tiny: tuple[Path, Path]) -> None:
    with OrtRunner(tiny[0], intra_op_threads=1) as runner:
        assert (runner.backend, runner.max_past_len, runner.max_new_tokens, runner.hidden) == ("ort-cpu", 256, 64, 32)
        ms = runner.time_step(10, 1, 4)
        assert ms.dtype == np.float64 and ms.shape == (4,) and (ms > 0).all()
        runner.time_step(7, 3, 1)
        for kind in ("key", "value"):  # present (set 1) = past (set 0) + 3 new tokens, in our own buffers
            past = runner.present(1, kind, 7, kv_set=0)
            present = runner.present(1, kind, 10, kv_set=1)
            np.testing.assert_array_equal(present[:, :, :7], past)
            assert not np.array_equal(present[:, :, 7:], runner.present(1, kind, 10, kv_set=0)[:, :, 7:])
        assert runner.time_step(0, 64, 1).shape == (1,)  # prefill at the profile max, empty past
        assert runner.time_step(256, 1, 1).shape == (1,)
        with pytest.raises(ValueError):
            runner.time_step(257, 1, 1)


@pytest.mark.parametrize("which", [0, 1])
def test_generate_feeds_present_back_as_past(tiny: tuple[Path, Path], which: int) -> None:
    """Greedy tokens and final KV of generate() equal one full recompute over prompt + generated tokens."""
    path = tiny[which]
    runner = OrtRunner(path, intra_op_threads=1, seed=4)
    prompt = np.random.default_rng(9).standard_normal((1, 6, runner.hidden), dtype=np.float32)
    res = runner.generate(prompt, 5)
    assert len(res.step_ms) == 4 and res.output_tokens == 5 and len(res.tokens) == 5
    assert 0 < res.ttft_ms <= res.total_ms and res.total_ms >= res.ttft_ms + sum(res.step_ms) * 0.99
    embeds = np.concatenate([prompt[0], runner._embed_table[res.tokens[:-1]]])[None]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    blocks = runner.dims.blocks
    feeds = {"inputs_embeds": embeds, "position_ids": np.arange(10, dtype=np.int64)[None]}
    for i in range(blocks):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, 2, 0, 8), np.float32)
    out = sess.run(None, feeds)
    assert out[0][0, 5:].argmax(-1).tolist() == res.tokens
    final_set = runner._last_past_set
    for i in range(blocks):
        np.testing.assert_allclose(runner.present(i, "key", 10, final_set), out[1 + 2 * i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(runner.present(i, "value", 10, final_set), out[2 + 2 * i], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        runner.generate(prompt[:, :, :5], 2)


def test_open_runner_backends(tiny: tuple[Path, Path], capfd: pytest.CaptureFixture[str]) -> None:
    runner = open_runner(tiny[0], "auto", threads=1)
    expected = "ort-cuda" if provider_loads("CUDAExecutionProvider") else "ort-cpu"
    if expected == "ort-cpu":
        assert runner.backend == "ort-cpu"
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            open_runner(tiny[0], "ort-cuda")
        with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
            open_runner(tiny[0], "ort-trt")
        out, err = capfd.readouterr()
        assert "onnxruntime" not in (out + err) and "EP Error" not in (out + err)  # probes stay quiet
    with pytest.raises(InputError, match="backend"):
        open_runner(tiny[0], "openvino")
    with pytest.raises(InputError, match="file not found"):
        open_runner(tiny[0].with_name("missing.onnx"))


def test_tensorrt_backend_unavailable_without_the_library(tiny: tuple[Path, Path]) -> None:
    from trt_latency.engines.trt.loader import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here; its own tests cover it")
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        open_runner(tiny[0], "tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not provider_loads("CUDAExecutionProvider"), reason="ONNX Runtime CUDA provider does not load here")
def test_cuda_runner_matches_cpu(tiny: tuple[Path, Path]) -> None:
    prompt = np.random.default_rng(3).standard_normal((1, 6, 32), dtype=np.float32)
    cpu = OrtRunner(tiny[0], "cpu", seed=1).generate(prompt, 4)
    cuda_runner = OrtRunner(tiny[0], "cuda", seed=1)
    gpu = cuda_runner.generate(prompt, 4)
    assert gpu.tokens == cpu.tokens
    assert (cuda_runner.time_step(100, 1, 3) > 0).all()
