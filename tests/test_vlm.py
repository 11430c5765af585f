"""VLM: the vision encoder signature, family adapters, the fit, the calibration section and the Estimator's
vision term, on the real fixture chain (tests/data/vlm/vit: torch.onnx.export; decoder: genai builder)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from trt_latency.errors import InputError

DATA = Path(__file__).parent / "data"
VIT = DATA / "vlm" / "vit"
DECODER = DATA / "thirdparty" / "genai-llama-embeds" / "model.onnx"


def test_vit_signature_family_from_config_and_feeds_run() -> None:
    from trt_latency.engines.vision import VisionEncoder, read_vision_signature

    sig = read_vision_signature(VIT / "vision.onnx")
    assert sig.family == "vit" and sig.tokens_per_patch == 1.0 and "model_type vit" in sig.source
    enc = VisionEncoder(sig)
    rng = np.random.default_rng(0)
    for n, images in ((16, 1), (24, 2), (64, 2)):
        out, ms = enc.encode(n, images, rng)
        assert out.shape[:2] == (images, n + 1) and ms > 0  # CLS + one feature per patch


def test_vision_model_without_family_fails_in_one_line(tmp_path: Path) -> None:
    from trt_latency.engines.vision import read_vision_signature

    shutil.copy(VIT / "vision.onnx", tmp_path / "v.onnx")
    with pytest.raises(InputError) as exc:
        read_vision_signature(tmp_path / "v.onnx")
    msg = str(exc.value)
    assert "\n" not in msg and "--vision-family" in msg and "--vision-feeds" in msg and "pixel_values" in msg


def test_qwen_adapter_host_inputs() -> None:
    """The host-computed inputs agree with transformers' rules: window_index permutes the merged tokens,
    cu_seqlens and cu_window_seqlens end at the patch count, pos ids follow 2x2 merge blocks."""
    from trt_latency.engines.vision import qwen_pos_ids, qwen_window_index

    grid = [(1, 12, 20), (1, 8, 8)]
    index, cu_win = qwen_window_index(grid, window_size=112, patch_size=14, merge=2)
    merged = sum(t * h * w for t, h, w in grid) // 4
    assert sorted(index.tolist()) == list(range(merged))
    assert cu_win[0] == 0 and cu_win[-1] == merged * 4 and np.all(np.diff(cu_win) > 0)
    pos = qwen_pos_ids(grid, 2)
    assert pos.shape == (12 * 20 + 64, 2)
    assert pos[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # one 2x2 merge block first


def test_fit_vision_recovers_quadratic_and_modes() -> None:
    from trt_latency.estimator.vision import fit_vision

    rows = []
    for n in (16, 64, 144, 256, 576, 1024):
        for i, (a, b, c) in ((1, (0.2, 0.006, 5e-5)), (2, (0.3, 0.012, 1.2e-4))):
            rows += [("vision", i, n, n * i, r, a + b * n + c * n * n) for r in range(3)]
    v = fit_vision(rows, "vit", 1.0, "together")
    assert v.fits[1] == pytest.approx([0.2, 0.006, 5e-5], rel=1e-6)
    assert v.error[1]["loso_max_rel"] < 1e-6
    one_call, ext = v.vision_ms(2 * 256, images=2)
    assert not ext and one_call == pytest.approx(0.3 + 0.012 * 256 + 1.2e-4 * 256**2)
    two_calls, _ = v.vision_ms(2 * 256, images=2, together=False)
    assert two_calls == pytest.approx(2 * (0.2 + 0.006 * 256 + 5e-5 * 256**2))
    assert v.vision_ms(4096, 1)[1]  # beyond the swept patches: extrapolated


def test_native_grid_is_measured_apart_and_round_trips() -> None:
    """A ViT's native grid (config image_size / patch_size squared) skips the position-embedding
    interpolation: the sweep includes it, the quadratic is fitted without it, its median is used there."""
    from trt_latency.engines.vision import VisionEncoder, read_vision_signature, vision_patch_points
    from trt_latency.estimator.vision import fit_vision, vision_from_dict, vision_to_dict

    vit = VisionEncoder(read_vision_signature(VIT / "vision.onnx")).adapter
    qwen = VisionEncoder(read_vision_signature(DATA / "vlm" / "qwen2.5-vl" / "vision.onnx")).adapter
    assert vit.native_patches == (224 // 16) ** 2 and 196 in vision_patch_points(vit, 16, 1024, 8)
    assert qwen.native_patches == 0 and 196 not in vision_patch_points(qwen, 16, 1024, 8)
    rows = [("vision", 1, n, n, r, 0.2 + 0.006 * n + 5e-5 * n * n) for n in (16, 64, 256, 1024) for r in range(3)]
    rows += [("vision", 1, 196, 196, r, 1.25) for r in range(3)]  # cheaper than the curve says
    v = fit_vision(rows, "vit", 1.0, native_patches=196.0)
    assert v.fits[1] == pytest.approx([0.2, 0.006, 5e-5], rel=1e-6) and v.error[1]["loso_max_rel"] < 1e-6
    assert v.vision_ms(196)[0] == 1.25 and v.vision_ms(197)[0] == pytest.approx(v.fit_ms(197, 1))
    back = vision_from_dict(vision_to_dict(v))
    assert back.native_patches == 196.0 and back.native_ms == {1: 1.25}
    assert vision_from_dict({k: x for k, x in vision_to_dict(v).items() if k != "native"}).native_ms == {}


def test_vision_sweep_repeats_only_imprecise_sizes() -> None:
    """Rounds beyond the first `reps` visit only the sizes whose median's SE is above the target."""
    from trt_latency.engines.vision import VisionEncoder, read_vision_signature, run_vision_sweep

    enc = VisionEncoder(read_vision_signature(VIT / "vision.onnx"))
    done = run_vision_sweep(enc, [16, 36], (1,), reps=3, max_reps=6, target_se=float("inf"))
    assert done.rounds == {(16, 1): 3, (36, 1): 3}
    more = run_vision_sweep(enc, [16, 36], (1,), reps=3, max_reps=6, target_se=0.0)
    assert more.rounds == {(16, 1): 6, (36, 1): 6} and sorted({r[4] for r in more.rows}) == list(range(6))


