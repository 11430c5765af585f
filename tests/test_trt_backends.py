"""Backend selection around TensorRT (engines/backends.py): option filtering and auto's fallback.

Runs without TensorRT: the option filter reads TrtRunner's real signatures, and the fallback is driven
by real failures of real ONNX Runtime sessions (a model that does not parse, a model whose weight file
is missing) standing in for the TensorRT parse / build failures that cannot happen on this machine.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from trt_latency.engines import backends, cuda
from trt_latency.engines.backends import open_first, open_runner, tensorrt_constructor
from trt_latency.engines.config import TierSpec
from trt_latency.engines.export import export_decoder
from trt_latency.engines.ort.runner import OrtRunner
from trt_latency.engines.trt.runner import TrtRunner
from trt_latency.errors import InputError

TINY = TierSpec(tier_idx=0, name="tiny", hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
                intermediate=128, vocab=256, experts=1, dtype="float32", max_past_len=64, max_prefill_len=16)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(TINY, 1, 2, tmp_path_factory.mktemp("backends") / "model.onnx")


def test_prebuilt_engine_drops_build_options(capsys: pytest.CaptureFixture[str]) -> None:
    engine = Path("decoder.plan")
    options = {"device_id": 0, "seed": 3, "use_cuda_graph": True, "max_past_len": 64, "opt_past_len": 32,
               "rebuild": True, "workspace_bytes": 1 << 30, "min_past_len": 1}
    constructor, kwargs = tensorrt_constructor(TrtRunner, engine, options)
    assert constructor == TrtRunner.from_engine
    assert kwargs == {"device_id": 0, "seed": 3, "use_cuda_graph": True, "max_past_len": 64}
    inspect.signature(constructor).bind(engine, **kwargs)  # no TypeError when it is called
    err = capsys.readouterr().err
    assert "prebuilt engine" in err and "min_past_len, opt_past_len, rebuild, workspace_bytes" in err


def test_onnx_keeps_every_build_option(capsys: pytest.CaptureFixture[str]) -> None:
    options = {"device_id": 1, "opt_past_len": 32, "opt_prefill_len": 8, "workspace_bytes": 1 << 30,
               "cache_dir": "c", "rebuild": False}
    constructor, kwargs = tensorrt_constructor(TrtRunner, Path("model.onnx"), options)
    assert constructor == TrtRunner.from_onnx and kwargs == options
    inspect.signature(constructor).bind(Path("model.onnx"), **kwargs)
    assert capsys.readouterr().err == ""


def test_unknown_tensorrt_option_is_an_input_error(tiny_onnx: Path) -> None:
    with pytest.raises(InputError, match="trt_options.use_graph") as info:
        tensorrt_constructor(TrtRunner, Path("model.onnx"), {"use_graph": True})
    assert "use_cuda_graph" in str(info.value)  # the message lists what is accepted
    # auto must not hide a misspelt option behind a fallback to another backend.
    with pytest.raises(InputError, match="trt_options.use_graph"):
        open_runner(tiny_onnx, "auto", trt_options={"use_graph": True})


def test_auto_falls_back_on_any_open_failure(tiny_onnx: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an ONNX model")
    no_weights = export_decoder(TINY, 1, 2, tmp_path / "w" / "model.onnx", external_data_threshold=0)
    (tmp_path / "w" / "model.onnx.data").unlink()
    tried: list[str] = []

    def open_one(candidate: str) -> OrtRunner:
        tried.append(candidate)
        # Real failures, not BackendUnavailable: a parse error, then a load error (missing weights).
        path = {"tensorrt": garbage, "ort-cuda": no_weights, "ort-cpu": tiny_onnx}[candidate]
        return OrtRunner(path, "cpu", intra_op_threads=1)

    with open_first(tiny_onnx, open_one) as runner:
        assert runner.backend == "ort-cpu"
    assert tried == ["tensorrt", "ort-cuda", "ort-cpu"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("trt-latency: backend auto: tensorrt failed on") and "trying ort-cuda" in err[0]
    # The parse failure is named: ONNX Runtime's INVALID_PROTOBUF, or the decoder signature's reader.
    assert "INVALID_PROTOBUF" in err[0] or "not a readable ONNX model" in err[0]
    assert "ort-cuda failed" in err[1] and "trying ort-cpu" in err[1]


def test_auto_last_candidate_failure_propagates(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an ONNX model")
    with pytest.raises(Exception, match="INVALID_PROTOBUF|not a readable ONNX model"):
        open_first(garbage, lambda _c: OrtRunner(garbage, "cpu"), candidates=("ort-cuda", "ort-cpu"))


def test_auto_reports_unavailable_gpu_backends_only_where_a_gpu_is(
        tiny_onnx: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_SAID", set())  # notes are printed once per process: start afresh
    def open_one(candidate: str) -> OrtRunner:
        # Real BackendUnavailable without a GPU: ONNX Runtime's CUDA provider does not load here.
        return OrtRunner(tiny_onnx, "cuda" if candidate != "ort-cpu" else "cpu", intra_op_threads=1)

    if cuda.device_count() > 0:
        pytest.skip("the CUDA provider may load on this machine")
    with open_first(tiny_onnx, open_one, gpu_present=lambda: False) as runner:
        assert runner.backend == "ort-cpu"
    assert capsys.readouterr().err == ""  # no GPU: the CPU is the expected outcome, nothing to say
    # Where nvidia-smi lists a GPU, a GPU backend switching itself off is reported (once per reason).
    for _ in range(2):
        with open_first(tiny_onnx, open_one, candidates=("ort-cuda", "ort-cpu"), gpu_present=lambda: True) as runner:
            assert runner.backend == "ort-cpu"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("trt-latency: backend auto: ort-cuda unavailable: ")
    assert "CUDAExecutionProvider" in err[0] and err[0].endswith("trying ort-cpu")


def test_tensorrt_refuses_shared_kv_before_any_build() -> None:
    # genai's share-buffer KV cannot be bound by a TensorRT engine: one line, no TensorRT needed to say so.
    genai = Path(__file__).resolve().parent / "data" / "thirdparty" / "genai-llama-fp32" / "model.onnx"
    if not genai.is_file():
        pytest.skip("fixture genai-llama-fp32 not present")
    for mode in ("auto", "shared"):
        with pytest.raises(InputError, match="--kv-mode concat") as info:
            TrtRunner.from_onnx(genai, kv_mode=mode, max_past_len=64)
        assert "\n" not in str(info.value)
    # kv_mode, io and dims reach both constructors (none is dropped as a build option).
    options = {"kv_mode": "concat", "io": "a=input_ids", "dims": "head_dim=8"}
    for path in (Path("model.onnx"), Path("decoder.plan")):
        assert tensorrt_constructor(TrtRunner, path, options)[1] == options
