"""`compare`: each strategy's formula on hand-made logs with answers worked out by hand here, the
split-conformal factor, no leak of the held-out half into any fit (with and without a calibration),
and the CLI's JSON / table / plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trt_latency.cli import build_parser, main
from trt_latency.diagnostics.compare import (
    SLO_QUANTILES,
    STRATEGIES,
    Columns,
    compare,
    compare_log,
    fit_average,
    fit_conservative,
    fit_hybrid,
    fit_position_regression,
    predict_position,
    score,
    split_log,
)
from trt_latency.estimator.calibration import Calibration, ConfigCalibration, save_calibration
from trt_latency.estimator.model import Estimator
from trt_latency.estimator.requests import append_requests, read_requests


def cols(n: list[int], ttft: list[float], total: list[float], prompt: list[float] | None = None,
         rid: list[int] | None = None) -> Columns:
    size = len(n)
    return Columns(np.asarray(rid if rid is not None else range(size), dtype=np.int64),
                   np.asarray(prompt if prompt is not None else [100.0] * size, dtype=np.float64),
                   np.asarray(n, dtype=np.int64), np.asarray(ttft, dtype=np.float64),
                   np.asarray(total, dtype=np.float64), [(0, 1, 0)] * size)


# Five fit requests, decode ms/token 20, 25, 40, 50, 45 at n = 2, 4, 11, 21, 25; TTFT 10, 12, 14, 8, 16.
HAND = cols([2, 4, 11, 21, 25], [10, 12, 14, 8, 16], [10 + 1 * 20, 12 + 3 * 25, 14 + 10 * 40, 8 + 20 * 50, 16 + 24 * 45])


def test_average_is_mean_ttft_and_mean_per_request_rate() -> None:
    p = fit_average(HAND)
    assert p["ttft_ms"] == pytest.approx((10 + 12 + 14 + 8 + 16) / 5)
    assert p["ms_per_token"] == pytest.approx((20 + 25 + 40 + 50 + 45) / 5)


def test_conservative_takes_the_21_plus_bucket() -> None:
    p = fit_conservative(HAND)
    assert p["ms_per_token"] == pytest.approx((50 + 45) / 2) and p["bucket_from"] == 21
    # without a 21+ request the largest non-empty bucket (11-20) is the conservative one
    assert fit_conservative(cols([2, 4, 11], [10, 12, 14], [30, 87, 414]))["ms_per_token"] == pytest.approx(40)


def test_hybrid_early_late_weighted_by_early_step_share() -> None:
    p = fit_hybrid(HAND)
    early = (20 + 25) / 2  # n = 2 and 4: all their steps are tokens 2-5
    late = ((400 - 4 * early) / 6 + (1000 - 4 * early) / 16 + (1080 - 4 * early) / 20) / 3
    w = (1 + 3 + 4 + 4 + 4) / (1 + 3 + 10 + 20 + 24)  # early steps / all decode steps of the fit half
    assert p["early_ms_per_token"] == pytest.approx(early)
    assert p["late_ms_per_token"] == pytest.approx(late)
    assert p["early_weight"] == pytest.approx(w)
    assert p["ms_per_token"] == pytest.approx(w * early + (1 - w) * late)


def test_compare_bounds_follow_each_formula() -> None:
    """Fit on HAND, hold out two requests (n = 1 and n = 10): every bound by hand."""
    held = cols([1, 10], [11, 13], [11.5, 400.0], rid=[5, 6])
    both = Columns(*(np.concatenate([getattr(HAND, f), getattr(held, f)]) for f in
                     ("request_id", "prompt", "output_tokens", "ttft_ms", "total_ms")), HAND.keys + held.keys)
    fit_mask = np.array([True] * 5 + [False] * 2)
    rep = compare(both, fit_mask, ~fit_mask, alpha=0.2)
    ttft, avg, cons = 12.0, 36.0, 47.5
    early = 22.5
    late = ((400 - 4 * early) / 6 + (1000 - 4 * early) / 16 + (1080 - 4 * early) / 20) / 3
    hyb = 16 / 58 * early + 42 / 58 * late
    np.testing.assert_allclose(rep.held_bounds["average"], [ttft, ttft + 9 * avg])
    np.testing.assert_allclose(rep.held_bounds["conservative-1.2"], [1.2 * ttft, 1.2 * (ttft + 9 * cons)])
    np.testing.assert_allclose(rep.held_bounds["conservative-1.3"], [1.3 * ttft, 1.3 * (ttft + 9 * cons)])
    np.testing.assert_allclose(rep.held_bounds["hybrid"], [ttft, ttft + 9 * hyb])
    s = rep.strategies["conservative-1.3"]
    # mape is of the point prediction (before the factor); n=1: |12 - 11.5| / 11.5, n=10: |439.5 - 400| / 400
    assert s["mape"] == pytest.approx((0.5 / 11.5 + 39.5 / 400) / 2)
    assert s["violation_rate"] == 0.0
    assert s["over_reservation"] == pytest.approx((1.3 * 12 / 11.5 - 1 + 1.3 * 439.5 / 400 - 1) / 2)
    assert set(rep.strategies) == set(STRATEGIES)


def test_score_by_hand() -> None:
    actual = np.array([100.0, 200.0, 300.0, 400.0])
    point = np.array([110.0, 180.0, 300.0, 500.0])
    bound = np.array([120.0, 190.0, 330.0, 500.0])  # the second misses
    budgets = np.array([[150.0, 250.0]] * 4)
    s = score(actual, point, bound, budgets)
    assert s["mape"] == pytest.approx((0.1 + 0.1 + 0 + 0.25) / 4)
    assert s["violation_rate"] == 0.25
    assert s["over_reservation"] == pytest.approx((0.2 + 0.1 + 0.25) / 3)
    # admitted pairs: 120 <= 150, 250; 190 <= 250 only -> 3 of 8; met: 100 <= both, 200 <= 250 -> 3 of 8
    assert s["admitted"] == pytest.approx(3 / 8) and s["goodput"] == pytest.approx(3 / 8)
    assert s["admitted_by_class"] == [0.25, 0.5]
    s2 = score(actual, point, np.array([120.0, 210.0, 330.0, 500.0]), np.array([[205.0, 250.0]] * 4))
    assert s2["admitted"] == pytest.approx(2 / 8 + 1 / 8) and s2["goodput"] == pytest.approx(3 / 8)
    s3 = score(np.array([260.0]), np.array([240.0]), np.array([240.0]), np.array([[250.0]]))
    assert s3["admitted"] == 1.0 and s3["goodput"] == 0.0  # admitted, then missed the budget


def test_a_config_with_few_fit_rows_uses_the_pooled_fit() -> None:
    """Config A has 10 fit rows (rate 20 ms/token), config B 3 (rate 50): B is predicted by the pooled fit."""
    n = [3] * 10 + [3] * 3 + [3, 3]
    ttft = [10.0] * 15
    total = [10 + 2 * 20.0] * 10 + [10 + 2 * 50.0] * 3 + [50.0, 50.0]
    keys = [(0, 1, 0)] * 10 + [(1, 1, 0)] * 3 + [(0, 1, 0), (1, 1, 0)]
    c = Columns(np.arange(15), np.full(15, 100.0), np.asarray(n), np.asarray(ttft), np.asarray(total), keys)
    fit = np.array([True] * 13 + [False] * 2)
    rep = compare(c, fit, ~fit, alpha=0.2)
    assert set(rep.fitted["average"]) == {"pooled", "t0.k1.b0"}
    pooled_rate = (10 * 20 + 3 * 50) / 13
    np.testing.assert_allclose(rep.held_bounds["average"], [10 + 2 * 20.0, 10 + 2 * pooled_rate])


# ------------------------------------------------------------------------------ position without a calibration

TRUE = {"prefill_a_ms": 5.0, "prefill_b_ms": 0.1, "prefill_q_ms": 1e-4, "first_step_ms": 7.0, "step_ms": 30.0,
        "step_per_kv_ms": 0.01}


def exact_log(size: int, seed: int = 0, true: dict[str, float] = TRUE) -> Columns:
    rng = np.random.default_rng(seed)
    p = rng.integers(16, 900, size).astype(np.float64)
    n = rng.integers(1, 40, size)
    ttft = true["prefill_a_ms"] + true["prefill_b_ms"] * p + true["prefill_q_ms"] * p * p
    m = np.maximum(n - 1, 0)
    # sum over steps j = 0..n-2 of (step + per_kv (P + j)), plus the first-step term once: written as a loop
    decode = np.array([sum(true["step_ms"] + true["step_per_kv_ms"] * (pi + j) for j in range(mi))
                       + (true["first_step_ms"] if mi > 0 else 0.0) for pi, mi in zip(p, m, strict=True)])
    return Columns(np.arange(size), p, n, ttft, ttft + decode, [(0, 1, 0)] * size)


def test_position_regression_recovers_known_terms() -> None:
    c = exact_log(60)
    got = fit_position_regression(c)
    for k, v in TRUE.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-8), k
    np.testing.assert_allclose(predict_position(got, c), c.total_ms, rtol=1e-9)
    # a fast first step (the seed's table) is a negative c, not clamped away
    fast = dict(TRUE, first_step_ms=-12.0)
    assert fit_position_regression(exact_log(60, true=fast))["first_step_ms"] == pytest.approx(-12.0, rel=1e-6)


def test_trt_latency_factor_is_the_split_conformal_rank_of_the_other_fit_rows() -> None:
    """Fit half = even ids; within it alternate rows (ids 0, 4, 8, ...) fit position exactly, the
    others (ids 2, 6, ...) carry known ratios actual/true: the factor is their ceil((m+1)(1-alpha))-th smallest."""
    c = exact_log(160)
    total = c.total_ms.copy()
    conf_ids = np.arange(2, 160, 4)  # 40 conformal rows
    ratios = 1.0 + np.arange(40) / 100.0
    np.random.default_rng(3).shuffle(ratios)
    total[conf_ids] = c.total_ms[conf_ids] * ratios
    c = Columns(c.request_id, c.prompt, c.output_tokens, c.ttft_ms, total, c.keys)
    fit, held, _ = split_log(c.request_id)
    rep = compare(c, fit, held, alpha=0.1, conformal="split")
    rank = math.ceil(41 * 0.9)  # 37th smallest of 1.00 .. 1.39
    assert rep.fitted["trt-latency"]["conformal_factor"]["t0.k1.b0"] == pytest.approx(1.0 + (rank - 1) / 100)
    assert rep.fitted["trt-latency"]["conformal_n"]["t0.k1.b0"] == 40
    # held-out rows are exact: trt-latency's position part (fitted on the exact rows) is exact on them,
    # so it reserves exactly the factor
    assert rep.strategies["trt-latency"]["mape"] < 1e-9
    assert rep.strategies["trt-latency"]["over_reservation"] == pytest.approx(0.36, rel=1e-6)
    assert rep.strategies["trt-latency"]["violation_rate"] == 0.0


def test_trt_latency_cross_conformal_scores_are_out_of_fold() -> None:
    """Fit half = even ids; fold k = the fit rows whose rank in request_id order is k mod 5 (ids 0, 10, 20, ...
    are fold 0). Each fold's scores come from position refitted without it; the point model is position."""
    c = exact_log(200, seed=1)
    rng = np.random.default_rng(5)
    total = c.total_ms * rng.uniform(0.9, 1.3, 200)  # noisy everywhere: each fold's model differs
    c = Columns(c.request_id, c.prompt, c.output_tokens, c.ttft_ms, total, c.keys)
    fit, held, _ = split_log(c.request_id)
    rep = compare(c, fit, held, alpha=0.1)
    fit_ids = np.arange(0, 200, 2)
    scores = []
    for k in range(5):
        out_ids = fit_ids[k::5]
        rest = np.setdiff1d(fit_ids, out_ids)
        model = fit_position_regression(cols_at(c, rest))
        scores += list(total[out_ids] / predict_position(model, cols_at(c, out_ids)))
    expected = sorted(scores)[math.ceil(101 * 0.9) - 1]  # 91st smallest of 100
    assert rep.fitted["trt-latency"]["conformal_factor"]["t0.k1.b0"] == pytest.approx(expected, rel=1e-9)
    assert rep.fitted["trt-latency"]["position"] == rep.fitted["position"]  # the bound is position x factor
    np.testing.assert_allclose(rep.held_bounds["trt-latency"], rep.held_bounds["position"] * expected, rtol=1e-12)


