"""TensorRT loader pieces that run without TensorRT: profile planning, cache keys, availability."""

from __future__ import annotations

import ast
import hashlib
import importlib
from pathlib import Path

import pytest

from trt_latency.engines.config import TierSpec
from trt_latency.engines.export import export_decoder
from trt_latency.engines.signature import DecoderSignature, SignatureError, read_signature
from trt_latency.engines.trt import loader
from trt_latency.errors import BackendUnavailable, InputError

TINY = TierSpec(tier_idx=0, name="tiny", hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
                intermediate=128, vocab=256, experts=1, dtype="float32", max_past_len=64, max_prefill_len=16)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(TINY, 1, 2, tmp_path_factory.mktemp("trt") / "model.onnx")


def _layouts(path: Path) -> dict[str, tuple[loader.Axis, ...]]:
    return loader.input_layouts(read_signature(path), loader.onnx_input_shapes(path))


def _sig(shapes: dict[str, tuple[int, ...]]) -> DecoderSignature:
    """The signature of an engine with these inputs (float32, ours: logits and present.* outputs)."""
    ins = [(n, list(s), "DataType.FLOAT" if n != "position_ids" else "DataType.INT64") for n, s in shapes.items()]
    outs = [("logits", [-1, -1, 16], "DataType.FLOAT")] + [
        (n.replace("past_key_values", "present"), list(s), "DataType.FLOAT") for n, s in shapes.items()
        if n.startswith("past_key_values")]
    return loader.engine_signature("x.engine", ins, outs, dims="context_length=4097")


def test_profile_from_exported_model(tiny_onnx: Path) -> None:
    shapes = loader.onnx_input_shapes(tiny_onnx)
    assert shapes["inputs_embeds"] == (-1, -1, 64)
    assert shapes["past_key_values.1.value"] == (-1, 1, -1, 32)
    layouts = _layouts(tiny_onnx)
    assert layouts["inputs_embeds"] == ("batch", "seq", 64) and layouts["position_ids"] == ("batch", "seq")
    assert layouts["past_key_values.0.key"] == ("batch", 1, "past", 32)
    profile = loader.profile_shapes(layouts, max_past_len=4096, max_prefill_len=1024)
    assert set(profile) == {"inputs_embeds", "position_ids"} | {
        f"past_key_values.{b}.{k}" for b in (0, 1) for k in ("key", "value")}
    embeds = profile["inputs_embeds"]
    assert embeds.min == (1, 1, 64) and embeds.opt == (1, 1, 64) and embeds.max == (1, 1024, 64)
    assert profile["position_ids"] == ((1, 1), (1, 1), (1, 1024))
    past = profile["past_key_values.0.key"]
    # Prefill runs with an empty past; opt defaults to the middle of the decode range.
    assert past.min == (1, 1, 0, 32) and past.opt == (1, 1, 2048, 32) and past.max == (1, 1, 4096, 32)


