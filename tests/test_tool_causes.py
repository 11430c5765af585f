"""analyze --table: which cause (constant, counting, first_step, kv_growth) explains a bucket table?

Tables are built from each cause's own formula plus noise (several seeds) and from a real replay of the
reference decoder (ONNX Runtime, tiny plan); the fit must name the cause that made them, and a rise that
needs a KV slope far above the calibration's must not be blamed on the KV cache.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from trt_latency.cli import main
from trt_latency.diagnostics.causes import (
    CAUSES,
    BucketTable,
    explain_requests,
    explain_table,
    read_bucket_table,
)

ROOT = Path(__file__).resolve().parents[1]
EDGES = ((2, 2), (3, 5), (6, 10), (11, 20), (21, 40))
COUNTS = (300, 300, 200, 150, 100)
TRUE = {  # (params, per-n ms/token); P = 0
    "constant": ({"R": 40.0}, lambda n: 40.0 + 0 * n),
    "counting": ({"R": 45.0}, lambda n: 45.0 * (n - 1) / n),
    "first_step": ({"R": 40.0, "c": 12.0}, lambda n: 40.0 + 12.0 / (n - 1)),
    "kv_growth": ({"a": 30.0, "b": 0.2}, lambda n: 30.0 + 0.2 * (n - 2) / 2),
}


def _write_table(path: Path, means: list[float], stds: list[float] | None = None,
                 counts: tuple[int, ...] | None = None, edges: tuple[tuple[int, int], ...] | None = None) -> Path:
    edges = EDGES if edges is None else edges
    head = "output_tokens,ms_per_token" + (",std" if stds else "") + (",count" if counts else "")
    rows = [head]
    for k, (lo, hi) in enumerate(edges):
        label = str(lo) if lo == hi else f"{lo}-{hi}"
        rows.append(f"{label},{means[k]!r}" + (f",{stds[k]!r}" if stds else "") + (f",{counts[k]}" if counts else ""))
    path.write_text("\n".join(rows) + "\n")
    return path


def _cause_table(tmp_path: Path, cause: str, seed: int, with_count: bool) -> Path:
    """Bucket means of a cause's per-n formula (n uniform over each bucket) plus noise of the stated SE."""
    rng = np.random.default_rng([seed, CAUSES.index(cause)])
    f = TRUE[cause][1]
    exact = [float(np.mean(f(np.arange(lo, hi + 1, dtype=np.float64)))) for lo, hi in EDGES]
    stds = [0.05 * m for m in exact]
    se = [s / math.sqrt(c) for s, c in zip(stds, COUNTS, strict=True)]
    means = [m + float(rng.normal(0.0, e)) for m, e in zip(exact, se, strict=True)]
    return _write_table(tmp_path / f"{cause}_{seed}.csv", means, stds, COUNTS if with_count else None)


@pytest.mark.parametrize("with_count", [True, False], ids=["std+count", "std-only"])
@pytest.mark.parametrize("cause", CAUSES)
def test_table_from_a_known_cause_names_it(tmp_path: Path, cause: str, with_count: bool) -> None:
    for seed in range(5):
        table = read_bucket_table(_cause_table(tmp_path, cause, seed, with_count))
        report = explain_table(table, kv_slope_bound=0.3, bound_source="test bound")
        assert report.best == cause, (seed, report.format_table())
        assert report.criterion == "AICc" and report.known_scale is with_count
        fitted, true = report.hypotheses[cause].params, TRUE[cause][0]
        for name, value in true.items():
            assert fitted[name] == pytest.approx(value, rel=0.15, abs=0.02), (seed, name, fitted)
        assert report.hypotheses[cause].plausible
        assert report.hypotheses[cause].akaike_weight is not None and report.hypotheses[cause].akaike_weight > 0.5


