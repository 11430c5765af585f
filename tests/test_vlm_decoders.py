"""Text decoders of other VLMs as onnxruntime-genai's builder exports them with exclude_embeds (fixtures:
tools/fixtures/make_vlm_text.py): Gemma 3 (sliding-window GroupQueryAttention) and Phi-3.5-vision (LongRoPE
Phi-3, its cos/sin cache switched by an If on the total length). Both take inputs_embeds + attention_mask +
KV, no position_ids: the roles the signature already knows. Qwen2.5-VL's (M-RoPE) is tests/test_mrope.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from trt_latency.cli import main  # noqa: E402
from trt_latency.engines.ort.runner import OrtRunner  # noqa: E402
from trt_latency.engines.signature import SignatureError, read_signature  # noqa: E402

DATA = Path(__file__).parent / "data" / "thirdparty"
GEMMA3 = DATA / "genai-gemma3-text" / "model.onnx"
PHI3V = DATA / "genai-phi3v-text" / "model.onnx"
WINDOW = 64  # Gemma 3 fixture's sliding window (layer 0)
# decode positions past the sliding window, a prefill longer than it, 4 replayed requests
PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 4, kv_heads: 2, head_dim: 16, intermediate: 128,
     vocab: 512, experts: 1, dtype: float32, max_past_len: 160, max_prefill_len: 96}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 4, linear_points: 2, reps: 2, warmup: 1}
  prefill: {lengths: [8, 96], reps: 2}
  seed: 0
replay:
  requests: 4
  vision_tokens: [0, 16]
  text_tokens: [4, 80]
  output_tokens: [2, 8]
  seed: 0
"""


def _decode_vs_recompute(path: Path, prompt_len: int, mode: str) -> float:
    """Relative error of a decode step after a prefill of ``prompt_len`` against one prefill of the same
    tokens plus the fed one (the runner's KV binding against the model's own full computation)."""
    with OrtRunner(path, kv_mode=mode, max_past_len=prompt_len + 8, max_new_tokens=prompt_len + 4,
                   huge_pages=False) as r:
        prompt = r.random_prompt(prompt_len, np.random.default_rng(3))
        res = r.generate(prompt, 2)
        step = r.last_logits(1).astype(np.float64)
        longer = np.concatenate([prompt, r.prompt_values(np.array([[res.tokens[0]]]))], axis=1)
        r.generate(longer, 1)
        full = r.last_logits(prompt_len + 1).astype(np.float64)
    return float(np.abs(step - full).max() / np.abs(full).max())


def test_signatures_are_the_known_roles() -> None:
    for path, window in ((GEMMA3, WINDOW), (PHI3V, 0)):
        sig = read_signature(path)
        assert (sig.token_input, sig.attention_mask, sig.position_ids, sig.resolve_kv_mode()) == (
            "inputs_embeds", "attention_mask", None, "shared")
        assert (sig.hidden, sig.blocks, sig.sliding_window) == (64, 2, window)
    assert read_signature(GEMMA3).sources["sliding_window"] == "graph GroupQueryAttention local_window_size"


def test_gemma3_sliding_window_refuses_concat_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """ORT's sliding-window GroupQueryAttention needs a KV buffer of at least the window: a concat past of
    past_len tokens fails at the first prefill, so the signature refuses concat up front."""
    with pytest.raises(SignatureError, match="local_window_size 64"):
        read_signature(GEMMA3).resolve_kv_mode("concat")
    assert main(["inspect", str(GEMMA3), "--kv-mode", "concat"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field '--kv-mode'" in err[0] and "shared" in err[0]


@pytest.mark.parametrize("path, prompt_len, mode", [
    (GEMMA3, WINDOW + 16, "shared"),  # past the sliding window
    (PHI3V, 40, "shared"), (PHI3V, 40, "concat"),
    (PHI3V, 4100, "shared"),  # past original_max_position_embeddings 4096: the long rope cache
])
def test_decode_step_equals_a_recompute(path: Path, prompt_len: int, mode: str) -> None:
    assert _decode_vs_recompute(path, prompt_len, mode) < 1e-5


def test_gemma3_calibrates_across_its_window(tmp_path: Path) -> None:
    from trt_latency.estimator.requests import read_requests
    from trt_latency.estimator.samples import read_samples

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "o"
    assert main(["calibrate", str(plan), "--quick", "--onnx", str(GEMMA3), "--out", str(out), "--backend", "ort-cpu",
                 "--no-progress", "--no-plot"]) == 0
    samples = read_samples(out / "samples.csv")
    decode = samples.past_len[samples.phase == "decode"]
    assert set(samples.kv_mode) == {"shared"} and decode.min() < WINDOW < decode.max() == 160
    assert len(read_requests(out / "requests.csv")) == 4
