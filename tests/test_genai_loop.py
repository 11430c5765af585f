"""The replay through onnxruntime-genai's own loop (engines/genai_loop.py, `calibrate --runtime genai`).

The choice of loop and the ONNX Runtime version check run everywhere. The runs themselves need
onnxruntime-genai, which CI never installs (it brings its own onnxruntime): they are skipped there and run
in a scratch venv with it (`pip install onnxruntime-genai` + this package `--no-deps`), on the committed
genai fixtures (tests/data/thirdparty/genai-llama-*, built by onnxruntime-genai's builder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from trt_latency.engines.genai_loop import (
    GENAI_CONFIG,
    choose_loop,
    genai_version,
    loaded_ort_libraries,
    loop_provenance,
    ort_mismatch,
)
from trt_latency.errors import BackendUnavailable, InputError

DATA = Path(__file__).parent / "data" / "thirdparty"
INT4 = DATA / "genai-llama-int4" / "model.onnx"
OPTIMUM = DATA / "optimum-llama-fp32" / "model.onnx"


def test_auto_picks_genai_only_with_its_config_and_its_library() -> None:
    choice = choose_loop("auto", INT4)
    if genai_version() is None:  # CI: no onnxruntime-genai, our loop, saying why
        assert choice.kind == "ort" and "onnxruntime_genai does not import" in choice.why
        assert loop_provenance(choice) == "ort"
    else:
        assert choice.is_genai and choice.model_dir == INT4.parent
        assert loop_provenance(choice) == f"genai {genai_version()}"
    plain = choose_loop("auto", OPTIMUM)  # no genai_config.json beside it
    assert plain.kind == "ort" and GENAI_CONFIG in plain.why
    assert choose_loop("ort", INT4).kind == "ort"
    gpu = choose_loop("auto", INT4, backend="ort-cuda")
    assert gpu.kind == "ort" and "ort-cuda" in gpu.why
    vlm = choose_loop("auto", INT4, embeddings=True)
    assert vlm.kind == "ort" and "embeddings" in vlm.why


def test_runtime_genai_says_what_is_missing() -> None:
    with pytest.raises(BackendUnavailable, match=GENAI_CONFIG):
        choose_loop("genai", OPTIMUM)
    with pytest.raises(InputError, match="--runtime"):
        choose_loop("vllm", INT4)


MAPS = """7f00-7f01 r-xp 00000000 08:01 1 /venv/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0
7f02-7f03 r-xp 00000000 08:01 2 /venv/site-packages/onnxruntime_genai/libonnxruntime-genai.so
7f04-7f05 r--p 00000000 08:01 1 /venv/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0
7f06-7f07 rw-p 00000000 00:00 0 [heap]
"""


def test_ort_version_mismatch_is_named() -> None:
    libs = loaded_ort_libraries(MAPS)
    assert libs == ["/venv/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0"]
    assert ort_mismatch(libs, "1.32.0") is None
    warning = ort_mismatch(libs, "1.31.1")  # issue 24: onnxruntime-gpu 1.31.1 overlaid on genai's 1.32.0
    assert warning is not None and "1.32.0" in warning and "1.31.1" in warning
    assert ort_mismatch([], "1.32.0") is None and ort_mismatch(libs, None) is None
    # Two flavours in one venv: the one installed last owns the package folder (issue 24's overlay).
    both = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    overlaid = ort_mismatch(loaded_ort_libraries(MAPS.replace("1.32.0", "1.31.1")), "1.31.1", both)
    assert overlaid is not None and "onnxruntime 1.32.0" in overlaid and "onnxruntime-gpu" not in overlaid
    assert ort_mismatch(libs, "1.32.0", {"onnxruntime": "1.32.0"}) is None


# ------------------------------------------------------------------------------ with onnxruntime-genai


@pytest.fixture(scope="module")
def genai_loop():  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (CI never installs it: "
                                                    "it brings its own onnxruntime); run in a scratch venv with it")
    from trt_latency.engines.genai_loop import GenaiLoop

    with GenaiLoop(INT4.parent, intra_op_threads=1) as loop:
        yield loop


@pytest.mark.slow
def test_generate_times_each_call_as_genai_pays_it(genai_loop) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    for prompt, n in ((5, 1), (40, 2), (300, 7)):
        res = genai_loop.generate(genai_loop.random_prompt(prompt, rng), n)
        assert res.output_tokens == n and len(res.tokens) == n  # min_length: no early end-of-sequence
        assert all(0 <= t < genai_loop.vocab for t in res.tokens)
        assert 0 < res.ttft_ms <= res.total_ms and all(s > 0 for s in res.step_ms)
        assert res.total_ms >= res.ttft_ms + sum(res.step_ms)
    with pytest.raises(ValueError, match="output_tokens"):
        genai_loop.generate(genai_loop.random_prompt(4, rng), genai_loop.context)
    assert genai_loop.ort_warning() is None or "onnxruntime-genai loaded" in genai_loop.ort_warning()
    assert loaded_ort_libraries()  # genai mapped its ONNX Runtime into this process


@pytest.mark.slow
def test_replay_writes_the_same_rows_through_genai(genai_loop, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from trt_latency.engines.config import ReplaySpec, TierSpec
    from trt_latency.engines.replay import run_replay
    from trt_latency.estimator.requests import read_requests
    from trt_latency.schema import ConfigKey

    tier = TierSpec(tier_idx=0, name="genai-llama-int4", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                    intermediate=128, vocab=512, experts=1, dtype="float32", max_past_len=600, max_prefill_len=400)
    spec = ReplaySpec(requests=6, vision_tokens=(0,), text_tokens=(8, 300), output_tokens=(1, 12), seed=3)
    key = ConfigKey(0, 1, 2)
    result = run_replay(genai_loop, key, tier, spec, tmp_path / "requests.csv", progress=False)
    assert result.rows_written == 6
    log = read_requests(tmp_path / "requests.csv")
    assert list(log.request_id) == list(range(6)) and (log.total_ms >= log.ttft_ms).all()
    assert (log.ttft_ms > 0).all() and set(log.output_tokens) <= set(range(1, 13))
    # Resumed: nothing replayed twice.
    assert run_replay(genai_loop, key, tier, spec, tmp_path / "requests.csv", progress=False).rows_written == 0


@pytest.mark.slow
def test_calibrate_runtime_genai_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (CI never installs it)")
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.requests import read_requests
    from trt_latency.pipeline import CalibrateOptions, calibrate

    model = tmp_path / "model"
    shutil.copytree(INT4.parent, model)
    lines: list[str] = []
    res = calibrate(CalibrateOptions(onnx=str(model / "model.onnx"), out=str(tmp_path / "out"), quick=True,
                                     requests=24, no_plot=True, no_progress=True, runtime="genai"), say=lines.append)
    cal = load_calibration(res.calibration)
    assert cal.provenance["loop"] == f"genai {genai_version()}"
    assert any("replay loop: genai" in line for line in lines)
    assert len(read_requests(res.requests)) == 24  # type: ignore[arg-type]
    loop = cal.configs[0].serving_loop
    assert loop is not None and loop.source == "replay"
    # A zero is a named bound, never a silent 0.0000.
    for name, value in (("o", loop.decode_step_ms), ("c", loop.first_step_ms), ("o_p", loop.prefill_ms)):
        assert (value == 0.0) == (name in loop.clamped)
