"""`trt-latency calibrate` end to end on a tiny plan: real export, real ONNX Runtime sweep, fit, plot, replay."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers.plans import CALIBRATE_PLAN as TINY_PLAN

from trt_latency.cli import main


@pytest.fixture()
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PLAN)
    return path


@pytest.mark.slow
def test_calibrate_quick_end_to_end(tmp_path: Path, plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.estimator.model import Estimator
    from trt_latency.estimator.requests import read_requests
    from trt_latency.estimator.samples import read_samples

    out = tmp_path / "q"
    assert main(["calibrate", str(plan), "--quick", "--out", str(out), "--backend", "ort-cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for name in ("model.onnx", "samples.csv", "calibration.yaml", "decode.png", "requests.csv"):
        assert (out / name).is_file(), name
    assert not list(out.glob("model.t*.onnx"))  # --quick: first config only
    assert (out / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = read_samples(out / "samples.csv")
    assert set(samples.configs()) == {(0, 1, 2)}
    assert len(read_requests(out / "requests.csv")) == 4
    est = Estimator.load(out / "calibration.yaml")
    decision = est.admit(1e6, vision_tokens=8, text_tokens=16, max_new_tokens=8, tier_idx=0, top_k=1,
                         num_active_blocks=2)
    assert decision.admit and decision.max_new_tokens >= 8
    assert "past_len" in text and "median ms" in text and "knots" in text and "wall time" in text

    # Rerun = resume: nothing is timed again, the files are rewritten from the same rows.
    n_rows = len(samples)
    assert main(["calibrate", str(plan), "--quick", "--out", str(out), "--backend", "ort-cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "0 repetitions timed" in text and "reused" in text
    assert len(read_samples(out / "samples.csv")) == n_rows
    assert len(read_requests(out / "requests.csv")) == 4


def _rows_by_id(path: Path) -> dict[int, tuple[int, ...]]:
    from trt_latency.estimator.requests import read_requests

    log = read_requests(path)
    ids = [int(i) for i in log.request_id]
    assert len(ids) == len(set(ids)), "request ids must be unique across configs"
    return {int(r): (int(v), int(t), int(o), int(a), int(k), int(b)) for r, v, t, o, a, k, b in zip(
        log.request_id, log.vision_tokens, log.text_tokens, log.output_tokens, log.tier_idx, log.top_k,
        log.num_active_blocks, strict=True)}


@pytest.mark.slow
def test_calibrate_all_configs_and_analyze(tmp_path: Path, plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.engines.replay import REPLAY_ID_STRIDE
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator

    out = tmp_path / "full"
    cmd = ["calibrate", str(plan), "--out", str(out), "--backend", "ort-cpu", "--no-progress", "--requests", "8"]
    assert main(cmd) == 0
    text = capsys.readouterr().out
    assert (out / "model.onnx").is_file() and (out / "model.t0.k1.b1.onnx").is_file()
    cal = load_calibration(out / "calibration.yaml")
    assert {c.key for c in cal.configs} == {(0, 1, 2), (0, 1, 1)}
    prov = cal.provenance
    assert prov["backend"] == "ort-cpu" and len(prov["engine_sha256"]) == 64 and prov["plan"]["quick"] is False
    assert "numpy" in prov["versions"]
    assert {c.key: c.kv_bytes_per_token for c in cal.configs} == {(0, 1, 2): 2 * 2 * 32 * 4, (0, 1, 1): 32 * 4 * 2}

    # Every config replayed under its own request_id range, with its own loop terms and conformal factors.
    rows = _rows_by_id(out / "requests.csv")
    assert set(rows) == set(range(8)) | set(range(REPLAY_ID_STRIDE, REPLAY_ID_STRIDE + 8))
    assert {r[3:] for i, r in rows.items() if i < REPLAY_ID_STRIDE} == {(0, 1, 2)}
    assert {r[3:] for i, r in rows.items() if i >= REPLAY_ID_STRIDE} == {(0, 1, 1)}
    for c in cal.configs:
        assert c.serving_loop is not None and c.serving_loop.source == "replay", c.key
        assert c.serving_loop.n_requests == 4  # its own even request_ids
        assert c.conformal is not None and c.conformal["n"] == 4, c.key  # its own odd ones
    for name in ("t0.k1.b2", "t0.k1.b1"):  # one summary line per config in each table
        assert sum(line.strip().startswith(name) for line in text.splitlines()) == 3, name
    assert "loop terms fitted for 2 config(s), conformal factors for 2 config(s)" in text

    est = Estimator.load(out / "calibration.yaml")
    for c in cal.configs:
        d = est.admit(1e6, vision_tokens=0, text_tokens=10, max_new_tokens=4, tier_idx=c.tier_idx, top_k=c.top_k,
                      num_active_blocks=c.num_active_blocks)
        assert d.admit, d.reason
    assert main(["analyze", str(out / "requests.csv"), "-c", str(out / "calibration.yaml"),
                 "--plot", str(out / "analyze.png")]) == 0
    text = capsys.readouterr().out
    assert "output tokens" in text and "Check (a)" in text
    assert (out / "analyze.png").is_file()

    # A run killed mid-replay of the second config: its last rows lost, a half-written row left.
    # The rerun replays exactly the missing requests (same draws), nothing twice.
    log_path = out / "requests.csv"
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    assert main(cmd) == 0
    assert "3 replayed" in capsys.readouterr().out
    again = _rows_by_id(log_path)
    assert again == rows


@pytest.mark.slow
def test_calibrate_no_replay_borrows_primary_loop_terms(
        tmp_path: Path, plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No request log: engine-only (no loop terms, no factors). Only the primary replayed (a --quick run
    before): the other config borrows its loop terms, flagged, and gets no conformal factors."""
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator

    out = tmp_path / "nr"
    full_no_replay = ["calibrate", str(plan), "--out", str(out), "--backend", "ort-cpu", "--no-progress",
                      "--no-replay"]
    assert main(full_no_replay) == 0
    assert "no replayed requests" in capsys.readouterr().out
    cal = load_calibration(out / "calibration.yaml")
    assert all(c.serving_loop is None and c.conformal is None for c in cal.configs)

    assert main(["calibrate", str(plan), "--quick", "--out", str(out), "--backend", "ort-cpu", "--no-progress",
                 "--requests", "8"]) == 0
    capsys.readouterr()
    assert main(full_no_replay) == 0
    text = capsys.readouterr().out
    cal = load_calibration(out / "calibration.yaml")
    primary, other = cal.config(0, 1, 2), cal.config(0, 1, 1)
    assert primary.serving_loop is not None and primary.serving_loop.source == "replay"
    assert primary.conformal is not None and primary.conformal["n"] == 4
    lp = other.serving_loop
    assert lp is not None and lp.source == "borrowed:t0.k1.b2"
    assert lp == replace(primary.serving_loop, source=lp.source)  # every term, slopes included
    assert other.conformal is None  # factors are never borrowed
    assert "borrowed:t0.k1.b2" in text and "borrowed by 1" in text
    est = Estimator(cal)  # the borrowed terms are what its serving prediction adds
    served = est.predict(8, 16, 5, tier_idx=0, top_k=1, num_active_blocks=1)
    engine = est.predict(8, 16, 5, tier_idx=0, top_k=1, num_active_blocks=1, serving=False)
    # o_p(P) and c(P) at the 24-token prompt (their per-token slopes are fitted where the data call for them)
    assert served.total_ms == pytest.approx(
        engine.total_ms + lp.prefill_extra_ms(24) + lp.first_ms(24) + 4 * lp.decode_step_ms, rel=1e-9)