def cols_at(c: Columns, ids: np.ndarray) -> Columns:
    mask = np.isin(c.request_id, ids)
    return c.take(mask)


# ------------------------------------------------------------------------------ position with a calibration

def engine_cal() -> Calibration:
    cfg = ConfigCalibration(
        tier_idx=0, top_k=1, num_active_blocks=2, decode_knots=[0.0, 512.0, 2048.0], decode_values_ms=[1.5, 1.8, 3.0],
        prefill_coeffs=[2.0, 0.05, 1e-5], residual_quantiles={0.5: 1.0, 0.9: 1.05}, valid_past_len=[0.0, 2048.0],
        valid_prefill_len=[1.0, 1024.0], kv_bytes_per_token=256)
    return Calibration(1, {"backend": "ort-cpu", "device": "test"}, [cfg])


def loop_log(path: Path, o: float, c: float, o_p: float, size: int = 120, noise: float = 0.0, seed: int = 0) -> Path:
    """Requests = the engine model + known loop terms (o per step, c once, o_p on the prefill) [+ noise]."""
    rng = np.random.default_rng(seed)
    est = Estimator(engine_cal())
    rows = []
    for i in range(size):
        prompt, n = int(rng.integers(16, 800)), int(rng.integers(1, 64))
        p = est.predict(0, prompt, n)
        ttft = p.prefill_ms + o_p + rng.normal(0.0, noise)
        decode = p.decode_ms + ((c + (n - 1) * o + rng.normal(0.0, noise) * math.sqrt(n - 1)) if n >= 2 else 0.0)
        rows.append({"request_id": i, "vision_tokens": 0, "text_tokens": prompt, "output_tokens": n, "tier_idx": 0,
                     "top_k": 1, "num_active_blocks": 2, "ttft_ms": max(ttft, 0.0), "total_ms": max(ttft, 0.0) + decode})
    append_requests(path, rows)
    return path