def test_calibrate_chain_section_estimator_and_old_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.estimator.calibration import calibration_to_dict, load_calibration, save_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.pipeline import CalibrateOptions, calibrate

    out = tmp_path / "out"
    calibrate(CalibrateOptions(onnx=str(DECODER), out=str(out), quick=True, requests=6, no_plot=True,
                               no_progress=True, vision_onnx=str(VIT / "vision.onnx"),
                               embedding_onnx=str(VIT / "embedding.onnx"), vision_patches=(16, 256),
                               vision_points=4), say=lambda s: None)
    cal = load_calibration(out / "calibration.yaml")
    assert cal.vision is not None and set(cal.vision.fits) == {1, 2} and cal.vision.embedding is not None
    log = (out / "requests.csv").read_text().splitlines()
    assert len(log) == 7  # the replay ran (vision requests through the chain)
    est = Estimator(cal)
    text_only = est.predict(0, 64, 4)
    with_img = est.predict(128, 64, 4)
    decoder_part = Estimator(dataclasses.replace(cal, vision=None)).predict(128, 64, 4)
    extra = est.vision_ms(128) + cal.vision.embedding_ms(192)
    assert with_img.prefill_ms == pytest.approx(decoder_part.prefill_ms + extra)
    assert text_only == Estimator(dataclasses.replace(cal, vision=None)).predict(0, 64, 4)
    d = est.admit(with_img.total_ms * 1.001, 128, 64, 4)
    assert d.admit and d.predicted_ms == pytest.approx(with_img.total_ms)
    assert not est.admit(with_img.total_ms * 0.99, 128, 64, 4).admit
    assert est.admit(1e9, 4096, 8, 4).extrapolated  # 4096 patches: outside the swept 16..256
    assert est.max_new_tokens(extra * 0.5, 128, 64) == 0
    assert est.vision_ms(256, images=2, together=True) != est.vision_ms(256, images=2, together=False)
    two = est.predict(256, 64, 4, images=2)  # 2 images of 128 patches in one call (the 2-image fit)
    d2 = est.admit_images(1e9, 256, 64, 4, images=2)
    assert d2.admit and d2.predicted_ms == pytest.approx(two.total_ms, rel=1e-9)
    assert est.admit_images(1e9, 256, 64, 4, images=1).predicted_ms == pytest.approx(est.predict(256, 64, 4).total_ms)
    assert not est.admit_images(1e9, 256, 64, 4, images=0).admit  # a bad images field: refused, not raised
    from trt_latency.cli import main  # the CLI's --images is the same compiled decision

    capsys.readouterr()
    assert main(["admit", "-c", str(out / "calibration.yaml"), "--budget-ms", "1e9", "--vision-tokens", "256",
                 "--text-tokens", "64", "--max-new-tokens", "4", "--images", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_ms"] == pytest.approx(two.total_ms, rel=1e-9)
    assert main(["choose", "-c", str(out / "calibration.yaml"), "--budget-ms", "1e9", "--vision", "256",
                 "--text", "64", "--max-new-tokens", "4", "--images", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_ms"] == pytest.approx(two.total_ms, rel=1e-9)
    # old files (no vision section) still load, and saving one adds no key
    plain = dataclasses.replace(cal, vision=None)
    save_calibration(plain, tmp_path / "plain.yaml")
    assert "vision" not in calibration_to_dict(load_calibration(tmp_path / "plain.yaml"))


def test_feeds_hook_drives_the_encoder(tmp_path: Path) -> None:
    from trt_latency.engines.vision import VisionEncoder, read_vision_signature

    hook = tmp_path / "myfeeds.py"
    hook.write_text("import numpy as np\n"
                    "def feeds(sig, patches, images, rng):\n"
                    "    return {'pixel_values': rng.standard_normal((images, 3, 16, 16 * patches), dtype=np.float32)}\n")
    shutil.copy(VIT / "vision.onnx", tmp_path / "v.onnx")  # no config.json: the hook is what makes it usable
    sig = read_vision_signature(tmp_path / "v.onnx", feeds=f"{hook}:feeds", tokens_per_patch=0.5)
    out, _ = VisionEncoder(sig).encode(8, 2, np.random.default_rng(0))
    assert out.shape[:2] == (2, 9) and sig.tokens_per_patch == 0.5
    with pytest.raises(InputError, match="--vision-feeds"):
        read_vision_signature(tmp_path / "v.onnx", feeds="no_such_module_x:fn")


def test_qwen25vl_encoder_runs_for_any_grid() -> None:
    """The exported Qwen2.5-VL encoder (tools/fixtures/export_qwen25vl.py) fed by the family adapter:
    family from config.json, tokens = patches / 4, one or two images per call."""
    from trt_latency.engines.vision import VisionEncoder, read_vision_signature

    sig = read_vision_signature(DATA / "vlm" / "qwen2.5-vl" / "vision.onnx")
    assert sig.family == "qwen2.5-vl" and sig.tokens_per_patch == 0.25
    enc = VisionEncoder(sig)
    rng = np.random.default_rng(0)
    for n, images in ((16, 1), (64, 2), (96, 1)):
        out, _ = enc.encode(n, images, rng)
        assert out.shape[0] == n * images // 4 and np.isfinite(out).all()
    assert enc.patches_for(vision_tokens=64, images=2) == 128


def test_calibrate_cli_vision_without_family_fails_first_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    shutil.copy(VIT / "vision.onnx", tmp_path / "v.onnx")
    r = subprocess.run([sys.executable, "-m", "trt_latency", "calibrate", "--onnx", str(DECODER), "--quick",
                        "--vision-onnx", str(tmp_path / "v.onnx"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no family" in err[0] and "--vision-family" in err[0]
    assert not (tmp_path / "o" / "samples.csv").exists()  # failed before the decoder sweep


def test_replay_sends_a_requests_images_through_the_chain(tmp_path: Path) -> None:
    """replay.images: each request with vision tokens draws its image count (own random stream: the other
    draws are unchanged), the chain encodes that many images, requests.csv records it."""
    import csv

    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.config import ReplaySpec, TierSpec
    from trt_latency.engines.replay import draw_requests, run_replay
    from trt_latency.engines.vision import EmbeddingStep, VisionChain, VisionEncoder, read_vision_signature
    from trt_latency.schema import ConfigKey

    one = ReplaySpec(8, (0, 64), (8, 16), (2, 3), 0)
    both = dataclasses.replace(one, images=(1, 2))
    a, b = draw_requests(one, 8), draw_requests(both, 8)
    assert [(r.vision_tokens, r.text_tokens, r.output_tokens) for r in a] == [
        (r.vision_tokens, r.text_tokens, r.output_tokens) for r in b]
    assert {r.images for r in a if r.vision_tokens} == {1} and {r.images for r in b if r.vision_tokens} == {1, 2}
    assert all(r.images == 0 for r in b if not r.vision_tokens)
    chain = VisionChain(VisionEncoder(read_vision_signature(VIT / "vision.onnx")), EmbeddingStep(VIT / "embedding.onnx"),
                        together=False)
    tier = TierSpec(0, "decoder", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512,
                    experts=1, dtype="float32", max_past_len=256, max_prefill_len=128)
    log = tmp_path / "requests.csv"
    with open_runner(DECODER, "ort-cpu", threads=1, max_past_len=256, max_new_tokens=128) as runner:
        run_replay(runner, ConfigKey(0, 1, 2), tier, both, log, progress=False, chain=chain)
    rows = list(csv.DictReader(log.open()))
    assert [int(r["images"]) for r in rows] == [r.images for r in b]
    two = [r for r in rows if r["images"] == "2"]
    assert two and all(float(r["ttft_ms"]) > 0 for r in two)


def test_loadtest_serves_a_vlm_through_its_encoder_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """calibrate with a chain, then loadtest on it: requests with vision tokens run encoder -> embedding ->
    decoder (1 or 2 images each, from the plan's replay.images), their TTFT carries the encoder as the
    prediction does, the controller's correction stays near 1 (it was 14x when its raw prefill left the
    encoder out), and the batched load test refuses a VLM calibration in one line."""
    import csv

    from trt_latency.cli import main
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator

    out = tmp_path / "cal"
    plan = Path(__file__).parents[1] / "benchmarks" / "vlm_plan.yaml"
    assert main(["calibrate", str(plan), "--onnx", str(DECODER), "--quick", "--requests", "12", "--out", str(out),
                 "--vision-onnx", str(VIT / "vision.onnx"), "--embedding-onnx", str(VIT / "embedding.onnx"),
                 "--vision-patches", "16", "256", "--vision-points", "4", "--no-progress", "--no-plot",
                 "--huge-pages"]) == 0  # the steadier backing (loadtest serves on it too): fewer bucket outliers
    capsys.readouterr()
    dump = tmp_path / "rows.csv"
    assert main(["loadtest", "-c", str(out / "calibration.yaml"), "--onnx", str(DECODER), "--requests", "40",
                 "--alpha", "0.1", "--dump", str(dump), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vision"]["family"] == "vit" and report["vision"]["images"] == [1, 2]
    rows = list(csv.DictReader(dump.open()))
    with_images = [r for r in rows if int(r["vision_tokens"]) > 0]
    assert report["vision"]["requests_with_images"] == len(with_images) > 10
    assert {r["images"] for r in with_images} == {"1", "2"} and all(r["images"] == "1" for r in rows
                                                                     if int(r["vision_tokens"]) == 0)
    est = Estimator(load_calibration(out / "calibration.yaml"))
    key = report["config"]
    ratios, decoder_only = [], []
    for r in with_images:
        v, t, n, k = (int(r[c]) for c in ("vision_tokens", "text_tokens", "output_tokens", "images"))
        p = est.predict(v, t, n, *key, images=k)
        ratios.append(float(r["ttft_ms"]) / p.prefill_ms)
        decoder_only.append(est.predict(0, v + t, n, *key).prefill_ms / p.prefill_ms)
    assert max(decoder_only) < 0.8  # the encoder is a visible part of these TTFTs ...
    assert 0.6 < float(np.median(ratios)) < 1.6  # ... and the measured TTFTs carry it
    for name, c in report["controller"]["corrections"].items():
        assert 0.4 < c["prefill"] < 2.5, (name, c)
    assert main(["loadtest", "-c", str(out / "calibration.yaml"), "--onnx", str(DECODER), "--requests", "4",
                 "--max-batch", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision" in err[0] and "--max-batch" in err[0]


def test_calibrate_qwen25vl_chain_on_genai_mrope_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`calibrate --onnx <genai Qwen2.5-VL text decoder> --vision-onnx <qwen2.5-vl encoder>` end to end: the
    decoder takes 3-D M-RoPE position_ids [3, B, S] (genai builder, exclude_embeds), the replay's requests with
    images announce their grid positions to it (tests/test_mrope.py checks those against transformers)."""
    from trt_latency.cli import main
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.estimator.calibration import load_calibration

    announced: list[int] = []
    real = OrtRunner.set_prompt_positions

    def counting(self: OrtRunner, positions: np.ndarray, delta: int) -> None:
        announced.append(delta)
        real(self, positions, delta)

    monkeypatch.setattr(OrtRunner, "set_prompt_positions", counting)
    out = tmp_path / "out"
    decoder = DATA / "thirdparty" / "genai-qwen25vl-text" / "model.onnx"
    assert main(["calibrate", "--onnx", str(decoder), "--vision-onnx", str(DATA / "vlm" / "qwen2.5-vl" / "vision.onnx"),
                 "--vision-family", "qwen2.5-vl", "--quick", "--requests", "6", "--vision-patches", "16", "256",
                 "--vision-points", "3", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    cal = load_calibration(out / "calibration.yaml")
    assert cal.vision is not None and cal.vision.family == "qwen2.5-vl" and cal.vision.tokens_per_patch == 0.25
    rows = (out / "requests.csv").read_text().splitlines()
    header = rows[0].split(",")
    vision = [int(r.split(",")[header.index("vision_tokens")]) for r in rows[1:]]
    assert len(vision) == 6 and len(announced) == sum(v > 0 for v in vision) > 0
    assert all(d <= 0 for d in announced)  # an image's grid positions end below its token count