def test_prompt_tokens_move_only_a(tmp_path: Path) -> None:
    table = read_bucket_table(_cause_table(tmp_path, "kv_growth", 0, True))
    r0 = explain_table(table, prompt_tokens=0, kv_slope_bound=0.3)
    r1 = explain_table(table, prompt_tokens=1000, kv_slope_bound=0.3)
    k0, k1 = r0.hypotheses["kv_growth"], r1.hypotheses["kv_growth"]
    assert k1.params["b"] == pytest.approx(k0.params["b"], rel=1e-9)
    assert k1.params["a"] == pytest.approx(k0.params["a"] - 1000 * k0.params["b"], rel=1e-9)
    assert k1.score == pytest.approx(k0.score, rel=1e-9)
    assert np.allclose(k1.residuals, k0.residuals, atol=1e-9)
    # With P = 1000 the step at KV length 0 would cost a < 0: no longer a physical explanation.
    assert k1.params["a"] < 0 and not k1.plausible and "a = " in k1.why


def test_kv_slope_far_above_the_calibration_is_not_kv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.analyze_cases import straight_calibration as _calibration

    from trt_latency.estimator.calibration import save_calibration

    table, cal = _cause_table(tmp_path, "kv_growth", 1, True), tmp_path / "cal.yaml"
    save_calibration(_calibration(slope=0.004), cal)  # the engine pays 0.004 ms per KV token; the table needs 0.2
    assert main(["analyze", "--table", str(table), "-c", str(cal), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kv = data["hypotheses"]["kv_growth"]
    assert kv["params"]["b"] == pytest.approx(0.2, rel=0.15)
    assert kv["plausible"] is False and re.search(r"\b[45]\dx the slope the engine can pay", kv["why"])
    assert data["kv_slope_bound_ms_per_token"] == pytest.approx(0.004)
    assert data["best"] != "kv_growth" and data["hypotheses"][data["best"]]["plausible"] is True
    assert set(data["hypotheses"]) == set(CAUSES) and data["weights"].startswith("1/SE^2")
    for h in data["hypotheses"].values():
        assert set(h) >= {"params", "residuals", "score", "plausible"} and len(h["residuals"]) == len(EDGES)
    # Without -c, an assumed bound the slope fits under (0.5 ms per KV token) makes it the best explanation.
    assert main(["analyze", "--table", str(table), "--kv-bytes-per-token", "5e8", "--bandwidth-gbs", "1000",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"] == "kv_growth" and data["hypotheses"]["kv_growth"]["plausible"] is True
    assert "assumed" in data["kv_slope_bound_source"]


REPLAY_EDGES = ((2, 2), (3, 3), (4, 5), (6, 8))


def _replay(tmp_path: Path, requests: int = 200) -> Path:
    """A real replay of the tiny reference decoder on ONNX Runtime (CPU): 2 .. 8 output tokens (~1 s)."""
    pytest.importorskip("onnxruntime")
    from helpers.plans import write_plan

    plan = write_plan(tmp_path, log=3, lin=2, reps=2)
    plan.write_text(plan.read_text().replace("output_tokens: [1, 6]", "output_tokens: [2, 8]")
                    .replace("requests: 5", f"requests: {requests}"))
    log = tmp_path / "requests.csv"
    assert main(["replay", str(plan), "--backend", "ort-cpu", "--threads", "1", "--no-progress",
                 "--out", str(log)]) == 0
    return log


def _table_from_requests(n: np.ndarray, y: np.ndarray, out: Path,
                         edges: tuple[tuple[int, int], ...] = REPLAY_EDGES) -> BucketTable:
    means, stds, counts = [], [], []
    for lo, hi in edges:
        m = (n >= lo) & (n <= hi)
        means.append(float(y[m].mean()))
        stds.append(float(y[m].std(ddof=1)))
        counts.append(int(m.sum()))
    return read_bucket_table(_write_table(out, means, stds, tuple(counts), edges))


@pytest.mark.slow
def test_table_from_a_real_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real replayed requests of the reference decoder, bucketed like the seed's table.

    Real timings on a shared CPU are noisy and this decoder has shapes of its own (its first decode step is
    often slower; under load long requests can run slower per step), so the replay's own per-step table has
    no single known cause. Known causes are therefore put on top of the real requests, each large against
    that background, and the counting cause is the replay's own decode time divided by n instead of n - 1.
    """
    # One fresh replay again if the first is spoiled by a burst of load from other processes (the timings
    # are real, on a shared machine): the second must pass on its own.
    try:
        _check_real_replay(tmp_path / "first", capsys)
    except AssertionError:
        _check_real_replay(tmp_path / "second", capsys)


def _check_real_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.estimator.requests import read_requests

    tmp_path.mkdir(parents=True, exist_ok=True)
    log_path = _replay(tmp_path)
    log = read_requests(log_path)
    n = log.output_tokens.astype(np.float64)
    step = (log.total_ms - log.ttft_ms) / (n - 1)  # the right division: per decode step
    # Requests caught by a burst of load from other processes (> 2x the median step) are the shared machine,
    # not the decoder: left out, like a user would drop them before bucketing.
    calm = step <= 2.0 * np.median(step)
    assert calm.mean() > 0.7
    n, step = n[calm], step[calm]
    per_step = explain_table(_table_from_requests(n, step, tmp_path / "steps.csv"))
    per_token = explain_table(_table_from_requests(n, step * (n - 1) / n, tmp_path / "tokens.csv"))
    both = per_step.format_table() + per_token.format_table()

    def edge(report: object) -> float:  # how much better counting scores than constant
        h = report.hypotheses  # type: ignore[attr-defined]
        return float(h["constant"].score - h["counting"].score)

    # Dividing the same requests by n halves the 2-token bucket: counting gains on constant by a wide margin,
    assert edge(per_token) - edge(per_step) > 10, both
    # and names it, unless this replay's own first decode step differs from the others (c beyond 2 standard
    # errors per step): then two causes are in the data and a first_step with c < 0 mimics a shallower dip.
    fs = per_step.hypotheses["first_step"]
    own_first_step = abs(fs.params["c"]) > 2 * fs.param_se["c"]
    assert per_token.best == "counting" or own_first_step, both
    if per_token.best != "counting":
        assert per_token.best == "first_step" and per_token.hypotheses["first_step"].params["c"] < 0, both
    # A first decode step 5 ms slower than the others, on top of the real requests.
    first = explain_table(_table_from_requests(n, step + 5.0 / (n - 1), tmp_path / "first.csv"))
    assert first.best == "first_step", first.format_table()
    assert first.hypotheses["first_step"].params["c"] == pytest.approx(5.0, rel=0.1)
    # Steps that cost 2 ms more per KV token past a common 64-token prompt (a table cannot see prompts that
    # differ per request: their spread would only add noise), on an engine that can pay it.
    kv = step + 2.0 * (64 + (n - 2) / 2)
    grown = explain_table(_table_from_requests(n, kv, tmp_path / "kv.csv"), prompt_tokens=64,
                          kv_slope_bound=2.5, bound_source="test")
    assert grown.best == "kv_growth", grown.format_table()
    assert grown.hypotheses["kv_growth"].params["b"] == pytest.approx(2.0, rel=0.1)
    # The same log through analyze: the per-request section fits the causes that can occur in a log.
    capsys.readouterr()  # the replay's summary line
    assert main(["analyze", str(log_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    causes = data["causes"]
    assert set(causes["hypotheses"]) == {"constant", "first_step", "kv_growth"}
    assert causes["best"] in causes["hypotheses"] and causes["n_requests"] == len(log)
    assert main(["analyze", str(log_path)]) == 0
    assert "counting: cannot occur here" in " ".join(capsys.readouterr().out.split())


def test_request_log_causes_recover_kv_growth() -> None:
    """Per-request fit on a log whose ms/token follows T(L) = A + B L exactly, with alternating jitter."""
    rng = np.random.default_rng(3)
    n = rng.integers(2, 200, size=400)
    p = rng.integers(10, 500, size=400)
    y = 2.0 + 0.004 * (p + (n - 2) / 2) + rng.normal(0, 0.05, size=400)
    report = explain_requests(n, p, y, kv_slope_bound=0.004, bound_source="test")
    assert report is not None and report.best == "kv_growth"
    assert report.hypotheses["kv_growth"].params["b"] == pytest.approx(0.004, rel=0.05)
    assert "counting" not in report.hypotheses
    far = explain_requests(n, p, y, kv_slope_bound=0.0004, bound_source="test")
    assert far is not None and far.best != "kv_growth" and not far.hypotheses["kv_growth"].plausible


def test_tiny_tables_score_what_they_can(tmp_path: Path) -> None:
    # 3 buckets, no std: the noise level is estimated, so 2-parameter causes leave no degree of freedom.
    table = read_bucket_table(_write_table(tmp_path / "t.csv", [20.0, 30.0, 34.0], edges=EDGES[:3]))
    report = explain_table(table)
    assert report.weights.startswith("equal") and report.criterion == "BIC"
    assert report.hypotheses["first_step"].score is None and report.hypotheses["kv_growth"].score is None
    assert report.best in ("constant", "counting")
    assert "fit any table and are not scored" in " ".join(report.format_table().split())


def test_seed_table_verdict_and_readme_block(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's own table (benchmarks/seed_table.csv): the README shows this exact output."""
    monkeypatch.chdir(ROOT)
    assert main(["analyze", "--table", "benchmarks/seed_table.csv"]) == 0
    out = capsys.readouterr().out
    assert "Verdict: counting explains the data best" in out and "(total - ttft) / (n - 1)" in out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\$ trt-latency analyze --table benchmarks/seed_table.csv\n(.*?)```", readme, flags=re.S)
    assert block is not None, "README has no analyze --table block"
    assert block.group(1) == out


@pytest.mark.parametrize("text,where", [
    ("output_tokens,ms_per_token\n2,24\n3-5,x\n", "row 3, field 'ms_per_token'"),
    ("output_tokens,ms_per_token\n2,24\n5-3,30\n", "row 3, field 'output_tokens'"),
    ("output_tokens,ms_per_token\n1,24\n3-5,30\n", "row 2, field 'output_tokens'"),
    ("output_tokens,ms_per_token\n2+,24\n3-5,30\n", "row 2, field 'output_tokens'"),
    ("output_tokens,ms_per_token\n2-4,24\n3-5,30\n", "row 3, field 'output_tokens'"),
    ("output_tokens,ms_per_token,std\n2,24,3\n3-5,30,0\n", "row 3, field 'std'"),
    ("output_tokens,ms_per_token,std,count\n2,24,3,10\n3-5,30,4,0\n", "row 3, field 'count'"),
    ("output_tokens,ms_per_token,stdev\n2,24,3\n3-5,30,4\n", "row 1, field 'stdev'"),
    ("output_tokens,latency\n2,24\n3-5,30\n", "row 1, field 'latency'"),
    ("output_tokens,ms_per_token\n2,24\n", "at least 2 bucket rows"),
    ("output_tokens,ms_per_token\n2,24\n3-5\n", "row 3"),
])
def test_bad_tables_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        where: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    assert main(["analyze", "--table", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"trt-latency analyze: error: {path}")
    assert where in err and "expected" in err


@pytest.mark.parametrize("argv,needle", [
    (["analyze"], "required: REQUESTS.csv (or --table TABLE.csv)"),
    (["analyze", "req.csv", "--table", "t.csv"], "REQUESTS.csv and --table TABLE.csv are mutually exclusive"),
    (["analyze", "--table", "t.csv", "--open-upper", "0"], "argument --open-upper: expected an integer >= 1"),
    (["analyze", "--table", "t.csv", "--bandwidth-gbs", "nan"], "argument --bandwidth-gbs: expected a finite"),
])
def test_table_usage_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().splitlines()[-1].startswith("trt-latency analyze: error:")


def test_table_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "causes.png"
    assert main(["analyze", "--table", str(_cause_table(tmp_path, "first_step", 0, True)), "--plot", str(png)]) == 0
    assert f"Plot: {png}" in capsys.readouterr().out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