def test_position_with_calibration_fits_loop_terms_on_the_fit_half(tmp_path: Path) -> None:
    log = read_requests(loop_log(tmp_path / "r.csv", o=0.4, c=1.2, o_p=0.8))
    rep = compare_log(log, Estimator(engine_cal()), alpha=0.05)
    terms = rep.fitted["position"]["t0.k1.b2"]
    assert terms["o_ms"] == pytest.approx(0.4, rel=1e-6)
    assert terms["c_ms"] == pytest.approx(1.2, rel=1e-6)
    assert terms["o_p_ms"] == pytest.approx(0.8, rel=1e-6)
    assert rep.strategies["position"]["mape"] < 1e-9 and "calibration" in rep.position_source


# ------------------------------------------------------------------------------ no leak


def _perturbed(path: Path, out: Path, held_ids: set[int]) -> Path:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    idx = {h: i for i, h in enumerate(header)}
    rng = np.random.default_rng(9)
    new = [lines[0]]
    for line in lines[1:]:
        f = line.split(",")
        if int(f[idx["request_id"]]) in held_ids:  # wild, but still a valid row
            f[idx["text_tokens"]] = str(int(rng.integers(1, 900)))
            f[idx["output_tokens"]] = str(int(rng.integers(1, 60)))
            ttft = float(rng.uniform(0, 1e4))
            f[idx["ttft_ms"]] = repr(ttft)
            f[idx["total_ms"]] = repr(ttft + float(rng.uniform(0, 1e5)))
        new.append(",".join(f))
    out.write_text("\n".join(new) + "\n")
    return out