def test_decode_and_prefill_profiles(tiny_onnx: Path) -> None:
    layouts = _layouts(tiny_onnx)
    profiles = loader.decoder_profiles(layouts, max_past_len=4096, max_prefill_len=1024)
    assert tuple(profiles) == loader.PROFILES == ("decode", "prefill")  # index order of the engine's profiles
    decode, prefill = profiles["decode"], profiles["prefill"]
    # Decode: S fixed at 1, tuned in the middle of the KV range.
    assert decode["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (1, 1, 64))
    assert decode["past_key_values.1.key"] == ((1, 1, 0, 32), (1, 1, 2048, 32), (1, 1, 4096, 32))
    # Prefill: tuned for a prompt (S = half the max) on an almost empty cache, not for S = 1.
    assert prefill["inputs_embeds"] == ((1, 1, 64), (1, 512, 64), (1, 1024, 64))
    assert prefill["position_ids"] == ((1, 1), (1, 512), (1, 1024))
    assert prefill["past_key_values.0.value"] == ((1, 1, 0, 32), (1, 1, 1, 32), (1, 1, 4096, 32))
    tuned = loader.decoder_profiles(layouts, max_past_len=100, max_prefill_len=10, opt_prefill_len=7,
                                    opt_past_len=30, min_past_len=2)
    assert tuned["prefill"]["inputs_embeds"].opt == (1, 7, 64)
    assert tuned["prefill"]["past_key_values.0.key"].opt == (1, 1, 2, 32)  # never below min_past_len
    assert tuned["decode"]["past_key_values.0.key"].opt == (1, 1, 30, 32)
    with pytest.raises(InputError, match="opt_prefill_len"):
        loader.decoder_profiles(layouts, max_past_len=100, max_prefill_len=10, opt_prefill_len=11)
    # Our metadata's tier dims are the profile's default limits.
    assert loader.profile_limits(read_signature(tiny_onnx), None, None) == (64, 64)


def test_choose_profile_per_step() -> None:
    decode = loader.ProfileRange(seq=(1, 1, 1), past=(0, 2048, 4096))
    prefill = loader.ProfileRange(seq=(1, 512, 1024), past=(0, 1, 4096))
    both = [decode, prefill]
    assert loader.choose_profile(both, 100, 1) == 0  # decode step
    assert loader.choose_profile(both, 0, 1) == 0  # a one-token prompt is a decode-shaped step
    assert loader.choose_profile(both, 0, 300) == 1  # prompt
    assert loader.choose_profile(both, 40, 7) == 1  # chunked prefill
    assert loader.choose_profile(both, 4097, 1) == -1 and loader.choose_profile(both, 0, 1025) == -1
    assert loader.choose_profile([prefill], 10, 1) == 0  # a single-profile engine (trtexec) runs everything
    # Order does not matter: the closest opt S wins among the profiles that contain the step.
    assert loader.choose_profile([prefill, decode], 100, 1) == 1


def test_profile_options_and_fixed_batch() -> None:
    shapes = {"inputs_embeds": (1, -1, 8), "position_ids": (1, -1),
              "past_key_values.0.key": (1, 2, -1, 4), "past_key_values.0.value": (1, 2, -1, 4)}
    layouts = loader.input_layouts(_sig(shapes), shapes)
    profile = loader.profile_shapes(layouts, max_past_len=100, max_prefill_len=10, opt_past_len=7,
                                    opt_new_tokens=3, batch=4)
    assert profile["inputs_embeds"] == ((1, 1, 8), (1, 3, 8), (1, 10, 8))  # a fixed batch axis stays fixed
    assert profile["past_key_values.0.value"].opt == (1, 2, 7, 4)
    fallback = loader.profile_shapes(layouts, max_past_len=100, max_prefill_len=10, min_past_len=1)
    assert fallback["past_key_values.0.key"].min == (1, 2, 1, 4)  # for a TensorRT without empty tensors
    dyn_batch = dict(shapes, inputs_embeds=(-1, -1, 8))
    assert loader.profile_shapes(loader.input_layouts(_sig(dyn_batch), dyn_batch), max_past_len=100,
                                 max_prefill_len=10, batch=4)["inputs_embeds"].max == (4, 10, 8)


GOOD = {"inputs_embeds": (1, -1, 8), "position_ids": (1, -1), "past_key_values.0.key": (1, 2, -1, 4),
        "past_key_values.0.value": (1, 2, -1, 4)}


@pytest.mark.parametrize(
    ("shapes", "kwargs", "field"),
    [
        (GOOD, {"opt_past_len": 101}, "opt_past_len"),
        (GOOD, {"min_past_len": 5, "opt_past_len": 2}, "opt_past_len"),
        (GOOD, {"max_prefill_len": 0}, "max_prefill_len"),
    ],
)
def test_profile_rejects_bad_inputs(shapes: dict[str, tuple[int, ...]], kwargs: dict[str, int], field: str) -> None:
    layouts = loader.input_layouts(_sig(shapes), shapes)
    with pytest.raises(InputError) as info:
        loader.profile_shapes(layouts, **{"max_past_len": 100, "max_prefill_len": 10, **kwargs})
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("engine_shapes", "field"),
    [
        ({"position_ids": (1, -1, -1)}, "position_ids"),  # rank 3 with a dynamic section axis: not M-RoPE
        ({"inputs_embeds": (1, -1, 9)}, "inputs_embeds"),  # a static axis against the signature's hidden
        ({"extra": (1, -1)}, "extra"),  # an input the signature has no role for
    ],
)
def test_layouts_reject_what_the_signature_does_not_bind(engine_shapes: dict[str, tuple[int, ...]], field: str) -> None:
    with pytest.raises(SignatureError) as info:
        loader.input_layouts(_sig(GOOD), {**GOOD, **engine_shapes})
    assert field in str(info.value)
    missing = {k: v for k, v in GOOD.items() if k != "position_ids"}
    with pytest.raises(SignatureError, match="position_ids"):
        loader.input_layouts(_sig(GOOD), missing)


def test_file_sha256_matches_hashlib(tiny_onnx: Path) -> None:
    assert loader.file_sha256(tiny_onnx) == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()


def test_model_digest_covers_every_external_weight_file(tmp_path: Path) -> None:
    model = export_decoder(TINY, 1, 2, tmp_path / "model.onnx", external_data_threshold=0)
    data = tmp_path / "model.onnx.data"
    assert loader.model_files(model) == [model, data]
    before = loader.model_sha256(model)
    model_bytes = model.read_bytes()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # new weights, same model.onnx
    data.write_bytes(bytes(raw))
    assert model.read_bytes() == model_bytes
    after = loader.model_sha256(model)
    assert after != before
    key = dict(tensorrt_version="10.13.0.35", device="NVIDIA H100", max_past_len=64, max_prefill_len=16)
    assert loader.engine_key(before, **key).filename() != loader.engine_key(after, **key).filename()
    data.unlink()
    with pytest.raises(InputError, match="model.onnx.data"):
        loader.model_files(model)


