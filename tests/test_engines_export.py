"""Exported decoder: checker, shapes, KV bindings, MoE vs a numpy reference, blocks executed, external data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from trt_latency.engines.config import TierSpec, load_plan  # noqa: E402
from trt_latency.engines.export import export_decoder, model_metadata, tier_from_metadata  # noqa: E402

DENSE = TierSpec(tier_idx=0, name="t-dense", hidden=32, layers=3, heads=4, kv_heads=2, head_dim=8,
                 intermediate=48, vocab=64, experts=1, dtype="float32", max_past_len=64, max_prefill_len=32)
MOE = replace(DENSE, tier_idx=1, name="t-moe", experts=4)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(tier: TierSpec, blocks: int, embeds: np.ndarray, start: int,
           past: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    s = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "position_ids": np.arange(start, start + s, dtype=np.int64)[None]}
    dt = embeds.dtype
    for i in range(blocks):
        for j, kv in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{kv}"] = (past[2 * i + j] if past is not None else
                                                  np.zeros((1, tier.kv_heads, 0, tier.head_dim), dt))
    return feeds


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "dense": export_decoder(DENSE, 1, 3, d / "dense.onnx"),
        "dense2": export_decoder(DENSE, 1, 2, d / "dense2.onnx"),
        "moe": export_decoder(MOE, 2, 2, d / "moe.onnx", seed=3),
        "moe1": export_decoder(MOE, 1, 2, d / "moe1.onnx", seed=3),
    }


def test_checker_ir_and_metadata(models: dict[str, Path]) -> None:
    for path in models.values():
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert model.ir_version <= 10
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        assert not any(n.op_type == "Attention" for n in model.graph.node)
    meta = model_metadata(models["moe"])
    tier, key = tier_from_metadata(meta)
    assert tier == MOE and tuple(key) == (1, 2, 2) and meta["seed"] == 3


def test_graph_holds_exactly_the_active_blocks(models: dict[str, Path]) -> None:
    for name, blocks in (("dense", 3), ("dense2", 2)):
        model = onnx.load(str(models[name]))
        inits = {i.name for i in model.graph.initializer}
        assert {f"blocks.{b}.q" for b in range(blocks)} <= inits
        assert f"blocks.{blocks}.q" not in inits
        assert sum(n.op_type == "Softmax" for n in model.graph.node) == blocks
        assert [o.name for o in model.graph.output][1:] == [f"present.{b}.{kv}" for b in range(blocks)
                                                            for kv in ("key", "value")]


@pytest.mark.parametrize("name,tier,blocks", [("dense", DENSE, 3), ("moe", MOE, 2)])
def test_kv_cache_matches_full_recompute(models: dict[str, Path], name: str, tier: TierSpec, blocks: int) -> None:
    sess = _session(models[name])
    rng = np.random.default_rng(0)
    n = 11
    x = rng.standard_normal((1, n + 3, tier.hidden), dtype=np.float32)
    full = sess.run(None, _feeds(tier, blocks, x, 0))
    # Prefill n tokens, then decode token n+1 from the returned present KV.
    pre = sess.run(None, _feeds(tier, blocks, x[:, :n], 0))
    assert all(p.shape == (1, tier.kv_heads, n, tier.head_dim) for p in pre[1:])
    step = sess.run(None, _feeds(tier, blocks, x[:, n:n + 1], n, pre[1:]))
    assert all(p.shape == (1, tier.kv_heads, n + 1, tier.head_dim) for p in step[1:])
    ref = full[0][0, n]
    assert np.max(np.abs(step[0][0, 0] - ref)) / np.max(np.abs(ref)) < 1e-3
    # Prefill with past > 0 (chunked prefill): 2 more tokens on top of n+1, causal mask over the chunk.
    chunk = sess.run(None, _feeds(tier, blocks, x[:, n + 1:n + 3], n + 1, step[1:]))
    assert all(p.shape == (1, tier.kv_heads, n + 3, tier.head_dim) for p in chunk[1:])
    for s in range(2):
        ref = full[0][0, n + 1 + s]
        assert np.max(np.abs(chunk[0][0, s] - ref)) / np.max(np.abs(ref)) < 1e-3
    for got, want in zip(chunk[1:], full[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---- numpy reference of the same weights ---------------------------------------------------------

def _reference(path: Path, x: np.ndarray, top_k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prefill logits and the expert ids each token used (per block), from the model's own initializers."""
    from onnx import numpy_helper

    meta = model_metadata(path)
    tier, key = tier_from_metadata(meta)
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    D, NH, KV = tier.head_dim, tier.heads, tier.kv_heads
    S, half = x.shape[1], tier.head_dim // 2

    def rms(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-5) * g

    def mlp(v: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
        a = v @ gate
        return (a / (1 + np.exp(-a)) * (v @ up)) @ down

    inv = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float32) / half)
    ang = np.arange(S, dtype=np.float32)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t: np.ndarray) -> np.ndarray:  # [n, S, D]
        rot = np.concatenate([-t[..., half:], t[..., :half]], -1)
        return t * cos + rot * sin

    h = x[0].astype(np.float64)
    chosen: list[np.ndarray] = []
    for b in range(key.num_active_blocks):
        p = f"blocks.{b}"
        a = rms(h, w[f"{p}.attn_norm"])
        q = rope((a @ w[f"{p}.q"]).reshape(S, NH, D).transpose(1, 0, 2))
        k = rope((a @ w[f"{p}.k"]).reshape(S, KV, D).transpose(1, 0, 2))
        v = (a @ w[f"{p}.v"]).reshape(S, KV, D).transpose(1, 0, 2)
        k, v = np.repeat(k, NH // KV, 0), np.repeat(v, NH // KV, 0)  # HF repeat_kv
        sc = q @ k.transpose(0, 2, 1) / np.sqrt(D) + np.triu(np.full((S, S), -1e9), 1)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        h = h + (pr @ v).transpose(1, 0, 2).reshape(S, NH * D) @ w[f"{p}.o"]
        m = rms(h, w[f"{p}.mlp_norm"])
        if tier.experts == 1:
            h = h + mlp(m, w[f"{p}.mlp.gate"], w[f"{p}.mlp.up"], w[f"{p}.mlp.down"])
            continue
        logits = m @ w[f"{p}.moe.router"]
        top = np.argsort(-logits, axis=-1)[:, :top_k]
        chosen.append(top)
        y = np.zeros_like(m)
        for t in range(S):
            sel = logits[t, top[t]]
            gate = np.exp(sel - sel.max())
            gate /= gate.sum()
            for e, g in zip(top[t], gate, strict=True):
                pe = f"{p}.moe.experts.{e}"
                y[t] += g * mlp(m[t], w[f"{pe}.gate"], w[f"{pe}.up"], w[f"{pe}.down"])
        h = h + y
    return rms(h, w["final_norm"]) @ w["lm_head"], chosen


@pytest.mark.parametrize("name,top_k", [("moe", 2), ("moe1", 1), ("dense", 1)])
def test_output_equals_numpy_reference(models: dict[str, Path], name: str, top_k: int) -> None:
    path = models[name]
    tier, key = tier_from_metadata(model_metadata(path))
    x = np.random.default_rng(5).standard_normal((1, 9, tier.hidden), dtype=np.float32)
    got = _session(path).run(["logits"], _feeds(tier, key.num_active_blocks, x, 0))[0][0]
    want, chosen = _reference(path, x, top_k)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    for top in chosen:  # exactly top_k distinct experts per token, and they differ across tokens
        assert top.shape == (9, top_k)
        assert all(len(set(row)) == top_k for row in top.tolist())
    if chosen:
        assert len({e for top in chosen for e in top.ravel().tolist()}) > top_k


def test_moe_top_k_changes_the_output(models: dict[str, Path]) -> None:
    x = np.random.default_rng(1).standard_normal((1, 4, MOE.hidden), dtype=np.float32)
    a = _session(models["moe"]).run(["logits"], _feeds(MOE, 2, x, 0))[0]
    b = _session(models["moe1"]).run(["logits"], _feeds(MOE, 2, x, 0))[0]
    assert np.max(np.abs(a - b)) > 1e-3


def test_fewer_blocks_equal_prefix_weights(models: dict[str, Path]) -> None:
    from onnx import numpy_helper

    w3 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(models["dense"])).graph.initializer}
    w2 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(models["dense2"])).graph.initializer}
    for name in ("blocks.0.q", "blocks.1.mlp.down", "lm_head"):
        np.testing.assert_array_equal(w3[name], w2[name])