@pytest.mark.parametrize("with_cal", [False, True])
@pytest.mark.parametrize("split", ["parity", "random"])
def test_held_out_rows_never_reach_a_fit(tmp_path: Path, with_cal: bool, split: str) -> None:
    path = loop_log(tmp_path / "r.csv", o=0.4, c=1.2, o_p=0.8, size=160, noise=0.3)
    log = read_requests(path)
    est = Estimator(engine_cal()) if with_cal else None
    _, held, _ = split_log(log.request_id, split, seed=4)
    held_ids = {int(i) for i in log.request_id[held]}
    base = compare_log(log, est, alpha=0.1, split=split, seed=4)
    wild = compare_log(read_requests(_perturbed(path, tmp_path / "w.csv", held_ids)), est, alpha=0.1,
                       split=split, seed=4)
    assert wild.fitted == base.fitted  # every fitted parameter, conformal factor and SLO budget
    assert wild.strategies["average"]["mape"] != base.strategies["average"]["mape"]  # the perturbation did bite


# ------------------------------------------------------------------------------ CLI


def test_slo_quantiles_are_loadtests() -> None:
    args = build_parser().parse_args(["loadtest", "-c", "cal.yaml"])
    assert tuple(args.slo_quantiles) == SLO_QUANTILES


def test_cli_json_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = loop_log(tmp_path / "r.csv", o=0.4, c=1.2, o_p=0.8, size=120, noise=0.3)
    cal = tmp_path / "cal.yaml"
    save_calibration(engine_cal(), cal)
    capsys.readouterr()
    assert main(["compare", str(path), "--json", "--alpha", "0.1", "--split", "random", "--seed", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha"] == 0.1 and "random" in out["split"] and "seed 2" in out["split"]
    assert set(out["strategies"]) == set(STRATEGIES)
    for s in out["strategies"].values():
        assert {"mape", "violation_rate", "over_reservation", "admitted", "goodput"} <= set(s)
    assert "regression" in out["position"]
    plot = tmp_path / "c.png"
    assert main(["compare", str(path), "-c", str(cal), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "request_id parity" in text and "calibration's engine model" in text and "trt-latency" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_alpha_the_fit_half_cannot_back_is_explained_not_printed_as_inf() -> None:
    """30 requests, parity split: 15 conformal scores; alpha 0.05 needs 19 (issue 24.7). The trt-latency row
    is undefined (n/a, not "inf%" over-reservation and 0% admitted) and says how many requests it needs."""
    from trt_latency.serving.conformal import min_requests_for

    c = exact_log(30)
    fit = np.arange(30) % 2 == 0
    rep = compare(c, fit, ~fit, alpha=0.05)
    s = rep.strategies["trt-latency"]
    need = min_requests_for(0.05)
    assert need == 19 and s["undefined"].startswith("no conformal factor at alpha 0.05")
    assert "gave 15 scores" in s["undefined"] and f"at least {need}" in s["undefined"]
    assert math.isnan(s["admitted"]) and math.isnan(s["over_reservation"])
    table = rep.format_table()
    assert "inf%" not in table and "nan%" not in table
    row = next(line for line in table.splitlines() if line.startswith("trt-latency "))
    assert row.split()[2:] == ["n/a"] * 4, row
    assert "trt-latency: n/a: no conformal factor at alpha 0.05: the fit half gave 15 scores" in table
    assert rep.to_dict()["strategies"]["trt-latency"]["admitted"] is None
    # an alpha the 15 scores can back gives a defined row
    assert "undefined" not in compare(c, fit, ~fit, alpha=0.1).strategies["trt-latency"]
