"""TierSpec + (top_k, num_active_blocks) -> model.onnx: a reference decoder with explicit KV-cache bindings.

Built with onnx.helper from standard ops only (no contrib ops, no ONNX Attention op) so TensorRT's
ONNX parser takes it. One graph serves prefill (S > 1, any past length, causal mask) and decode
(S = 1). ``attention_mask [B, past + S]`` (int64, 1 = attend, 0 = padding) masks left-padded rows of a
ragged batch; it is an overridable initializer (ones [1, 1], broadcast) so callers that feed no mask
(B = 1, a TensorRT engine built from the file) run exactly as before. Per block: RMSNorm -> GQA attention with RoPE (computed in-graph from position_ids) and
past/present KV concat -> RMSNorm -> SiLU-gated MLP, or a sparse MoE that runs exactly top_k expert
MLPs per token (router -> TopK -> per expert: NonZero picks its tokens, Gather, MLP, ScatterND back).
Only ``num_active_blocks`` blocks are in the graph: those are the blocks executed.

Weights are seeded per (seed, block, tensor name), so a model with 2 active blocks holds exactly the
first 2 blocks of the 4-block model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.engines.config import TierSpec
from trt_latency.schema import ConfigKey

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 10; opset 17 needs IR >= 8
EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of weights above which they go to a side file (protobuf 2 GB cap)
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
METADATA_PREFIX = "trt_latency."
MASK_INPUT = "attention_mask"
_META_INT_FIELDS = ("tier_idx", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                    "experts", "max_past_len", "max_prefill_len", "top_k", "num_active_blocks", "seed")


def _np_dtype(dtype: str) -> type[np.floating[Any]]:
    return np.float16 if dtype == "float16" else np.float32


def weight(seed: int, block: int, name: str, shape: tuple[int, ...], dtype: str, scale: float | None = None) -> np.ndarray:
    """Deterministic random weight for (seed, block, name); fan-in scaled so activations stay O(1)."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    rng = np.random.default_rng([seed, block + 1, digest])
    std = scale if scale is not None else 1.0 / np.sqrt(shape[-2] if len(shape) >= 2 else shape[-1])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(_np_dtype(dtype))


def norm_weight(seed: int, block: int, name: str, hidden: int, dtype: str) -> np.ndarray:
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    rng = np.random.default_rng([seed, block + 1, digest])
    return (1.0 + 0.1 * rng.standard_normal(hidden, dtype=np.float32)).astype(_np_dtype(dtype))


class _GraphBuilder:
    """Small helper: unique node names, initializers, constants."""

    def __init__(self, dtype: str) -> None:
        from onnx import TensorProto

        self.dtype = dtype
        self.elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.weight_bytes = 0
        self._n = 0
        self._consts: dict[tuple[str, bytes], str] = {}

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, n_out: int = 1,
           outputs: list[str] | None = None, **attrs: Any) -> Any:
        from onnx import helper

        base = self.name(prefix or op_type)
        outs = outputs if outputs is not None else [base if n_out == 1 else f"{base}_o{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array, name=name))
        self.weight_bytes += array.nbytes
        return name

    def const(self, array: np.ndarray, prefix: str = "const") -> str:
        key = (f"{array.dtype}{array.shape}", array.tobytes())
        if key not in self._consts:
            from onnx import numpy_helper

            name = self.name(prefix)
            self.inits.append(numpy_helper.from_array(array, name=name))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "i64")

    def scalar(self, value: float) -> str:
        return self.const(np.asarray(value, dtype=_np_dtype(self.dtype)), "scalar")


def _rms_norm(g: _GraphBuilder, x: str, w: str) -> str:
    # Computed in the model dtype; eps keeps fp16 finite for the small activations here.
    sq = g.op("Mul", [x, x], "rms_sq")
    mean = g.op("ReduceMean", [sq], "rms_mean", axes=[-1], keepdims=1)
    denom = g.op("Sqrt", [g.op("Add", [mean, g.scalar(RMS_EPS)], "rms_eps")], "rms_sqrt")
    return g.op("Mul", [g.op("Div", [x, denom], "rms_div"), w], "rms_out")


