"""3-D M-RoPE position_ids (Qwen2.5-VL's text decoder as onnxruntime-genai's builder exports it): the numpy
rope index against transformers' own output, the signature role, and the ORT runner feeding the genai
decoder fixture so that its logits equal transformers' (expected arrays: tools/fixtures/expected_mrope.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trt_latency.engines.mrope import get_rope_index, image_tokens, prompt_positions, text_positions

DATA = Path(__file__).parent / "data"
EXPECTED = DATA / "mrope"
DECODER = DATA / "thirdparty" / "genai-qwen25vl-text" / "model.onnx"
CASES = json.loads((EXPECTED / "get_rope_index.json").read_text())


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_rope_index_equals_transformers(case: dict) -> None:
    """Every layout (text/image/video runs, grids up to 28 x 40, a left-padded batch) as transformers assigns it."""
    mask = np.asarray(case["attention_mask"]) if case["attention_mask"] is not None else None
    pos, deltas = get_rope_index(np.asarray(case["mm_token_type_ids"]), case["image_grid_thw"] or None,
                                 case["video_grid_thw"] or None, case["second_per_grid_ts"], mask,
                                 CASES["spatial_merge_size"], CASES["tokens_per_second"])
    np.testing.assert_array_equal(pos, np.asarray(case["position_ids"]))
    np.testing.assert_array_equal(deltas, np.asarray(case["rope_deltas"]))


def test_prompt_layout_text_rows_and_delta() -> None:
    """Text: one position on the three rows; an image: its merged grid; the text after it continues from the
    image's largest position + 1; delta = max + 1 - length."""
    pos, delta = prompt_positions([(1, 4, 6)], text_tokens=3, spatial_merge_size=2, text_before=2)
    assert pos.shape == (3, 2 + image_tokens((1, 4, 6), 2) + 3) == (3, 11)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert pos[:, 8:].tolist() == [[5, 6, 7]] * 3
    assert delta == 8 - 11
    assert text_positions(9, 2).tolist() == [[9, 10]] * 3
    text_only, d0 = prompt_positions([], text_tokens=4, spatial_merge_size=2)
    assert text_only.tolist() == [[0, 1, 2, 3]] * 3 and d0 == 0


def test_signature_role_from_graph_and_from_tensors() -> None:
    pytest.importorskip("onnx")
    from trt_latency.engines.signature import SignatureError, read_signature, signature_from_tensors

    sig = read_signature(DECODER)
    assert (sig.position_ids, sig.position_layout, sig.token_input) == ("position_ids", "mrope", "inputs_embeds")
    assert "M-RoPE" in sig.sources["position_layout"] and sig.describe()["position_layout"] == "mrope"
    rows = {r["name"]: r for r in sig.step_bindings(10, 1, "shared", max_len=32)}
    assert rows["position_ids"]["shape"] == [3, 1, 1] and rows["position_ids"]["role"] == "position_ids_mrope"
    assert sig.position_shape(7, batch=4) == [3, 4, 7]

    # A TensorRT engine's I/O list: -1 for dynamic dims, the leading 3 static.
    kv = [(f"past_key_values.{i}.{k}", (-1, 2, -1, 16), "DataType.FLOAT") for i in range(2) for k in ("key", "value")]
    outs = [("logits", (-1, -1, 512), "DataType.FLOAT")] + [
        (f"present.{i}.{k}", (-1, 2, -1, 16), "DataType.FLOAT") for i in range(2) for k in ("key", "value")]
    ins = [("inputs_embeds", (-1, -1, 64), "DataType.FLOAT"), ("attention_mask", (-1, -1), "DataType.INT64")] + kv

    def from_tensors(pos_shape: tuple[int, ...], **kw: object):  # type: ignore[no-untyped-def]
        return signature_from_tensors("engine.plan", ins + [("position_ids", pos_shape, "DataType.INT64")], outs,
                                      model_dir="/nonexistent", **kw)  # type: ignore[arg-type]

    assert from_tensors((3, -1, -1)).position_layout == "mrope"
    assert from_tensors((-1, -1)).position_layout == "1d"
    with pytest.raises(SignatureError) as exc:
        from_tensors((-1, -1, -1))  # rank 3 without a static 3: say so, and how to name it
    assert "\n" not in str(exc.value) and "position_ids_mrope" in str(exc.value)
    assert from_tensors((-1, -1, -1), io={"position_ids": "position_ids_mrope"}).position_layout == "mrope"


