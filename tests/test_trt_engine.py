"""TensorRT backend end to end on a tiny exported decoder (needs TensorRT and a GPU: skipped elsewhere)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trt_latency.engines import cuda
from trt_latency.engines.config import TierSpec
from trt_latency.engines.export import export_decoder
from trt_latency.engines.signature import read_signature
from trt_latency.engines.trt import loader
from trt_latency.errors import InputError

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
if not hasattr(trt, "Builder"):
    pytest.skip("only tensorrt-stubs is installed, not TensorRT", allow_module_level=True)
if cuda.device_count() == 0:
    # tests/test_trt_driver.py fails (not skips) when nvidia-smi sees a GPU that the bindings cannot.
    pytest.skip(f"no CUDA device for the bindings: {cuda.cuda_status().explain()}", allow_module_level=True)

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

TINY = TierSpec(tier_idx=0, name="tiny", hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
                intermediate=128, vocab=256, experts=1, dtype="float32", max_past_len=64, max_prefill_len=16)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(TINY, 1, 2, tmp_path_factory.mktemp("trt") / "model.onnx")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt-cache")


@pytest.fixture(scope="module")
def runner(model: Path, cache_dir: Path) -> Any:
    from trt_latency.engines.trt.runner import TrtRunner

    with TrtRunner.from_onnx(model, cache_dir=cache_dir) as r:
        yield r


def _feeds(past_len: int, new_tokens: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {
        "inputs_embeds": (rng.standard_normal((1, new_tokens, TINY.hidden)) * 0.1).astype(np.float32),
        "position_ids": np.arange(past_len, past_len + new_tokens, dtype=np.int64).reshape(1, -1),
    }
    for block in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{block}.{kind}"] = (
                rng.standard_normal((1, TINY.kv_heads, past_len, TINY.head_dim)) * 0.5).astype(np.float32)
    return feeds


def _ort(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))


def test_runner_attributes(runner: Any) -> None:
    assert runner.backend == "tensorrt"
    assert runner.device == cuda.device_name()
    assert runner.max_past_len == TINY.max_past_len and runner.max_prefill_len == TINY.max_prefill_len
    assert runner.hidden == TINY.hidden and runner.vocab == TINY.vocab and runner.num_blocks == 2


def test_engine_cached_on_disk(model: Path, cache_dir: Path, runner: Any) -> None:
    cached = loader.build_or_load_cached(model, read_signature(model), max_past_len=TINY.max_past_len,
                                         max_prefill_len=TINY.max_prefill_len, cache_dir=cache_dir)
    assert cached.cache_hit and cached.path.parent == cache_dir
    assert cached.key.device == cuda.device_name() and cached.key.tensorrt_version == trt.__version__
    assert cached.path.with_suffix(".json").is_file()
    assert cached.timing_cache is not None and cached.timing_cache.stat().st_size > 0  # persisted beside it
    assert cached.timing_cache.parent == cache_dir


def test_build_is_announced_and_reuses_the_timing_cache(model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    first = loader.build_or_load_cached(model, read_signature(model), max_past_len=32, max_prefill_len=8, cache_dir=tmp_path,
                                        workspace_bytes=256 << 20)
    err = capsys.readouterr().err
    assert not first.cache_hit and "building a TensorRT engine" in err and str(first.path) in err
    assert first.timing_cache is not None and first.timing_cache.is_file()
    timing = first.timing_cache.read_bytes()
    # Another workspace is another engine (a miss), built with the timing cache the first one left.
    second = loader.build_or_load_cached(model, read_signature(model), max_past_len=32, max_prefill_len=8, cache_dir=tmp_path,
                                         workspace_bytes=512 << 20)
    err = capsys.readouterr().err
    assert not second.cache_hit and second.path != first.path and "ignoring" not in err
    assert second.timing_cache == first.timing_cache and second.timing_cache.stat().st_size > 0 and timing


def test_two_profiles_one_context_each(runner: Any) -> None:
    assert runner.profiles == ["decode", "prefill"] and len(runner._contexts) == 2
    runner.time_step(7, 1, reps=1)
    assert runner._active == 0  # decode step on the decode profile
    runner.time_step(0, 16, reps=1)
    assert runner._active == 1  # prompt on the prefill profile
    runner.time_step(0, 1, reps=1)
    assert runner._active == 0


@pytest.mark.parametrize(("past_len", "new_tokens"), [(0, 16), (0, 1), (5, 1), (63, 1), (40, 7)])
def test_logits_and_present_match_ort_cpu(model: Path, runner: Any, past_len: int, new_tokens: int) -> None:
    feeds = _feeds(past_len, new_tokens)
    got = runner.infer(feeds)
    ref = _ort(model, feeds)
    assert got["logits"].shape == ref["logits"].shape == (1, new_tokens, TINY.vocab)
    # fp32 ONNX; TensorRT may use TF32 matmuls, hence 1e-2 relative to the output scale.
    assert _rel_err(got["logits"], ref["logits"]) < 1e-2
    present = "present.1.value"
    assert got[present].shape == (1, TINY.kv_heads, past_len + new_tokens, TINY.head_dim)
    assert _rel_err(got[present], ref[present]) < 1e-2


@pytest.mark.parametrize("graph", [False, True], ids=["enqueue", "cuda-graph"])
def test_time_step_positive_ms(runner: Any, graph: bool) -> None:
    runner.use_cuda_graph = graph
    try:
        for past_len, new_tokens in [(0, 16), (1, 1), (32, 1), (64, 1), (1, 1)]:
            times = runner.time_step(past_len, new_tokens, reps=5)
            assert times.dtype == np.float64 and times.shape == (5,)
            assert (times > 0).all() and np.isfinite(times).all()
        if graph:
            assert runner.graph_fallbacks == {}  # this engine is capturable at every shape
    finally:
        runner.use_cuda_graph = False


def test_cuda_graph_replays_the_same_computation(runner: Any) -> None:
    feeds = _feeds(20, 1, seed=3)
    plain = runner.infer(feeds)["logits"].copy()  # leaves these inputs in the canonical buffers
    runner.use_cuda_graph = True
    try:
        runner.time_step(20, 1, reps=2)  # captures a graph at (20, 1); rewrites the same position ids
    finally:
        runner.use_cuda_graph = False
    logits_buf = runner._addr["logits"]
    logits_buf.memset(0, stream=runner._stream)
    runner._graphs[(20, 1)].launch(runner._stream)
    replayed = logits_buf.copy_to_host(np.empty(plain.shape, dtype=plain.dtype), stream=runner._stream)
    np.testing.assert_allclose(replayed, plain, rtol=1e-5, atol=1e-6)


def test_generate_follows_ort_greedy_decode(model: Path, runner: Any) -> None:
    prompt = (np.random.default_rng(5).standard_normal((1, 6, TINY.hidden)) * 0.1).astype(np.float32)
    result = runner.generate(prompt, output_tokens=4)
    assert result.ttft_ms > 0 and result.total_ms >= result.ttft_ms
    assert len(result.step_ms) == 3 and all(s > 0 for s in result.step_ms) and len(result.tokens) == 4

    # Replay the same greedy loop with ONNX Runtime on CPU from the runner's embedding table.
    table = runner._embed_table
    empty = np.zeros((1, TINY.kv_heads, 0, TINY.head_dim), dtype=np.float32)
    feeds: dict[str, np.ndarray] = {"inputs_embeds": prompt,
                                    "position_ids": np.arange(6, dtype=np.int64).reshape(1, -1)}
    feeds.update({f"past_key_values.{b}.{k}": empty for b in range(2) for k in ("key", "value")})
    for step, token in enumerate(result.tokens):
        out = _ort(model, feeds)
        last = out["logits"][0, -1]
        # TensorRT's token must be an argmax of ONNX Runtime's logits up to fp tolerance.
        assert last[token] >= last.max() - 1e-2 * max(np.abs(last).max(), 1e-6), (step, token, int(last.argmax()))
        past_len = feeds["past_key_values.0.key"].shape[2] + feeds["inputs_embeds"].shape[1]
        feeds = {"inputs_embeds": table[token % table.shape[0]].reshape(1, 1, -1),
                 "position_ids": np.array([[past_len]], dtype=np.int64)}
        feeds.update({f"past_key_values.{b}.{k}": out[f"present.{b}.{k}"] for b in range(2)
                      for k in ("key", "value")})


def test_first_generate_is_warmed_up(model: Path, cache_dir: Path) -> None:
    from trt_latency.engines.trt.runner import TrtRunner

    prompt = (np.random.default_rng(6).standard_normal((1, 5, TINY.hidden)) * 0.1).astype(np.float32)
    with TrtRunner.from_onnx(model, cache_dir=cache_dir) as r:
        assert not r.warmed
        first = r.generate(prompt, output_tokens=3)
        assert r.warmed
        second = r.generate(prompt, output_tokens=3)
    assert first.tokens == second.tokens  # the warm-up request leaves no state behind


def test_from_engine_loads_the_cached_plan(model: Path, cache_dir: Path) -> None:
    from trt_latency.engines.trt.runner import TrtRunner

    cached = loader.build_or_load_cached(model, read_signature(model), max_past_len=TINY.max_past_len,
                                         max_prefill_len=TINY.max_prefill_len, cache_dir=cache_dir)
    with TrtRunner.from_engine(cached.path) as r:
        assert r.max_past_len == TINY.max_past_len
        assert (r.time_step(10, 1, reps=3) > 0).all()
    with pytest.raises(InputError, match="profile"):
        TrtRunner.from_engine(cached.path, max_past_len=TINY.max_past_len + 1)


def test_open_runner_tensorrt_backend(model: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRT_LATENCY_CACHE", str(cache_dir))
    backends = importlib.import_module("trt_latency.engines.backends")
    with backends.open_runner(model, "tensorrt") as r:
        assert r.backend == "tensorrt"
        assert (r.time_step(3, 1, reps=2) > 0).all()


@pytest.mark.parametrize("name", ["optimum-llama-fp32", "torch-llama-embeds"])
def test_third_party_export_runs_by_its_signature(name: str, tmp_path: Path) -> None:
    # Token ids + mask + positions (optimum) and embeddings + positions (torch.onnx), bound by their roles.
    from trt_latency.engines.trt.runner import TrtRunner

    path = Path(__file__).resolve().parent / "data" / "thirdparty" / name / "model.onnx"
    with TrtRunner.from_onnx(path, max_past_len=64, max_new_tokens=16, cache_dir=tmp_path, kv_mode="auto") as r:
        assert r.kv_mode == "concat" and r.token_input == read_signature(path).token_input
        assert r.max_past_len == 64 and r.max_prefill_len == 16
        assert r.time_step(10, 1, reps=2).shape == (2,)
        result = r.generate(np.zeros((1, 8, r.hidden), dtype=np.float32), 4)
        assert len(result.tokens) == 4 and len(result.step_ms) == 3 and result.ttft_ms > 0