def _rope(g: _GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin (HF convention), x: [B, n, S, D]."""
    x1 = g.op("Slice", [x, g.i64(0), g.i64(half), g.i64(-1)], "rope_x1")
    x2 = g.op("Slice", [x, g.i64(half), g.i64(2 * half), g.i64(-1)], "rope_x2")
    rotated = g.op("Concat", [g.op("Neg", [x2], "rope_neg"), x1], "rope_rot", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], "rope_cos"), g.op("Mul", [rotated, sin], "rope_sin")], "rope")


def _mlp(g: _GraphBuilder, x: str, wg: str, wu: str, wd: str) -> str:
    gate = g.op("MatMul", [x, wg], "mlp_gate")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], "mlp_sig")], "mlp_silu")
    up = g.op("MatMul", [x, wu], "mlp_up")
    return g.op("MatMul", [g.op("Mul", [act, up], "mlp_act"), wd], "mlp_down")


def _moe(g: _GraphBuilder, tier: TierSpec, top_k: int, x: str, block: int, seed: int) -> str:
    """Sparse MoE over x [B, S, H]: every token runs exactly top_k expert MLPs."""
    H, inter, E = tier.hidden, tier.intermediate, tier.experts
    p = f"blocks.{block}.moe"
    router = g.init(f"{p}.router", weight(seed, block, f"{p}.router", (H, E), tier.dtype))
    flat = g.op("Reshape", [x, g.i64(-1, H)], "moe_flat")  # [N, H]
    logits = g.op("MatMul", [flat, router], "moe_router")  # [N, E]
    top_vals, top_idx = g.op("TopK", [logits, g.i64(top_k)], "moe_topk", n_out=2, axis=-1, largest=1, sorted=1)
    route_w = g.op("Softmax", [top_vals], "moe_route_w", axis=-1)  # [N, k] Mixtral-style renormalised weights
    zeros = g.op("ConstantOfShape", [g.op("Shape", [flat], "moe_shape")], "moe_zeros",
                 value=_const_tensor(g, 0.0))
    acc = zeros
    for e in range(E):
        hit = g.op("Equal", [top_idx, g.i64(e)], "moe_hit")  # [N, k]
        hit_f = g.op("Cast", [hit], "moe_hit_f", to=g.elem)
        w_full = g.op("ReduceSum", [g.op("Mul", [route_w, hit_f], "moe_w_sel"), g.i64(-1)], "moe_w", keepdims=0)
        chosen = g.op("Greater", [g.op("ReduceSum", [hit_f, g.i64(-1)], "moe_cnt", keepdims=0), g.scalar(0.0)],
                      "moe_chosen")  # [N] bool
        rows = g.op("Reshape", [g.op("NonZero", [chosen], "moe_nz"), g.i64(-1)], "moe_rows")  # [n_e]
        xe = g.op("Gather", [flat, rows], "moe_xe", axis=0)  # [n_e, H]
        pe = f"{p}.experts.{e}"
        wg = g.init(f"{pe}.gate", weight(seed, block, f"{pe}.gate", (H, inter), tier.dtype))
        wu = g.init(f"{pe}.up", weight(seed, block, f"{pe}.up", (H, inter), tier.dtype))
        wd = g.init(f"{pe}.down", weight(seed, block, f"{pe}.down", (inter, H), tier.dtype))
        ye = _mlp(g, xe, wg, wu, wd)
        we = g.op("Unsqueeze", [g.op("Gather", [w_full, rows], "moe_we", axis=0), g.i64(-1)], "moe_we2")
        scattered = g.op("ScatterND", [zeros, g.op("Unsqueeze", [rows, g.i64(-1)], "moe_idx"),
                                       g.op("Mul", [ye, we], "moe_yw")], "moe_scatter")
        acc = g.op("Add", [acc, scattered], "moe_acc")
    return g.op("Reshape", [acc, g.op("Shape", [x], "moe_xshape")], "moe_out")


def _const_tensor(g: _GraphBuilder, value: float) -> Any:
    from onnx import helper

    return helper.make_tensor("value", g.elem, [1], [value])


def build_model(tier: TierSpec, top_k: int, num_active_blocks: int, seed: int = 0) -> tuple[Any, int]:
    """The ModelProto (weights in memory) and its weight bytes."""
    from onnx import TensorProto, helper, numpy_helper

    if not 1 <= num_active_blocks <= tier.layers:
        raise ValueError(f"num_active_blocks must be in [1, {tier.layers}], got {num_active_blocks}")
    if not 1 <= top_k <= tier.experts:
        raise ValueError(f"top_k must be in [1, {tier.experts}], got {top_k}")
    g = _GraphBuilder(tier.dtype)
    H, D, NH, KV = tier.hidden, tier.head_dim, tier.heads, tier.kv_heads
    groups, half = NH // KV, D // 2
    inputs = [helper.make_tensor_value_info("inputs_embeds", g.elem, ["batch", "seq", H]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    # The mask is an input with a default: ONNX Runtime takes a fed [B, past + S] mask, everyone else
    # (a B = 1 step, TensorRT's parser, which reads input+initializer as a constant) gets ones.
    inputs.append(helper.make_tensor_value_info(MASK_INPUT, TensorProto.INT64, ["batch", "total_len"]))
    g.inits.append(numpy_helper.from_array(np.ones((1, 1), dtype=np.int64), name=MASK_INPUT))
    outputs = [helper.make_tensor_value_info("logits", g.elem, ["batch", "seq", tier.vocab])]
    for i in range(num_active_blocks):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", g.elem,
                                                        ["batch", KV, "past_len", D]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", g.elem,
                                                         ["batch", KV, "total_len", D]))

    # RoPE tables from position_ids: [B, 1, S, D], shared by every block.
    inv_freq = (1.0 / ROPE_THETA ** (np.arange(0, half, dtype=np.float32) / half)).astype(np.float32)
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "pos_f", to=TensorProto.FLOAT), g.i64(-1)], "pos_u")
    freqs = g.op("Mul", [pos, g.const(inv_freq, "inv_freq")], "rope_freqs")  # [B, S, D/2]
    emb = g.op("Concat", [freqs, freqs], "rope_emb", axis=-1)
    cos = g.op("Unsqueeze", [g.op("Cast", [g.op("Cos", [emb], "cos_f")], "cos", to=g.elem), g.i64(1)], "cos_u")
    sin = g.op("Unsqueeze", [g.op("Cast", [g.op("Sin", [emb], "sin_f")], "sin", to=g.elem), g.i64(1)], "sin_u")

    # Causal mask over KV indices: query s (absolute index past_len + s) sees t <= past_len + s.
    # Rows are tiled per query group because GQA folds the group into the query axis.
    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], "past_shape"), g.i64(2)], "past_len", axis=0)
    seq = g.op("Gather", [g.op("Shape", ["inputs_embeds"], "emb_shape"), g.i64(1)], "seq", axis=0)
    total = g.op("Add", [past_len, seq], "total_len")
    zero_s, one_s = g.const(np.asarray(0, np.int64)), g.const(np.asarray(1, np.int64))
    t_idx = g.op("Unsqueeze", [g.op("Range", [zero_s, g.op("Squeeze", [total], "total_s"), one_s], "t_range"),
                               g.i64(0)], "t_idx")  # [1, T]
    q_abs = g.op("Add", [g.op("Range", [zero_s, g.op("Squeeze", [seq], "seq_s"), one_s], "s_range"),
                         g.op("Squeeze", [past_len], "past_s")], "q_abs")
    visible = g.op("LessOrEqual", [t_idx, g.op("Unsqueeze", [q_abs, g.i64(-1)], "q_col")], "visible")  # [S, T]
    neg = -1e4 if tier.dtype == "float16" else -1e9
    mask = g.op("Where", [visible, g.scalar(0.0), g.scalar(neg)], "mask")
    mask = g.op("Tile", [mask, g.i64(groups, 1)], "mask_tiled")  # [groups*S, T]
    # Padding: (1 - attention_mask) * neg as [B, 1, 1, T], added to the causal mask once for all blocks.
    keep = g.op("Cast", [MASK_INPUT], "mask_keep", to=g.elem)
    pad = g.op("Mul", [g.op("Sub", [g.scalar(1.0), keep], "mask_drop"), g.scalar(neg)], "mask_pad")
    mask = g.op("Add", [mask, g.op("Unsqueeze", [pad, g.i64(1, 2)], "mask_pad4")], "mask_full")  # [B, 1, gS, T]

    x = "inputs_embeds"
    seed_ = seed
    for b in range(num_active_blocks):
        p = f"blocks.{b}"
        h = _rms_norm(g, x, g.init(f"{p}.attn_norm", norm_weight(seed_, b, f"{p}.attn_norm", H, tier.dtype)))
        wq = g.init(f"{p}.q", weight(seed_, b, f"{p}.q", (H, NH * D), tier.dtype))
        wk = g.init(f"{p}.k", weight(seed_, b, f"{p}.k", (H, KV * D), tier.dtype))
        wv = g.init(f"{p}.v", weight(seed_, b, f"{p}.v", (H, KV * D), tier.dtype))
        wo = g.init(f"{p}.o", weight(seed_, b, f"{p}.o", (NH * D, H), tier.dtype))
        q = g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [h, wq], "q_proj"), g.i64(0, 0, NH, D)], "q_r")],
                 "q_t", perm=[0, 2, 1, 3])  # [B, NH, S, D]
        k = g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [h, wk], "k_proj"), g.i64(0, 0, KV, D)], "k_r")],
                 "k_t", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [h, wv], "v_proj"), g.i64(0, 0, KV, D)], "v_r")],
                 "v_t", perm=[0, 2, 1, 3])
        q = _rope(g, q, cos, sin, half)
        k = _rope(g, k, cos, sin, half)
        k_all = g.op("Concat", [f"past_key_values.{b}.key", k], outputs=[f"present.{b}.key"], axis=2)
        v_all = g.op("Concat", [f"past_key_values.{b}.value", v], outputs=[f"present.{b}.value"], axis=2)
        # GQA without repeating K/V: fold each kv head's query group into the query axis.
        qg = g.op("Reshape", [q, g.i64(0, KV, -1, D)], "q_grouped")  # [B, KV, groups*S, D]
        qg = g.op("Mul", [qg, g.scalar(1.0 / float(np.sqrt(D)))], "q_scaled")
        scores = g.op("MatMul", [qg, g.op("Transpose", [k_all], "k_T", perm=[0, 1, 3, 2])], "scores")
        probs = g.op("Softmax", [g.op("Add", [scores, mask], "scores_masked")], "probs", axis=-1)
        ctx = g.op("MatMul", [probs, v_all], "attn_ctx")  # [B, KV, groups*S, D]
        ctx = g.op("Reshape", [ctx, g.i64(0, NH, -1, D)], "ctx_heads")  # [B, NH, S, D]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], "ctx_t", perm=[0, 2, 1, 3]), g.i64(0, 0, NH * D)], "ctx_r")
        x = g.op("Add", [x, g.op("MatMul", [ctx, wo], "o_proj")], "resid_attn")
        h = _rms_norm(g, x, g.init(f"{p}.mlp_norm", norm_weight(seed_, b, f"{p}.mlp_norm", H, tier.dtype)))
        if tier.experts > 1:
            y = _moe(g, tier, top_k, h, b, seed_)
        else:
            y = _mlp(g, h, g.init(f"{p}.mlp.gate", weight(seed_, b, f"{p}.mlp.gate", (H, tier.intermediate), tier.dtype)),
                     g.init(f"{p}.mlp.up", weight(seed_, b, f"{p}.mlp.up", (H, tier.intermediate), tier.dtype)),
                     g.init(f"{p}.mlp.down", weight(seed_, b, f"{p}.mlp.down", (tier.intermediate, H), tier.dtype)))
        x = g.op("Add", [x, y], "resid_mlp")
    # Final norm + LM head use block index -1 for their seeds (independent of num_active_blocks).
    h = _rms_norm(g, x, g.init("final_norm", norm_weight(seed_, -1, "final_norm", H, tier.dtype)))
    g.op("MatMul", [h, g.init("lm_head", weight(seed_, -1, "lm_head", (H, tier.vocab), tier.dtype))],
         outputs=["logits"])

    graph = helper.make_graph(g.nodes, f"trt_latency_{tier.name}", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="trt-latency")
    model.ir_version = IR_VERSION
    meta: dict[str, object] = {f: getattr(tier, f) for f in _META_INT_FIELDS if hasattr(tier, f)}
    meta.update(name=tier.name, dtype=tier.dtype, top_k=top_k, num_active_blocks=num_active_blocks, seed=seed,
                format_version=1)
    helper.set_model_props(model, {METADATA_PREFIX + k: str(v) for k, v in meta.items()})
    return model, g.weight_bytes


def export_decoder(tier: TierSpec, top_k: int, num_active_blocks: int, path: str | os.PathLike[str], seed: int = 0,
                   *, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write the decoder for (tier, top_k, num_active_blocks) to ``path`` and check it; returns the path.

    Weights above ``external_data_threshold`` bytes go to ``<path>.data`` next to the model
    (protobuf cannot hold 2 GB), and the checker then runs on the file path.
    """
    import onnx

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, weight_bytes = build_model(tier, top_k, num_active_blocks, seed)
    tmp = out.with_name(out.name + ".tmp")
    data_name = out.name + ".data"
    if weight_bytes > external_data_threshold:
        # Write the side file under its final name (the model references it by location).
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(tmp))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(tmp))
        stale = out.with_name(data_name)
        if stale.exists():
            stale.unlink()
    os.replace(tmp, out)  # atomic: a killed export never leaves a half-written model.onnx
    return out


def model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Tier dims + config key stored in the model's metadata_props (ints parsed); {} for a foreign model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(METADATA_PREFIX):
            continue
        key = prop.key[len(METADATA_PREFIX):]
        out[key] = int(prop.value) if key in _META_INT_FIELDS or key == "format_version" else prop.value
    return out


def tier_from_metadata(meta: dict[str, Any]) -> tuple[TierSpec, ConfigKey]:
    """Rebuild the TierSpec and ConfigKey a model was exported with."""
    fields = {f: meta[f] for f in TierSpec.__dataclass_fields__}
    return TierSpec(**fields), ConfigKey(meta["tier_idx"], meta["top_k"], meta["num_active_blocks"])
