"""The TensorRT loader binds an engine by its DecoderSignature, as the ONNX Runtime path binds the ONNX.

Runs without TensorRT: for each third-party fixture (tests/data/thirdparty, made by onnxruntime-genai's
builder, optimum and torch.onnx) the (name, shape, dtype) lists that a TensorRT engine built from that
ONNX exposes are derived from the ONNX graph's I/O the way TensorRT reports them (dynamic axes -1,
dtypes as ``str(trt.DataType.X)``), and the engine-side signature, axis layouts, profiles and per-step
shapes are compared with the ONNX path's (read_signature + onnx_input_shapes, what a build parses).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

onnx = pytest.importorskip("onnx")

from trt_latency.engines.signature import DecoderSignature, SignatureError, Tensor, read_signature  # noqa: E402
from trt_latency.engines.trt import loader  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "thirdparty"
FIXTURES = sorted(p.name for p in DATA.iterdir() if p.is_dir() and p.name.split("-")[0] in ("genai", "optimum", "torch")
                  and (p / "model.onnx").is_file()) if DATA.is_dir() else []
REFUSED = {"genai-llama-paged": "block_table", "optimum-t5-decoder": "encoder_hidden_states"}
# ONNX element type -> how TensorRT's Python API prints the engine tensor's DataType.
TRT_DTYPES = {1: "DataType.FLOAT", 10: "DataType.HALF", 16: "DataType.BF16", 7: "DataType.INT64",
              6: "DataType.INT32", 9: "DataType.BOOL"}
MAX_PAST, MAX_PREFILL = 256, 64


def engine_tensors(onnx_path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """The I/O tensors of an engine built from ``onnx_path``: graph inputs (initializers excluded) and
    outputs, each (name, shape with -1 for every dynamic axis, TensorRT dtype)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def listed(values: Any) -> list[Tensor]:
        out: list[Tensor] = []
        for v in values:
            tt = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            out.append((v.name, shape, TRT_DTYPES[tt.elem_type]))
        return out

    return [t for t in listed(model.graph.input) if t[0] not in initializers], listed(model.graph.output)


def _comparable(desc: dict[str, object]) -> dict[str, object]:
    # The model path and the graph's op list differ by construction (an engine's I/O names no ops).
    return {k: v for k, v in desc.items() if k not in ("model", "attention_ops", "sources")}


def _both(name: str) -> tuple[Path, DecoderSignature, DecoderSignature, dict[str, tuple[int, ...]], list[Tensor]]:
    onnx_path = DATA / name / "model.onnx"
    ins, outs = engine_tensors(onnx_path)
    # The engine lies beside the ONNX and its configs (genai_config.json, config.json), as a user's would.
    engine_sig = loader.engine_signature(DATA / name / "model.engine", ins, outs)
    return onnx_path, read_signature(onnx_path), engine_sig, loader.onnx_input_shapes(onnx_path), ins


def test_every_exporter_is_covered() -> None:
    kinds = {n.split("-")[0] for n in FIXTURES}
    assert kinds == {"genai", "optimum", "torch"} and len(FIXTURES) >= 9, FIXTURES


