"""Real third-party exports (tests/data/thirdparty, made by onnxruntime-genai's builder, optimum-cli and
torch.onnx; see its MANIFEST.md): the signature trt-latency reads, decoding with the KV it binds against
a full recompute in plain onnxruntime, refusals, and `calibrate --onnx` end to end on a tiny plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import decoder_graphs as graphs  # noqa: E402

from trt_latency.cli import main  # noqa: E402
from trt_latency.engines.ort.runner import OrtRunner  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "thirdparty"
# What each export is, from its exporter (MANIFEST.md): token input, mask, positions, its runtime's KV mode, KV dtype.
EXPECTED = {
    "genai-llama-fp32": ("input_ids", "attention_mask", None, "shared", "float32"),
    "genai-llama-int4": ("input_ids", "attention_mask", None, "shared", "float32"),
    "genai-llama-embeds": ("inputs_embeds", "attention_mask", None, "shared", "float32"),
    "genai-qwen2-fp32": ("input_ids", "attention_mask", None, "shared", "float32"),
    "genai-phi3-fp32": ("input_ids", "attention_mask", None, "shared", "float32"),
    "optimum-llama-fp32": ("input_ids", "attention_mask", "position_ids", "concat", "float32"),
    "optimum-llama-fp16": ("input_ids", "attention_mask", "position_ids", "concat", "float16"),
    "torch-llama-embeds": ("inputs_embeds", None, "position_ids", "concat", "float32"),
    "torch-llama-embeds-dynamo": ("inputs_embeds", None, "position_ids", "concat", "float32"),
}
KV_HEADS, HEAD_DIM, BLOCKS, CONTEXT = 2, 16, 2, 8192  # the fixtures' configs (tools/fixtures/make_hf_models.py)
# A plan small enough for 9 end-to-end runs in the suite: 4 decode positions, 2 prefill lengths, 4 requests.
MICRO_PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32, intermediate: 128,
     vocab: 128, experts: 1, dtype: float32, max_past_len: 128, max_prefill_len: 32}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 3, linear_points: 1, reps: 2, warmup: 1}
  prefill: {lengths: [4, 16], reps: 2}
  seed: 0
replay:
  requests: 4
  vision_tokens: [0, 4]
  text_tokens: [2, 8]
  output_tokens: [2, 6]
  seed: 0
"""
REFUSED = {"genai-llama-paged/model.onnx": "block_table",
           "optimum-t5-decoder/decoder_model.onnx": "encoder_hidden_states",
           "optimum-t5-decoder/decoder_model_merged.onnx": "encoder_hidden_states"}


def _model(name: str) -> Path:
    path = DATA / name / "model.onnx" if not name.endswith(".onnx") else DATA / name
    if not path.is_file():
        pytest.skip(f"fixture {name} not present (tests/data/thirdparty)")
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_describes_the_fixture(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = _model(name)
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    token, mask, positions, mode, dtype = EXPECTED[name]
    assert (d["token_input"], d["attention_mask"], d["position_ids"], d["kv_mode"], d["kv_dtype"]) == (
        token, mask, positions, mode, dtype)
    assert (d["blocks"], d["kv_heads"], d["head_dim"], d["max_past_len"]) == (BLOCKS, KV_HEADS, HEAD_DIM, CONTEXT - 1)
    if name.startswith("genai"):  # head size is symbolic (kv_cache_dim) in genai graphs
        assert d["sources"]["head_dim"] == "genai_config.json head_size"
        assert d["sources"]["share_buffer"] == "genai_config.json search.past_present_share_buffer"


@pytest.mark.parametrize("name, mode", [(n, m) for n in sorted(EXPECTED)
                                        for m in (("shared", "concat") if n.startswith("genai") else ("concat",))])
def test_bound_kv_matches_a_full_recompute(name: str, mode: str) -> None:
    """Prefill 6 tokens + 5 greedy decode steps through the KV the runner binds; the last step's logits equal
    a full recompute over all 11 tokens (rel err < 1e-3, fp16 model included: both paths round the same way;
    measured 2e-6 for optimum fp16, ~2e-7 for the fp32 ones)."""
    path = _model(name)
    runner = OrtRunner(path, intra_op_threads=1, kv_mode=mode, max_past_len=64, max_new_tokens=16, seed=2)
    prompt = runner.random_prompt(6, np.random.default_rng(11))
    res = runner.generate(prompt, 6)
    tail = np.asarray(res.tokens[:-1])
    full = (np.concatenate([prompt[0], tail])[None] if runner.token_input == "input_ids"
            else np.concatenate([prompt[0], runner._embed_table[tail]])[None])
    ref = graphs.full_logits(path, full, kv_heads=KV_HEADS, head_dim=HEAD_DIM)[0, -1].astype(np.float64)
    got = runner.last_logits(1).astype(np.float64)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3


def test_shared_buffer_steps_equal_the_concat_path() -> None:
    path = _model("genai-llama-fp32")
    out = {}
    for mode in ("shared", "concat"):
        runner = OrtRunner(path, intra_op_threads=1, kv_mode=mode, max_past_len=64, max_new_tokens=16, seed=1)
        res = runner.generate(np.arange(3, 12, dtype=np.int64)[None], 16)
        out[mode] = (res.tokens, runner.last_logits(1))
    assert out["shared"][0] == out["concat"][0]
    np.testing.assert_allclose(out["shared"][1], out["concat"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_untimeable_exports_fail_in_one_line(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = _model(name)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and f"field '{REFUSED[name]}'" in err[0]
    assert "inputs found: " in err[0] and "fix: " in err[0]


def test_shared_mode_refused_for_concat_attention(capsys: pytest.CaptureFixture[str]) -> None:
    path = _model("optimum-llama-fp32")
    assert main(["inspect", str(path), "--kv-mode", "shared"]) == 1
    assert "field '--kv-mode'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_calibrate_onnx_end_to_end(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """calibrate --onnx FIXTURE --quick on a tiny plan: samples.csv, calibration.yaml, requests.csv replayed
    through the real model, in the KV mode its runtime uses."""
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.requests import read_requests
    from trt_latency.estimator.samples import read_samples

    path = _model(name)
    plan = tmp_path / "plan.yaml"
    plan.write_text(MICRO_PLAN)
    out = tmp_path / "o"
    assert main(["calibrate", str(plan), "--quick", "--onnx", str(path), "--out", str(out), "--backend", "ort-cpu",
                 "--no-progress", "--no-plot"]) == 0
    text = capsys.readouterr().out
    mode = EXPECTED[name][3]
    samples = read_samples(out / "samples.csv")
    assert set(samples.kv_mode) == {mode} and int(samples.past_len.max()) == 128  # the plan's cap (context 8192)
    cal = load_calibration(out / "calibration.yaml")
    assert cal.provenance["kv_mode"] == mode and cal.configs[0].kv_bytes_per_token == (
        2 * BLOCKS * KV_HEADS * HEAD_DIM * (2 if EXPECTED[name][4] == "float16" else 4))
    assert len(read_requests(out / "requests.csv")) == 4
    assert f"kv_mode      {mode} (token input {EXPECTED[name][0]})" in text
