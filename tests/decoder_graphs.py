"""Small decoder graphs in the I/O shapes real exporters write, built with onnx.helper for the signature tests.

- ``concat`` attention (standard ops, optimum / torch.onnx style): present = Concat(past, new);
  optional attention_mask (padding over past + S) and position_ids (a learned position table);
  KV named past_key_values.{i}.key|value, past_key.{i} / past_value.{i}, or fused past.{i} [2,B,H,L,D].
- ``gqa`` attention (onnxruntime-genai builder style): com.microsoft.GroupQueryAttention with rotary
  inside, seqlens_k and total_sequence_length derived from attention_mask, no position_ids, head
  size symbolic (``kv_cache_dim``) with genai_config.json beside the model.

The real third-party fixtures (tests/data/thirdparty) come from the real exporters; these cover the
signature variants those exporters do not produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

H, NH, KV, D, VOCAB, LAYERS, CTX = 32, 4, 2, 16, 48, 2, 128


def _w(rng: np.random.Generator, *shape: int, dtype: Any = np.float32) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(dtype)


def build(path: Path, *, attention: str = "concat", token: str = "ids", mask: bool = True, positions: bool = True,
          naming: str = "pkv", dtype: str = "float32", extra_inputs: tuple[str, ...] = (), kv_inputs: bool = True,
          static_dims: bool = True, genai_config: bool | None = None, share_buffer: bool = True,
          hf_config: bool = False, seed: int = 0) -> Path:
    """Write a 2-layer decoder to ``path`` (and genai_config.json beside it for ``gqa``); returns path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    np_dt = np.float16 if dtype == "float16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    nodes: list[Any] = []
    inits: list[Any] = []
    n = [0]

    def op(kind: str, ins: list[str], out: str | None = None, domain: str = "", n_out: int = 1, **attrs: Any) -> Any:
        n[0] += 1
        outs = [out] if out else [f"{kind}_{n[0]}_{j}" for j in range(n_out)]
        nodes.append(helper.make_node(kind, ins, outs, name=f"{kind}_{n[0]}", domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name=name))
        return name

    def i64(*v: int) -> str:
        n[0] += 1
        return init(f"c{n[0]}", np.asarray(v, np.int64))

    kv_heads = KV if attention == "gqa" else NH
    hd: Any = D if static_dims else "head_dim"
    if attention == "gqa" and not static_dims:
        hd = "kv_cache_dim"
    heads_dim: Any = kv_heads if static_dims else "kv_heads"
    inputs = []
    if token == "ids":
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
        x = op("Gather", [init("model.embed_tokens.weight", _w(rng, VOCAB, H, dtype=np_dt)), "input_ids"])
    else:
        inputs.append(helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "seq", H]))
        x = "inputs_embeds"
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
    if positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
        x = op("Add", [x, op("Gather", [init("pos_table", _w(rng, CTX, H, dtype=np_dt) * 4), "position_ids"])])
    for name in extra_inputs:
        shape = ["batch", "enc", H] if "encoder" in name else ["batch", "blocks"]
        et = elem if "encoder" in name else TensorProto.INT32
        inputs.append(helper.make_tensor_value_info(name, et, shape))
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch", "seq", VOCAB])]

    def kv_names(i: int) -> tuple[list[str], list[str]]:
        if naming == "pkv":
            return [f"past_key_values.{i}.key", f"past_key_values.{i}.value"], [f"present.{i}.key", f"present.{i}.value"]
        if naming == "past_key":
            return [f"past_key.{i}", f"past_value.{i}"], [f"present_key.{i}", f"present_value.{i}"]
        return [f"past.{i}"], [f"present.{i}"]

    if kv_inputs:
        for i in range(LAYERS):
            past, present = kv_names(i)
            lead = [2] if naming == "fused" else []
            for p in past:
                inputs.append(helper.make_tensor_value_info(p, elem, [*lead, "batch", heads_dim, "past", hd]))
            for p in present:
                outputs.append(helper.make_tensor_value_info(p, elem, [*lead, "batch", heads_dim, "total", hd]))

    scale = np.asarray(1.0 / np.sqrt(D), np_dt)
    if attention == "concat" and kv_inputs:
        first = kv_names(0)[0][0]
        past_len = op("Gather", [op("Shape", [first]), i64(3 if naming == "fused" else 2)], axis=0)
        seq = op("Gather", [op("Shape", [x]), i64(1)], axis=0)
        total = op("Add", [past_len, seq])
        zero, one = init("zero", np.asarray(0, np.int64)), init("one", np.asarray(1, np.int64))
        t_idx = op("Unsqueeze", [op("Range", [zero, op("Squeeze", [total]), one]), i64(0)])
        q_abs = op("Add", [op("Range", [zero, op("Squeeze", [seq]), one]), op("Squeeze", [past_len])])
        visible = op("LessOrEqual", [t_idx, op("Unsqueeze", [q_abs, i64(-1)])])  # [S, T]
        if mask:
            pad = op("Cast", [op("Unsqueeze", ["attention_mask", i64(1, 2)])], to=TensorProto.BOOL)  # [B,1,1,T]
            visible = op("And", [visible, pad])
        neg = init("neg", np.asarray(-1e4 if dtype == "float16" else -1e9, np_dt))
        zero_f = init("zero_f", np.asarray(0.0, np_dt))
        add_mask = op("Where", [visible, zero_f, neg])
    if attention == "gqa":
        # genai: seqlens_k = sum(mask) - 1 (int32 [B]), total_sequence_length = mask's length (int32 scalar).
        seqlens = op("Cast", [op("Sub", [op("ReduceSum", ["attention_mask", i64(1)], keepdims=0),
                                         init("one64", np.asarray(1, np.int64))])], to=TensorProto.INT32)
        total_len = op("Cast", [op("Squeeze", [op("Gather", [op("Shape", ["attention_mask"]), i64(1)], axis=0)])],
                       to=TensorProto.INT32)
        inv = 1.0 / 10000.0 ** (np.arange(0, D // 2, dtype=np.float32) / (D // 2))
        freqs = np.outer(np.arange(CTX, dtype=np.float32), inv)
        cos = init("cos_cache", np.cos(freqs).astype(np_dt))
        sin = init("sin_cache", np.sin(freqs).astype(np_dt))
    for i in range(LAYERS):
        q = op("MatMul", [x, init(f"l{i}.q", _w(rng, H, NH * D, dtype=np_dt))])
        k = op("MatMul", [x, init(f"l{i}.k", _w(rng, H, kv_heads * D, dtype=np_dt))])
        v = op("MatMul", [x, init(f"l{i}.v", _w(rng, H, kv_heads * D, dtype=np_dt))])
        past, present = kv_names(i)
        if not kv_inputs:
            ctx = op("Add", [q, op("Add", [k, v])])  # a decoder without KV: recomputes everything
        elif attention == "gqa":
            ctx = op("GroupQueryAttention", [q, k, v, past[0], past[1], seqlens, total_len, cos, sin],
                     None, "com.microsoft", 3, num_heads=NH, kv_num_heads=KV, do_rotary=1)
            nodes[-1].output[:] = [f"gqa_out_{i}", present[0], present[1]]
            ctx = f"gqa_out_{i}"
        else:
            def heads(t: str, nh: int) -> str:
                return op("Transpose", [op("Reshape", [t, i64(0, 0, nh, D)])], perm=[0, 2, 1, 3])

            qh, kh, vh = heads(q, NH), heads(k, kv_heads), heads(v, kv_heads)
            if naming == "fused":
                pk = op("Squeeze", [op("Gather", [past[0], i64(0)], axis=0), i64(0)])
                pv = op("Squeeze", [op("Gather", [past[0], i64(1)], axis=0), i64(0)])
                k_all, v_all = op("Concat", [pk, kh], axis=2), op("Concat", [pv, vh], axis=2)
                op("Concat", [op("Unsqueeze", [k_all, i64(0)]), op("Unsqueeze", [v_all, i64(0)])], present[0], axis=0)
            else:
                k_all = op("Concat", [past[0], kh], present[0], axis=2)
                v_all = op("Concat", [past[1], vh], present[1], axis=2)
            scores = op("Mul", [op("MatMul", [qh, op("Transpose", [k_all], perm=[0, 1, 3, 2])]),
                                init(f"scale{i}", scale)])
            probs = op("Softmax", [op("Add", [scores, add_mask])], axis=-1)
            ctx = op("Reshape", [op("Transpose", [op("MatMul", [probs, v_all])], perm=[0, 2, 1, 3]), i64(0, 0, NH * D)])
        x = op("Add", [x, op("MatMul", [ctx, init(f"l{i}.o", _w(rng, NH * D, H, dtype=np_dt))])])
        x = op("Add", [x, op("MatMul", [op("Tanh", [x]), init(f"l{i}.mlp", _w(rng, H, H, dtype=np_dt))])])
    op("MatMul", [x, init("lm_head", _w(rng, H, VOCAB, dtype=np_dt))], "logits")
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 17)]
    if attention == "gqa":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    if genai_config if genai_config is not None else attention == "gqa":
        cfg = {"model": {"context_length": CTX, "vocab_size": VOCAB, "type": "llama",
                         "decoder": {"head_size": D, "hidden_size": H, "num_attention_heads": NH,
                                     "num_key_value_heads": KV, "num_hidden_layers": LAYERS}},
               "search": {"past_present_share_buffer": share_buffer, "max_length": CTX}}
        (path.parent / "genai_config.json").write_text(json.dumps(cfg))
    if hf_config:  # optimum writes the model's config.json beside model.onnx
        (path.parent / "config.json").write_text(json.dumps({
            "num_attention_heads": NH, "num_key_value_heads": NH, "hidden_size": H, "head_dim": D,
            "vocab_size": VOCAB, "max_position_embeddings": CTX, "num_hidden_layers": LAYERS}))
    return path


def full_logits(path: Path, prompt: np.ndarray, attention: str = "concat", naming: str = "pkv",
                kv_heads: int | None = None, head_dim: int = D) -> np.ndarray:
    """Logits of one full recompute over ``prompt`` (ids [1,S] or embeds [1,S,H]) with an empty past.

    Plain onnxruntime, feeds named by the exporters' conventions (independent of trt_latency's signature)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name: i for i in sess.get_inputs()}
    s = prompt.shape[1]
    feeds: dict[str, np.ndarray] = {("input_ids" if "input_ids" in names else "inputs_embeds"): prompt}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((1, s), np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(s, dtype=np.int64)[None]
    for name, meta in names.items():
        if name in feeds:
            continue
        dt = np.float16 if "float16" in meta.type else np.float32
        kvh = kv_heads if kv_heads is not None else KV if attention == "gqa" else NH
        shape = (2, 1, kvh, 0, head_dim) if naming == "fused" else (1, kvh, 0, head_dim)
        feeds[name] = np.zeros(shape, dt)
    return np.asarray(sess.run(["logits"], feeds)[0])
