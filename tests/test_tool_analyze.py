"""analyze: bucket table and KV-explained share on request logs whose numbers follow from a known T(L).

The calibration holds a straight line T(L) = A + B*L (2 knots). A request with prompt P and n output
tokens then decodes in sum_{j=0}^{n-2} T(P + j) = (n - 1) * (A + B * (P + (n - 2) / 2)), so the measured
ms/token of a log built from that formula is known exactly, and so is the share of the growth the
model explains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.analyze_cases import KV_BYTES, A, B
from helpers.analyze_cases import straight_calibration as _calibration

from trt_latency.cli import main
from trt_latency.diagnostics.analyze import BUCKETS, analyze
from trt_latency.estimator.calibration import save_calibration
from trt_latency.estimator.requests import append_requests, read_requests

OUTPUTS = (2, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 40, 80, 160, 320, 640)
PROMPTS = (40, 100, 160)


def _ms_per_token(prompt: int, n: int, slope: float = B) -> float:
    return A + slope * (prompt + (n - 2) / 2)


def _write_log(path: Path, extra_ms_per_token: float = 0.0, extra_from: int = 10**9, slope: float = B,
               jitter: float = 0.0) -> None:
    """Every (prompt, output) pair; requests with output >= extra_from get extra ms/token the KV cache
    does not cause. ``jitter`` alternates +/- so bucket means are unchanged."""
    rows = []
    i = 0
    for prompt in PROMPTS:
        for n in OUTPUTS:
            for sign in (1.0, -1.0):
                per_token = _ms_per_token(prompt, n, slope) + (extra_ms_per_token if n >= extra_from else 0.0)
                per_token += sign * jitter
                ttft = 1.0 + 0.01 * prompt
                rows.append({"request_id": i, "vision_tokens": 0, "text_tokens": prompt, "output_tokens": n,
                             "tier_idx": 0, "top_k": 1, "num_active_blocks": 2, "ttft_ms": ttft,
                             "total_ms": ttft + per_token * (n - 1)})
                i += 1
    append_requests(path, rows)


def _bucket_mean(lo: int, hi: int, extra: float = 0.0, extra_from: int = 10**9) -> float:
    vals = [_ms_per_token(p, n) + (extra if n >= extra_from else 0.0)
            for p in PROMPTS for n in OUTPUTS if lo <= n <= hi]
    return float(np.mean(vals))


@pytest.fixture(scope="module")
def estimator() -> object:
    from trt_latency.estimator.model import Estimator

    return Estimator(_calibration())


def test_kv_driven_growth_is_fully_explained(tmp_path: Path, estimator: object) -> None:
    path = tmp_path / "req.csv"
    _write_log(path, jitter=0.05)
    report = analyze(read_requests(path), estimator, KV_BYTES)  # type: ignore[arg-type]
    for row, (label, lo, hi) in zip(report.buckets, BUCKETS, strict=True):
        assert row.label == label
        assert row.measured_mean == pytest.approx(_bucket_mean(lo, hi), rel=1e-9)
        assert row.predicted_mean == pytest.approx(_bucket_mean(lo, hi), rel=1e-6)
    g = report.growth
    assert g is not None and g.first == "2" and g.last == "21+"
    assert g.measured_growth == pytest.approx(_bucket_mean(21, 10**9) - _bucket_mean(2, 2), rel=1e-9)
    assert g.significant is True
    assert g.share_raw == pytest.approx(1.0, abs=1e-6)
    assert g.share == pytest.approx(1.0, abs=1e-6)
    assert "explains 100%" in g.verdict
    # Check (a): measured slope vs KV bytes equals the model's (both are the same T(L)).
    k = report.kv_check
    assert k is not None and k.x_unit == "MiB"
    assert k.correlation > 0.9
    assert k.slope_ms_per_unit == pytest.approx(k.predicted_slope_ms_per_unit, rel=0.05)
    # T grows B ms per KV token of KV_BYTES bytes: the implied read rate is KV_BYTES / B bytes per ms.
    assert k.implied_bandwidth_gb_s == pytest.approx(KV_BYTES / (B * 1e-3) / 1e9, rel=0.05)
    # Check (b): at fixed output length, longest - shortest prompt = B * (160 - 40) ms/token.
    pc = report.prefill_check
    assert pc is not None
    assert pc.mean_delta_ms == pytest.approx(B * (PROMPTS[-1] - PROMPTS[0]), rel=1e-6)
    assert pc.predicted_delta_ms == pytest.approx(pc.mean_delta_ms, rel=1e-6)
    assert "slower" in pc.verdict
    text = report.format_table()
    assert "KV-explained share of the growth: 100%" in text and "21+" in text


def test_growth_the_kv_cache_cannot_explain(tmp_path: Path, estimator: object) -> None:
    path = tmp_path / "req.csv"
    extra = 1.5  # ms/token added to every request with >= 21 output tokens (e.g. contention), not KV
    _write_log(path, extra_ms_per_token=extra, extra_from=21)
    report = analyze(read_requests(path), estimator, KV_BYTES)  # type: ignore[arg-type]
    g = report.growth
    assert g is not None
    kv_growth = _bucket_mean(21, 10**9) - _bucket_mean(2, 2)
    assert g.predicted_growth == pytest.approx(kv_growth, rel=1e-6)
    assert g.measured_growth == pytest.approx(kv_growth + extra, rel=1e-9)
    assert g.share == pytest.approx(kv_growth / (kv_growth + extra), rel=1e-6)
    assert g.share < 0.5
    assert g.verdict.startswith("The KV cache cannot explain this growth")
    assert f"{g.share:.0%}" in report.format_table()


def test_flat_log_has_no_growth_to_explain(tmp_path: Path) -> None:
    from trt_latency.estimator.model import Estimator

    path = tmp_path / "req.csv"
    _write_log(path, slope=0.0, jitter=0.3)
    report = analyze(read_requests(path), Estimator(_calibration(slope=1e-9)), KV_BYTES)  # type: ignore[arg-type]
    g = report.growth
    assert g is not None and g.significant is False
    assert np.isnan(g.share)
    assert "does not change significantly" in g.verdict
    assert "n/a (no significant growth)" in report.format_table()


def test_without_calibration_measured_only(tmp_path: Path) -> None:
    path = tmp_path / "req.csv"
    _write_log(path)
    report = analyze(read_requests(path))
    assert not report.has_model and report.kv_check is not None and report.kv_check.x_unit == "tokens"
    assert report.growth is not None and "-c CAL" in report.growth.verdict
    assert "predicted" not in report.format_table().splitlines()[2]


def test_cli_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, cal, png = tmp_path / "req.csv", tmp_path / "cal.yaml", tmp_path / "analyze.png"
    _write_log(log, extra_ms_per_token=1.5, extra_from=21)
    save_calibration(_calibration(), cal)
    assert main(["analyze", str(log), "-c", str(cal), "--json", "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["label"] for b in data["buckets"]] == [b[0] for b in BUCKETS]
    assert data["growth"]["share"] < 0.5
    assert data["kv_check"]["x_unit"] == "MiB"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(log), "-c", str(cal)]) == 0
    out = capsys.readouterr().out
    assert "KV-explained share of the growth:" in out and "cannot explain" in out


def test_cli_unknown_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, cal = tmp_path / "req.csv", tmp_path / "cal.yaml"
    log.write_text("vision_tokens,text_tokens,output_tokens,tier_idx,ttft_ms,total_ms\n0,10,3,0,1.0,5.0\n"
                   "0,10,4,5,1.0,7.0\n")
    save_calibration(_calibration(), cal)
    assert main(["analyze", str(log), "-c", str(cal)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{log}: row 3" in err and "tier_idx" in err and "got 'tier_idx=5" in err


def test_falling_ms_per_token_is_not_kv(tmp_path: Path, estimator: object) -> None:
    """A slow first decode step (here +3 ms on 2-token requests only) makes short requests look slower."""
    path = tmp_path / "req.csv"
    _write_log(path, jitter=0.05)
    text = path.read_text().splitlines()
    header, rows = text[0].split(","), [r.split(",") for r in text[1:]]
    out_i, total_i = header.index("output_tokens"), header.index("total_ms")
    for r in rows:
        if r[out_i] == "2":
            r[total_i] = repr(float(r[total_i]) + 3.0)
    path.write_text("\n".join([text[0], *(",".join(r) for r in rows)]) + "\n")
    report = analyze(read_requests(path), estimator, KV_BYTES)  # type: ignore[arg-type]
    g = report.growth
    assert g is not None and g.significant is True and g.measured_growth < 0
    assert np.isnan(g.share) and g.share_text() == "n/a (measured ms/token falls)"
    assert "cannot explain this change" in g.verdict