@pytest.mark.parametrize("name", [n for n in FIXTURES if n not in REFUSED])
def test_engine_tensors_give_the_onnx_roles_and_profiles(name: str) -> None:
    onnx_path, onnx_sig, engine_sig, onnx_shapes, ins = _both(name)
    mode = "concat"
    if onnx_sig.sliding_window:
        # Gemma 3's window is an attribute of genai's GroupQueryAttention (a com.microsoft op that TensorRT's
        # parser does not take), not an I/O tensor, so a tensor list cannot show it; the ONNX refuses concat
        # (decisions 11). Compare everything else, in the mode that graph accepts.
        with pytest.raises(SignatureError, match="local_window_size"):
            onnx_sig.describe("concat")
        mode = "shared"
        engine_sig = dataclasses.replace(engine_sig, sliding_window=onnx_sig.sliding_window)
    assert _comparable(engine_sig.describe(mode)) == _comparable(onnx_sig.describe(mode))
    assert engine_sig.kv == onnx_sig.kv and engine_sig.logits == onnx_sig.logits
    assert (engine_sig.token_dtype, engine_sig.mask_dtype, engine_sig.position_dtype) == (
        onnx_sig.token_dtype, onnx_sig.mask_dtype, onnx_sig.position_dtype)

    onnx_layouts = loader.input_layouts(onnx_sig, onnx_shapes)
    engine_layouts = loader.input_layouts(engine_sig, {n: tuple(s) for n, s, _ in ins})
    assert engine_layouts == onnx_layouts
    assert loader.layouts_digest(engine_layouts) == loader.layouts_digest(onnx_layouts)  # same engine cache key
    limits = loader.profile_limits(engine_sig, MAX_PAST, MAX_PREFILL)
    assert limits == loader.profile_limits(onnx_sig, MAX_PAST, MAX_PREFILL) == (MAX_PAST, MAX_PREFILL)
    profiles = loader.decoder_profiles(engine_layouts, max_past_len=MAX_PAST, max_prefill_len=MAX_PREFILL)
    assert profiles == loader.decoder_profiles(onnx_layouts, max_past_len=MAX_PAST, max_prefill_len=MAX_PREFILL)

    # Every input the engine has gets a profile; only the signature's dynamic roles vary, nothing else.
    sig = engine_sig
    decode, prefill = profiles["decode"], profiles["prefill"]
    assert set(decode) == set(prefill) == {n for n, _, _ in ins}
    tok = decode[sig.token_name]
    width = () if sig.token_input == "input_ids" else (sig.hidden,)
    assert tok == ((1, 1, *width),) * 3
    assert prefill[sig.token_name] == ((1, 1, *width), (1, MAX_PREFILL // 2, *width), (1, MAX_PREFILL, *width))
    kv = (sig.kv_heads, sig.head_dim)
    for block in sig.kv:
        for past, _ in block.pairs():
            assert decode[past] == ((1, kv[0], 0, kv[1]), (1, kv[0], MAX_PAST // 2, kv[1]), (1, kv[0], MAX_PAST, kv[1]))
            assert prefill[past].opt == (1, kv[0], 1, kv[1])  # a prompt starts on an (almost) empty cache
    if sig.attention_mask:
        # The mask spans past + S: one more than the past on decode, past + prompt on prefill.
        assert decode[sig.attention_mask] == ((1, 1), (1, MAX_PAST // 2 + 1), (1, MAX_PAST + 1))
        assert prefill[sig.attention_mask] == ((1, 1), (1, 1 + MAX_PREFILL // 2), (1, MAX_PAST + MAX_PREFILL))
    if sig.position_ids:
        # [B, S], or M-RoPE's [3, B, S] (genai's Qwen2.5-VL text decoder)
        assert prefill[sig.position_ids] == tuple(tuple(sig.position_shape(s, 1)) for s in (1, MAX_PREFILL // 2, MAX_PREFILL))
    assert [loader.profile_range(sig, engine_layouts, profiles[p]) for p in loader.PROFILES] == [
        loader.ProfileRange((1, 1, 1), (0, MAX_PAST // 2, MAX_PAST)),
        loader.ProfileRange((1, MAX_PREFILL // 2, MAX_PREFILL), (0, 1, MAX_PAST))]

    # What the TensorRT runner sets per step is what the ONNX Runtime runner binds (DecoderSignature.step_bindings);
    # the TensorRT runner binds concat KV only (open_tensorrt refuses shared), so a sliding-window graph stops here.
    for past_len, new_tokens in ((0, 7), (5, 1), (MAX_PAST, 1)) if mode == "concat" else ():
        bound = {r["name"]: tuple(r["shape"]) for r in onnx_sig.step_bindings(past_len, new_tokens, "concat")
                 if r["io"] == "input"}
        assert loader.step_shapes(engine_layouts, past_len, new_tokens) == bound


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_exports_are_refused_alike(name: str) -> None:
    for onnx_path in sorted((DATA / name).glob("*.onnx")):
        with pytest.raises(SignatureError) as from_onnx:
            read_signature(onnx_path)
        ins, outs = engine_tensors(onnx_path)
        with pytest.raises(SignatureError) as from_engine:
            loader.engine_signature(onnx_path.with_suffix(".engine"), ins, outs)
        assert REFUSED[name] in str(from_engine.value)
        assert str(from_engine.value).replace(".engine", ".onnx") == str(from_onnx.value)


def test_genai_shared_kv_is_refused_in_one_line() -> None:
    _, onnx_sig, engine_sig, _, _ = _both("genai-llama-fp32")
    assert onnx_sig.resolve_kv_mode("auto") == "shared"  # genai_config.json says so
    for sig in (onnx_sig, engine_sig):
        assert loader.tensorrt_kv_mode(sig, "concat") == "concat"
        for mode in ("auto", "shared"):
            with pytest.raises(SignatureError) as info:
                loader.tensorrt_kv_mode(sig, mode)
            text = str(info.value)
            assert "\n" not in text and "--kv-mode concat" in text and "kv_mode" in text
    _, optimum, _, _, _ = _both("optimum-llama-fp32")
    assert loader.tensorrt_kv_mode(optimum, "auto") == "concat"


def test_io_and_dims_reach_the_engine_plan(tmp_path: Path) -> None:
    # An engine whose inputs have odd names and a dynamic head size: --io names the roles, --dims the size.
    ins: list[Tensor] = [("tok", [-1, -1], "DataType.INT64"), ("mask", [-1, -1], "DataType.INT64")]
    outs: list[Tensor] = [("logits", [-1, -1, 32], "DataType.FLOAT")]
    io = {"tok": "input_ids", "mask": "attention_mask"}
    for i in range(2):
        ins += [(f"k{i}", [-1, 2, -1, -1], "DataType.HALF"), (f"v{i}", [-1, 2, -1, -1], "DataType.HALF")]
        outs += [(f"nk{i}", [-1, 2, -1, -1], "DataType.HALF"), (f"nv{i}", [-1, 2, -1, -1], "DataType.HALF")]
        io.update({f"k{i}": f"past_key.{i}", f"v{i}": f"past_value.{i}", f"nk{i}": f"present_key.{i}",
                   f"nv{i}": f"present_value.{i}"})
    engine = tmp_path / "odd.engine"
    with pytest.raises(SignatureError, match="head_dim"):
        loader.engine_signature(engine, ins, outs, io=io)
    io_text = ",".join(f"{k}={v}" for k, v in io.items())
    sig = loader.engine_signature(engine, ins, outs, io=io_text, dims="head_dim=8,context_length=129")
    assert (sig.token_name, sig.attention_mask, sig.kv[1].past_value, sig.kv[1].present_value) == ("tok", "mask", "v1", "nv1")
    layouts = loader.input_layouts(sig, {n: tuple(s) for n, s, _ in ins})
    assert layouts["k0"] == ("batch", 2, "past", 8) and layouts["mask"] == ("batch", "total")
    assert loader.profile_limits(sig, None, None) == (128, 128)  # context 129 -> past <= 128
    assert loader.profile_limits(sig, 4096, 16) == (128, 16)  # never beyond the model
    assert loader.step_shapes(layouts, 10, 1) == {"tok": (1, 1), "mask": (1, 11), "k0": (1, 2, 10, 8),
                                                  "v0": (1, 2, 10, 8), "k1": (1, 2, 10, 8), "v1": (1, 2, 10, 8)}
    # --dims that contradict a static engine axis are named, not silently used.
    with pytest.raises(SignatureError, match="k0"):
        loader.input_layouts(loader.engine_signature(engine, ins, outs, io=io, dims={"head_dim": 8, "kv_heads": 4}),
                             {n: tuple(s) for n, s, _ in ins})


def test_mrope_positions_are_planned_per_section() -> None:
    # Qwen2.5-VL's text decoder (genai, exclude_embeds): position_ids [3, B, S] (temporal, height, width).
    ins: list[Tensor] = [("inputs_embeds", [-1, -1, 32], "DataType.FLOAT"), ("attention_mask", [-1, -1], "DataType.INT64"),
                         ("position_ids", [3, -1, -1], "DataType.INT64"),
                         ("past_key_values.0.key", [-1, 2, -1, 16], "DataType.FLOAT"),
                         ("past_key_values.0.value", [-1, 2, -1, 16], "DataType.FLOAT")]
    outs: list[Tensor] = [("logits", [-1, -1, 64], "DataType.FLOAT"), ("present.0.key", [-1, 2, -1, 16], "DataType.FLOAT"),
                          ("present.0.value", [-1, 2, -1, 16], "DataType.FLOAT")]
    try:
        sig = loader.engine_signature("qwen-vl.engine", ins, outs, dims="context_length=65")
    except SignatureError as exc:  # the 3-D M-RoPE role lands in engines/signature.py separately
        pytest.skip(f"the signature does not take 3-D position_ids yet: {exc}")
    layouts = loader.input_layouts(sig, {n: tuple(s) for n, s, _ in ins})
    assert layouts["position_ids"] == (3, "batch", "seq")
    prefill = loader.decoder_profiles(layouts, max_past_len=64, max_prefill_len=16)["prefill"]
    assert prefill["position_ids"] == ((3, 1, 1), (3, 1, 8), (3, 1, 16))
