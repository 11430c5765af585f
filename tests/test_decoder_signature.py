"""Decoder signatures on real graphs: roles, dims and their sources, refusals in one line, and KV correctness
of what the ONNX Runtime runner binds (concat and shared) against a full recompute on a real session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import decoder_graphs as graphs  # noqa: E402

from trt_latency.cli import main  # noqa: E402
from trt_latency.engines.ort.runner import OrtRunner  # noqa: E402
from trt_latency.engines.signature import SignatureError, read_signature, signature_from_tensors  # noqa: E402
from trt_latency.errors import InputError  # noqa: E402

# name -> build() keywords: the I/O shapes of the exporters in the wild.
VARIANTS = {
    "genai_gqa": dict(attention="gqa", positions=False, static_dims=False),  # genai builder: GQA, no positions
    "optimum": dict(hf_config=True),  # input_ids, attention_mask, position_ids, past_key_values.{i}.key|value
    "past_key": dict(naming="past_key"),  # past_key.{i} / past_value.{i} -> present_key.{i} / present_value.{i}
    "fused": dict(naming="fused"),  # past.{i} [2, B, H, L, D] -> present.{i}
    "embeds": dict(token="embeds", mask=False),  # inputs_embeds + position_ids (VLM decoders, ours)
    "fp16": dict(dtype="float16"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("graphs")
    return {name: graphs.build(d / name / "model.onnx", **kw) for name, kw in VARIANTS.items()}


def test_signature_roles_and_sources(models: dict[str, Path]) -> None:
    g = read_signature(models["genai_gqa"])
    assert (g.token_input, g.attention_mask, g.position_ids, g.kv_layout, g.blocks) == (
        "input_ids", "attention_mask", None, "separate", 2)
    assert (g.kv_heads, g.head_dim, g.vocab, g.max_past_len) == (graphs.KV, graphs.D, graphs.VOCAB, graphs.CTX - 1)
    assert g.sources["head_dim"] == "genai_config.json head_size"  # symbolic kv_cache_dim in the graph
    assert g.sources["max_past_len"] == "genai_config.json context_length - 1"
    assert g.resolve_kv_mode("auto") == "shared" and g.attention_ops == ("GroupQueryAttention",)

    o = read_signature(models["optimum"])
    assert (o.token_input, o.position_ids, o.kv_heads, o.head_dim) == ("input_ids", "position_ids", graphs.NH, graphs.D)
    assert o.sources["kv_heads"] == "shape of past_key_values.0.key" and o.max_past_len == graphs.CTX - 1
    assert o.sources["max_past_len"] == "config.json max_position_embeddings - 1"
    assert o.resolve_kv_mode("auto") == "concat"
    with pytest.raises(SignatureError, match="GroupQueryAttention"):
        o.resolve_kv_mode("shared")  # Concat attention cannot write into a shared buffer

    p = read_signature(models["past_key"])
    assert p.kv[1].past_value == "past_value.1" and p.kv[1].present_value == "present_value.1"
    f = read_signature(models["fused"])
    assert f.kv_layout == "fused" and f.kv[0].past_key == "past.0" and f.kv[0].past_value is None
    e = read_signature(models["embeds"])
    assert (e.token_input, e.hidden, e.attention_mask) == ("inputs_embeds", graphs.H, None)
    assert read_signature(models["fp16"]).kv_dtype == "float16"


def test_dims_from_graph_config_json_and_flags(tmp_path: Path) -> None:
    # genai-like graph without genai_config.json: head size from the GQA query width / num_heads.
    m = graphs.build(tmp_path / "bare" / "model.onnx", attention="gqa", positions=False, static_dims=False,
                     genai_config=False)
    sig = read_signature(m)
    assert (sig.kv_heads, sig.head_dim) == (graphs.KV, graphs.D)
    assert sig.sources["kv_heads"] == "graph GroupQueryAttention kv_num_heads"
    assert sig.sources["head_dim"].startswith("graph GroupQueryAttention query width")
    assert sig.resolve_kv_mode("auto") == "concat"  # no genai_config.json: nothing says share the buffer
    # A config.json (HF) beside a model with symbolic KV dims.
    m2 = graphs.build(tmp_path / "hf" / "model.onnx", static_dims=False)
    with pytest.raises(SignatureError) as info:
        read_signature(m2)
    line = str(info.value)
    assert str(m2) in line and "field 'kv_heads'" in line and "--dims kv_heads=N" in line and "input_ids" in line
    (m2.parent / "config.json").write_text(json.dumps({"num_attention_heads": graphs.NH, "hidden_size": 64,
                                                       "max_position_embeddings": 96}))
    sig2 = read_signature(m2)
    assert (sig2.kv_heads, sig2.head_dim, sig2.max_past_len) == (graphs.NH, 16, 95)
    assert sig2.sources["head_dim"] == "config.json hidden_size / num_attention_heads"
    assert read_signature(m2, dims="head_dim=16,kv_heads=4").sources["kv_heads"] == "--dims"


def test_io_overrides_odd_names(tmp_path: Path) -> None:
    import onnx

    m = graphs.build(tmp_path / "odd" / "model.onnx")
    model = onnx.load(str(m))
    renames = {"input_ids": "tokens", "past_key_values.1.value": "cache_v1"}
    for node in model.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    for vi in model.graph.input:
        vi.name = renames.get(vi.name, vi.name)
    odd = tmp_path / "odd" / "renamed.onnx"
    onnx.save(model, str(odd))
    with pytest.raises(SignatureError, match="fix: --io NAME=input_ids"):
        read_signature(odd)
    sig = read_signature(odd, io="tokens=input_ids,cache_v1=past_value.1")
    assert sig.token_name == "tokens" and sig.kv[1].past_value == "cache_v1"
    assert sig.sources["io:cache_v1"] == "--io cache_v1=past_value.1"
    with pytest.raises(SignatureError, match="field '--io'"):
        read_signature(odd, io="tokens=words")
    # The same function takes a TensorRT engine's I/O tensor list ((name, shape, dtype), -1 = dynamic).
    trt = signature_from_tensors(
        "engine.plan", [("inputs_embeds", (-1, -1, 64), "DataType.HALF"), ("position_ids", (-1, -1), "DataType.INT64"),
                        ("past_key_values.0.key", (-1, 2, -1, 32), "DataType.HALF"),
                        ("past_key_values.0.value", (-1, 2, -1, 32), "DataType.HALF")],
        [("logits", (-1, -1, 128), "DataType.HALF"), ("present.0.key", (-1, 2, -1, 32), "DataType.HALF"),
         ("present.0.value", (-1, 2, -1, 32), "DataType.HALF")], model_dir=tmp_path)
    assert (trt.token_input, trt.hidden, trt.kv_heads, trt.head_dim, trt.kv_dtype) == (
        "inputs_embeds", 64, 2, 32, "float16")


@pytest.mark.parametrize("case, kw, role", [
    ("encoder-decoder", dict(extra_inputs=("encoder_hidden_states",)), "encoder_hidden_states"),
    ("no-kv", dict(kv_inputs=False), "past_key_values"),
    ("paged", dict(attention="gqa", positions=False, extra_inputs=("block_table",)), "block_table"),
])
def test_untimeable_models_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                            kw: dict, role: str) -> None:
    m = graphs.build(tmp_path / case / "model.onnx", **kw)
    for verb in (["inspect", str(m)], ["calibrate", "--onnx", str(m), "--out", str(tmp_path / "o"), "--no-progress"]):
        assert main(verb) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        line = err[0]
        assert str(m) in line and f"field '{role}'" in line and "inputs found: input_ids" in line and "fix: " in line


@pytest.mark.parametrize("name, mode", [("genai_gqa", "shared"), ("genai_gqa", "concat"), ("optimum", "concat"),
                                        ("past_key", "concat"), ("fused", "concat"), ("embeds", "concat"),
                                        ("fp16", "concat")])
def test_bound_kv_gives_the_full_recompute_logits(models: dict[str, Path], name: str, mode: str) -> None:
    """Prefill + N decode steps with the KV the runner binds: last-token logits equal one full recompute over
    prompt + generated tokens (rel err < 1e-3; fp16: < 2e-2, its own rounding over 2 layers)."""
    path, kw = models[name], VARIANTS[name]
    runner = OrtRunner(path, intra_op_threads=1, kv_mode=mode, max_past_len=64, max_new_tokens=16, seed=3)
    assert runner.kv_mode == mode
    prompt = runner.random_prompt(7, np.random.default_rng(5))
    res = runner.generate(prompt, 6)
    if runner.token_input == "input_ids":
        full = np.concatenate([prompt[0], np.asarray(res.tokens[:-1])])[None]
    else:
        full = np.concatenate([prompt[0], runner._embed_table[res.tokens[:-1]]])[None]
    ref = graphs.full_logits(path, full, kw.get("attention", "concat"), kw.get("naming", "pkv"))
    assert ref[0, 6:].argmax(-1).tolist() == res.tokens
    got = runner.last_logits(1).astype(np.float64)
    want = ref[0, -1].astype(np.float64)
    tol = 2e-2 if name == "fp16" else 1e-3
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    assert (runner.time_step(40, 1, 2) > 0).all() and (runner.time_step(0, 16, 1) > 0).all()


def test_shared_buffer_steps_equal_the_concat_path(models: dict[str, Path]) -> None:
    path = models["genai_gqa"]
    out = {}
    for mode in ("shared", "concat"):
        runner = OrtRunner(path, intra_op_threads=1, kv_mode=mode, max_past_len=64, max_new_tokens=16, seed=1)
        res = runner.generate(np.arange(1, 10, dtype=np.int64)[None], 12)
        out[mode] = (res.tokens, runner.last_logits(1),
                     runner.present(1, "value", 9 + 11, runner._last_past_set))
    assert out["shared"][0] == out["concat"][0]
    np.testing.assert_allclose(out["shared"][1], out["concat"][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["shared"][2], out["concat"][2], rtol=1e-5, atol=1e-6)


def test_inspect_json(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(models["genai_gqa"]), "--json", "--past-len", "5"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {k: d[k] for k in ("token_input", "attention_mask", "position_ids", "kv_mode", "blocks", "kv_heads",
                              "head_dim", "kv_dtype", "max_past_len")} == {
        "token_input": "input_ids", "attention_mask": "attention_mask", "position_ids": None, "kv_mode": "shared",
        "blocks": 2, "kv_heads": graphs.KV, "head_dim": graphs.D, "kv_dtype": "float32", "max_past_len": graphs.CTX - 1}
    assert d["sources"]["kv_heads"] == "genai_config.json num_key_value_heads"
    mask = next(b for b in d["step"]["bindings"] if b["role"] == "attention_mask")
    assert mask["shape"] == [1, 6]
    past = next(b for b in d["step"]["bindings"] if b["name"] == "past_key_values.0.key")
    assert past["shape"][2] >= graphs.CTX  # shared: the whole preallocated buffer
    assert main(["inspect", str(models["optimum"]), "--kv-mode", "concat", "--past-len", "5"]) == 0
    text = capsys.readouterr().out
    assert "past_key_values.0.key        [1, 4, 5, 16]" in text and "present.0.key                [1, 4, 6, 16]" in text


def test_max_past_len_never_exceeds_the_model(models: dict[str, Path], tmp_path: Path) -> None:
    runner = OrtRunner(models["genai_gqa"], intra_op_threads=1, max_past_len=4096, max_new_tokens=512)
    assert (runner.max_past_len, runner.max_new_tokens) == (graphs.CTX - 1, graphs.CTX)
    copy = tmp_path / "m" / "model.onnx"
    copy.parent.mkdir()
    shutil.copy(models["genai_gqa"], copy)
    shutil.copy(models["genai_gqa"].parent / "genai_config.json", copy.parent)
    assert OrtRunner(copy, max_past_len=50).max_past_len == 50


@pytest.mark.slow
def test_calibrate_library_function_on_a_token_id_model(models: dict[str, Path], tmp_path: Path) -> None:
    """trt_latency.pipeline.calibrate (what the CLI verb calls): sweep, fit, replay through a genai-like model."""
    from helpers.plans import CALIBRATE_PLAN as TINY_PLAN

    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.requests import read_requests
    from trt_latency.estimator.samples import read_samples
    from trt_latency.pipeline import CalibrateOptions, calibrate

    plan = tmp_path / "plan.yaml"
    plan.write_text(TINY_PLAN)
    lines: list[str] = []
    result = calibrate(CalibrateOptions(config=str(plan), quick=True, onnx=str(models["genai_gqa"]),
                                        out=str(tmp_path / "o"), backend="ort-cpu", no_progress=True, no_plot=True),
                       say=lines.append)
    assert result.kv_mode == "shared" and result.plot is None and result.requests is not None
    samples = read_samples(result.samples)
    assert set(samples.kv_mode) == {"shared"}
    # The model's context (128, genai_config.json) caps the plan's max_past_len 256.
    assert int(samples.past_len.max()) == graphs.CTX - 1
    cal = load_calibration(result.calibration)
    assert cal.provenance["kv_mode"] == "shared"
    assert cal.provenance["signatures"]["t0.k1.b2"]["token_input"] == "input_ids"
    assert len(read_requests(result.requests)) == 4
    text = "\n".join(lines)
    assert "kv_mode      shared (token input input_ids)" in text and "-uniform), outputs of" in text


def test_backend_registry_and_prebuilt_session(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """One registry names the backends (CLI choices come from it); a runner takes an already-built session."""
    from trt_latency.engines import backends
    from trt_latency.engines.ort.loader import create_session

    assert backends.BACKENDS == ("auto", *backends.REGISTRY)
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS)
    backends.register_backend("ort-cpu-1t", "trt_latency.engines.ort.runner:open_cpu")
    assert "ort-cpu-1t" in backends.BACKENDS
    with backends.open_runner(models["optimum"], "ort-cpu-1t", threads=1, max_past_len=32) as runner:
        assert runner.backend == "ort-cpu" and runner.max_past_len == 32
    with pytest.raises(InputError, match="field .backend."):
        backends.resolve_backend("openvino")
    session, _ = create_session(models["genai_gqa"], "cpu", intra_op_threads=1)
    runner = OrtRunner(models["genai_gqa"], session=session, max_past_len=16, max_new_tokens=4)
    assert runner.session is session and runner.generate(np.array([[1, 2, 3]]), 3).output_tokens == 3