def test_float16_and_external_data(tmp_path: Path) -> None:
    tier = replace(DENSE, dtype="float16")
    inline = export_decoder(tier, 1, 2, tmp_path / "inline.onnx")
    external = export_decoder(tier, 1, 2, tmp_path / "ext.onnx", external_data_threshold=0)
    assert (tmp_path / "ext.onnx.data").is_file() and not (tmp_path / "inline.onnx.data").exists()
    assert external.stat().st_size < inline.stat().st_size / 2
    onnx.checker.check_model(str(external))
    x = np.random.default_rng(2).standard_normal((1, 5, tier.hidden)).astype(np.float16)
    a = _session(inline).run(None, _feeds(tier, 2, x, 0))
    b = _session(external).run(None, _feeds(tier, 2, x, 0))
    assert a[0].dtype == np.float16 and np.isfinite(a[0]).all()
    np.testing.assert_array_equal(a[0], b[0])


def test_every_default_config_runs_prefill_and_decode(tmp_path: Path) -> None:
    plan = load_plan()
    for key in plan.configs:
        tier = plan.tier(key.tier_idx)
        path = export_decoder(tier, key.top_k, key.num_active_blocks, tmp_path / f"{tuple(key)}.onnx")
        onnx.checker.check_model(str(path))
        sess = _session(path)
        x = np.random.default_rng(0).standard_normal((1, 17, tier.hidden), dtype=np.float32)
        pre = sess.run(None, _feeds(tier, key.num_active_blocks, x[:, :16], 0))
        step = sess.run(None, _feeds(tier, key.num_active_blocks, x[:, 16:], 16, pre[1:]))
        assert pre[0].shape == (1, 16, tier.vocab) and step[0].shape == (1, 1, tier.vocab)
        assert step[1].shape == (1, tier.kv_heads, 17, tier.head_dim)
        assert np.isfinite(step[0]).all()