def test_inline_model_digest_is_its_file(tiny_onnx: Path) -> None:
    assert loader.model_files(tiny_onnx) == [tiny_onnx]
    assert loader.model_sha256(tiny_onnx) != loader.model_sha256(
        export_decoder(TINY, 1, 1, tiny_onnx.with_name("other.onnx")))


def test_timing_cache_path_is_per_tensorrt_and_device(tmp_path: Path) -> None:
    path = loader.timing_cache_path(tmp_path, "10.13.0.35", "NVIDIA H100 80GB HBM3")
    assert path.parent == tmp_path and path.name == "timing-trt10.13.0.35-nvidia-h100-80gb-hbm3.cache"
    others = {loader.timing_cache_path(tmp_path, "11.1.0.5", "NVIDIA H100 80GB HBM3"),
              loader.timing_cache_path(tmp_path, "10.13.0.35", "NVIDIA H200")}
    assert path not in others and len(others) == 2
    key = loader.engine_key("ab" * 32, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=64, max_prefill_len=16)
    assert path.name != key.filename()  # one timing cache per (TensorRT, GPU), not per engine


def test_engine_key_changes_with_every_input(tiny_onnx: Path) -> None:
    sha = loader.model_sha256(tiny_onnx)
    base = loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024)
    again = loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096,
                              max_prefill_len=1024, opt_past_len=2048)
    assert base == again and base.filename() == again.filename()  # opt default = max // 2
    assert base.opt_prefill_len == 512 and base.workspace_bytes is None and base.profiles == "decode+prefill"
    variants = [
        loader.engine_key("0" * 64, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024),
        loader.engine_key(sha, "11.0.0.1", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H200", max_past_len=4096, max_prefill_len=1024),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=8192, max_prefill_len=1024),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=512),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024,
                          opt_past_len=100),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024,
                          min_past_len=1),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024,
                          opt_prefill_len=100),
        loader.engine_key(sha, "10.13.0.35", "NVIDIA H100 80GB HBM3", max_past_len=4096, max_prefill_len=1024,
                          workspace_bytes=1 << 30),
    ]
    names = {v.filename() for v in variants}
    assert len(names) == len(variants) and base.filename() not in names
    name = base.filename()
    assert name.startswith(sha[:12]) and "trt10.13.0.35" in name and "nvidia-h100-80gb-hbm3" in name
    assert name.endswith(".engine") and "/" not in name


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRT_LATENCY_CACHE", str(tmp_path))
    assert loader.default_cache_dir() == tmp_path
    monkeypatch.delenv("TRT_LATENCY_CACHE")
    assert loader.default_cache_dir() == Path.home() / ".cache" / "trt-latency"


def _real_tensorrt() -> bool:
    try:
        module = importlib.import_module("tensorrt")
    except ImportError:
        return False
    return hasattr(module, "Builder")


@pytest.mark.skipif(_real_tensorrt(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_backend_unavailable(tiny_onnx: Path) -> None:
    # tensorrt-stubs leaves an importable, empty `tensorrt` namespace: it must not pass for TensorRT.
    assert loader.tensorrt_available() is False
    with pytest.raises(BackendUnavailable, match="TensorRT|tensorrt"):
        loader.import_tensorrt()
    from trt_latency.engines.trt.runner import TrtRunner

    with pytest.raises(BackendUnavailable):
        TrtRunner.from_onnx(tiny_onnx, max_past_len=64)
    from trt_latency.engines.backends import open_runner

    with pytest.raises(BackendUnavailable):
        open_runner(tiny_onnx, "tensorrt")


def _stream_less_transfers(source: str) -> list[str]:
    """Calls of copy_from_host / copy_to_host / copy_from_device / memset that pass no ``stream=``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"copy_from_host", "copy_to_host", "copy_from_device", "memset"}
                and not any(k.arg == "stream" for k in node.keywords)):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


def test_runner_transfers_all_go_to_its_stream() -> None:
    # The runner's stream is non-blocking: a copy or memset on the legacy default stream is not
    # ordered with the engine's work. Every transfer in the runner must name a stream.
    source = (Path(loader.__file__).parent / "runner.py").read_text()
    assert _stream_less_transfers(source) == []
    assert _stream_less_transfers("buf.copy_from_host(part, offset=0)\nbuf.memset(0, stream=s)\n") == [
        "line 1: buf.copy_from_host(part, offset=0)"]  # the check itself sees a stream-less copy