@pytest.mark.slow
def test_calibrate_user_onnx_without_metadata(tmp_path: Path, plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A decoder with no trt_latency metadata: dims come from its input shapes."""
    import onnx

    from trt_latency.engines.config import load_plan
    from trt_latency.engines.export import export_decoder
    from trt_latency.estimator.calibration import load_calibration

    tier = load_plan(plan).tiers[0]
    model_file = export_decoder(tier, 1, 2, tmp_path / "exported.onnx")
    model = onnx.load(str(model_file))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    out = tmp_path / "o"
    assert main(["calibrate", str(plan), "--quick", "--onnx", str(foreign), "--out", str(out), "--no-replay",
                 "--backend", "ort-cpu", "--no-progress"]) == 0
    assert "requests     -: skipped (--no-replay)" in capsys.readouterr().out
    cal = load_calibration(out / "calibration.yaml")
    assert [c.key for c in cal.configs] == [(0, 1, 2)]
    assert cal.configs[0].kv_bytes_per_token == 2 * 2 * 1 * 32 * 4  # inferred: 2 blocks, 1 kv head, 32, fp32
    assert not (out / "requests.csv").exists() and not (out / "model.onnx").exists()


@pytest.mark.slow
def test_calibrate_fits_serving_loop_on_one_half_and_conformal_on_the_other(
        tmp_path: Path, plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real replay on the tiny plan: loop terms from the even request_ids (present, >= 0), conformal
    factors from the odd ones only, and the Estimator's serving prediction = engine + loop terms."""
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.estimator.requests import read_requests

    out = tmp_path / "loop"
    assert main(["calibrate", str(plan), "--quick", "--out", str(out), "--backend", "ort-cpu", "--no-progress",
                 "--requests", "12"]) == 0
    text = capsys.readouterr().out
    cal = load_calibration(out / "calibration.yaml")
    loop = cal.config(0, 1, 2).serving_loop
    assert loop is not None and loop.source == "replay" and loop.n_requests == 6
    assert loop.decode_step_ms >= 0.0 and loop.first_step_ms >= 0.0 and loop.prefill_ms >= 0.0
    log = read_requests(out / "requests.csv")
    assert len(log) == 12
    conformal = cal.config(0, 1, 2).conformal
    assert conformal is not None and conformal["n"] == int((log.request_id % 2 == 1).sum()) == 6
    est = Estimator(cal)
    served, engine = est.predict(8, 16, 5), est.predict(8, 16, 5, serving=False)
    # o_p(P) and c(P) at the 24-token prompt (their per-token slopes are fitted where the data call for them)
    assert served.total_ms == pytest.approx(
        engine.total_ms + loop.prefill_extra_ms(24) + loop.first_ms(24) + 4 * loop.decode_step_ms, rel=1e-9)
    assert "serving loop" in text and "o ms/step" in text and "replay (6 requests)" in text
    assert "t0.k1.b2  n =    6" in text