def test_runner_feeds_grid_positions_like_transformers() -> None:
    """The genai decoder fed by the runner with the announced prompt positions gives transformers' logits
    (prefill), and a decode step sits at KV length + rope delta (equal to a recompute of the longer prompt)."""
    pytest.importorskip("onnxruntime")
    from trt_latency.engines.ort.runner import OrtRunner

    z = np.load(EXPECTED / "decoder_logits.npz")
    embeds, s = z["inputs_embeds"], z["inputs_embeds"].shape[1] - 1
    pos, deltas = get_rope_index(z["mm_token_type_ids"][None], z["image_grid_thw"].tolist())
    delta = int(deltas[0, 0])
    np.testing.assert_array_equal(np.concatenate([pos, [[[s + delta]]] * 3], axis=2), z["position_ids"])
    for mode in ("shared", "concat"):
        with OrtRunner(DECODER, kv_mode=mode, max_past_len=64, max_new_tokens=32, huge_pages=False) as r:
            assert r.mrope
            r.set_prompt_positions(pos[:, 0], delta)
            r.generate(embeds[:, :s], 1)
            ours = np.abs(r.last_logits(s) - z["prefill_last_logits"]).max()
            r.generate(embeds[:, :s], 1)  # not announced: text positions, a different result
            text = np.abs(r.last_logits(s) - z["prefill_last_logits"]).max()
            assert ours < 1e-5 and text > 10 * max(ours, 1e-7), (mode, ours, text)
            # the whole sequence as one prefill at transformers' positions: its decode-token logits
            r.set_prompt_positions(z["position_ids"][:, 0], delta)
            r.generate(embeds, 1)
            assert np.abs(r.last_logits(s + 1) - z["decode_logits"]).max() < 1e-5
            # a decode step after the announced prompt = a prefill of prompt + that token at s + delta
            r.set_prompt_positions(pos[:, 0], delta)
            res = r.generate(embeds[:, :s], 2)
            step = r.last_logits(1)
            longer = np.concatenate([embeds[:, :s], r.prompt_values(np.array([[res.tokens[0]]]))], axis=1)
            r.set_prompt_positions(z["position_ids"][:, 0], delta)
            r.generate(longer, 1)
            assert np.abs(r.last_logits(s + 1) - step).max() < 1e-5
            # the sweep's steps and a batched step bind [3, B, S]
            assert r.time_step(40, 1, 2).shape == (2,) and r.time_step(0, 16, 1).shape == (1,)
            assert r.time_batch_step([3, 20], 2).shape == (2,)


def test_chain_announces_the_images_grid() -> None:
    """The VLM chain tells an M-RoPE decoder where its prompt's images are (images first, then the text)."""
    pytest.importorskip("onnxruntime")
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.engines.vision import VisionChain, VisionEncoder, read_vision_signature

    chain = VisionChain(VisionEncoder(read_vision_signature(DATA / "vlm" / "qwen2.5-vl" / "vision.onnx")), None)
    rng = np.random.default_rng(0)
    with OrtRunner(DECODER, max_past_len=256, max_new_tokens=128, huge_pages=False) as r:
        announced: list[tuple[np.ndarray, int]] = []
        real = r.set_prompt_positions
        r.set_prompt_positions = lambda p, d: (announced.append((p, d)), real(p, d))[1]  # type: ignore[method-assign]
        embeds, _ = chain.prompt(r, vision_tokens=2 * 24, text_tokens=5, images=2, rng=rng)
        (pos, delta), = announced
        grid, merge = chain.encoder.adapter.llm_grid(chain.encoder.patches_for(48, 2))
        want, want_delta = prompt_positions([grid, grid], 5, merge)
        assert embeds.shape[1] == pos.shape[1] == 53 and np.array_equal(pos, want) and delta == want_delta < 0
        res = r.generate(embeds, 3)
        assert len(res.step_ms) == 2
