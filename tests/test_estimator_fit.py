"""Fit on samples from a known piecewise-linear truth + noise + outliers; samples/trtexec readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.fit_data import export_times as _export_times
from helpers.fit_data import synthetic_rows, truth

from trt_latency.errors import SamplesError
from trt_latency.estimator.fit import fit_samples, format_fit_table, nnls, pwl_eval
from trt_latency.estimator.samples import SAMPLES_COLUMNS, read_samples, samples_from_rows
from trt_latency.estimator.trtexec import parse_shape_spec, shape_from_filename, trtexec_samples

# The default sweep grid shape: 10 log points + 10 linear points up to 4096.


def test_fit_recovers_piecewise_linear_truth_with_noise_and_outliers() -> None:
    cal = fit_samples(samples_from_rows(synthetic_rows(), source="synthetic"))
    (cfg,) = cal.configs
    fe = cfg.fit_error
    assert fe["loo_median_rel"] <= 0.01, fe
    assert fe["loo_max_rel"] <= 0.03, fe
    knots, values = np.array(cfg.decode_knots), np.array(cfg.decode_values_ms)
    assert np.all(np.diff(values) >= 0)
    grid = np.arange(1, 4097)
    assert np.max(np.abs(pwl_eval(knots, values, grid) / truth(grid) - 1)) < 0.03
    a, b, c = cfg.prefill_coeffs
    assert abs(a + 512 * b + c * 512**2 - (0.5 + 5.12 + 2e-6 * 512**2)) / 6.2 < 0.02
    assert cfg.valid_past_len == [1.0, 4096.0] and cfg.valid_prefill_len == [8.0, 1024.0]
    assert 0.97 < cfg.residual_quantiles[0.5] < 1.03 and cfg.residual_quantiles[0.99] > 1.2  # the outliers
    assert "LOPO" in format_fit_table(cal)


def test_straight_line_keeps_two_knots() -> None:
    def line(L, blocks, top_k):  # type: ignore[no-untyped-def]
        return 1.0 + 2e-4 * L

    cal = fit_samples(samples_from_rows(synthetic_rows(noise=0.005, outliers=0.0, reps=5, fn=line)))
    assert len(cal.configs[0].decode_knots) == 2
    assert cal.configs[0].fit_error["loo_max_rel"] < 0.02


def test_position_noise_floor_matches_the_injected_noise() -> None:
    """fit_error states the standard error of the per-position medians: the floor under the LOPO error."""
    for noise in (0.004, 0.04):
        cal = fit_samples(samples_from_rows(synthetic_rows(noise=noise, outliers=0.0, reps=25, seed=3)))
        fe = cal.configs[0].fit_error
        expected = 1.2533 * noise / 5.0  # SE of a median of 25 normal draws
        assert 0.7 * expected < fe["position_se_median_rel"] < 1.3 * expected, fe
        assert fe["position_se_max_rel"] >= fe["position_se_median_rel"]
        # the LOPO error of a correct model is of the order of that floor, not far below or above it
        assert 0.3 * expected < fe["loo_median_rel"] < 3.0 * expected, fe
    few = fit_samples(samples_from_rows(synthetic_rows(noise=0.01, outliers=0.0, reps=2)))
    assert few.configs[0].fit_error["position_se_median_rel"] is None  # < 3 repetitions: no spread estimate


def test_factorised_model_predicts_held_out_config() -> None:
    def linear_truth(L, blocks, top_k):  # type: ignore[no-untyped-def]
        return 0.2 + blocks * (0.1 + 0.02 * top_k + 1e-4 * L)

    configs = ((0, 1, 2), (0, 1, 4), (0, 2, 4), (0, 2, 3))
    cal = fit_samples(samples_from_rows(synthetic_rows(noise=0.003, outliers=0.0, reps=3, configs=configs,
                                                       fn=linear_truth)))
    (f,) = cal.factorised
    assert f.n_configs == 4 and f.heldout_max_rel is not None and f.heldout_max_rel < 0.03
    assert abs(f.step_ms(1000, 1, 3) / linear_truth(1000, 3, 1) - 1) < 0.02


def test_nnls_matches_exhaustive_small_problem() -> None:
    """The optimum is the best feasible unconstrained fit over the subsets of free variables."""
    rng = np.random.default_rng(1)
    subsets = [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    for _ in range(20):
        a = rng.normal(size=(8, 3))
        b = rng.normal(size=8)
        x = nnls(a, b)
        assert np.all(x >= 0)
        best = float(np.linalg.norm(b))  # x = 0
        for s in subsets:
            coef = np.linalg.lstsq(a[:, list(s)], b, rcond=None)[0]
            if np.all(coef >= 0):
                best = min(best, float(np.linalg.norm(a[:, list(s)] @ coef - b)))
        assert abs(np.linalg.norm(a @ x - b) - best) <= 1e-9


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_read_samples_defaults_and_errors(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "s.csv", "phase,past_len,new_tokens,latency_ms", ["decode,1,1,1.5", "prefill,0,8,2.0"])
    s = read_samples(p)
    assert s.tier_idx.tolist() == [0, 0] and s.batch.tolist() == [1, 1] and s.latency_ms.tolist() == [1.5, 2.0]
    header = ",".join(SAMPLES_COLUMNS[:12])  # a file written before the batch metadata (kv_total, kv_max) loads
    cases = [
        ("phase,past_len,latency_ms", ["decode,1,1.0"], "new_tokens", None),
        (header, ["0,1,4,1,decode,5,1,0,nan,ort,cpu,concat"], "latency_ms", 2),
        (header, ["0,1,4,1,decode,5,1,0,-1,ort,cpu,concat"], "latency_ms", 2),
        (header, ["0,1,4,1,decode,x,1,0,1.0,ort,cpu,concat"], "past_len", 2),
        (header, ["0,1,4,1,decode,5,1,0,1.0,ort,cpu,concat", "0,1,4,1,sideways,5,1,0,1.0,ort,cpu,concat"], "phase", 3),
        (header, ["0,1,4,1,decode,5,1,0,1.0"], None, 2),
    ]
    for i, (h, rows, field, row) in enumerate(cases):
        path = write_csv(tmp_path / f"bad{i}.csv", h, rows)
        with pytest.raises(SamplesError) as info:
            read_samples(path)
        msg = str(info.value)
        assert str(path) in msg
        if field:
            assert f"field '{field}'" in msg
        if row:
            assert f"row {row}" in msg
    with pytest.raises(SamplesError, match="not found"):
        read_samples(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SamplesError):
        read_samples(empty)


def test_fit_needs_two_decode_positions(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "s.csv", "phase,past_len,new_tokens,latency_ms", ["decode,5,1,1.0", "decode,5,1,1.1"])
    with pytest.raises(SamplesError, match="past_len"):
        fit_samples(read_samples(p))


def test_trtexec_shapes() -> None:
    assert shape_from_filename("runs/decode_L512.json") == {
        "phase": "decode", "past_len": 512, "new_tokens": 1, "tier_idx": 0, "top_k": 0, "num_active_blocks": 0}
    s = shape_from_filename("prefill_S128_t1_k2_b4.json")
    assert (s["phase"], s["past_len"], s["new_tokens"], s["tier_idx"], s["top_k"], s["num_active_blocks"]) == (
        "prefill", 0, 128, 1, 2, 4)
    assert parse_shape_spec("past_len=512,new_tokens=1")["phase"] == "decode"
    assert parse_shape_spec("past_len=0,new_tokens=64")["phase"] == "prefill"
    with pytest.raises(SamplesError, match="past_len"):
        parse_shape_spec("past_len=x,new_tokens=1")
    with pytest.raises(SamplesError, match="shape"):
        shape_from_filename("times.json")


def test_trtexec_times_fit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = []
    for L in (16, 128, 512, 1024, 2048, 4096):
        files.append(_export_times(tmp_path / f"decode_L{L}.json", list(1.0 + 1e-4 * L + 0.002 * rng.random(9))))
    for s in (16, 128, 512):
        files.append(_export_times(tmp_path / f"prefill_S{s}.json", list(0.5 + 0.004 * s + 0.002 * rng.random(5))))
    samples = trtexec_samples(files)
    assert len(samples) == 6 * 9 + 3 * 5 and set(samples.backend) == {"tensorrt"}
    cal = fit_samples(samples)
    assert cal.configs[0].valid_past_len == [16.0, 4096.0]
    assert abs(cal.configs[0].decode_values_ms[-1] - 1.41) < 0.01
    # explicit shapes, one per file, override the names
    s2 = trtexec_samples(files[:2], ["past_len=100,new_tokens=1", "past_len=200,new_tokens=1"])
    assert sorted(set(s2.past_len.tolist())) == [100, 200]
    bad = tmp_path / "decode_L8.json"
    bad.write_text(json.dumps([{"computeMs": "fast"}]))
    with pytest.raises(SamplesError, match="computeMs"):
        trtexec_samples([bad])
    bad.write_text("{not json")
    with pytest.raises(SamplesError, match="malformed JSON"):
        trtexec_samples([bad])


def _serpentine_rows(positions: np.ndarray, rounds: int) -> np.ndarray:
    return np.concatenate([positions if r % 2 == 0 else positions[::-1] for r in range(rounds)])


def test_drift_adjusted_removes_a_common_level_and_keeps_the_shape() -> None:
    from trt_latency.stats import drift_adjusted

    rng = np.random.default_rng(7)
    pos = np.array([1, 2, 4, 10, 21, 44, 93, 199, 341, 424, 683, 903, 1024, 1365, 1707, 2048, 2731, 3413, 4096])
    keys = _serpentine_rows(pos, 60)
    truth = 0.4 + 0.8e-3 * keys  # the engine's T(L): the shape to keep

    def shape_error(v: np.ndarray) -> float:
        m = np.array([np.median(v[keys == p]) for p in pos]) / (0.4 + 0.8e-3 * pos)
        return float(np.max(np.abs(m / np.median(m) - 1.0)))

    # The machine wanders (a random walk in log speed, ~35% sd over the sweep) and each step has 8% noise of
    # its own; ten seeded sweeps (deterministic). Worst position's shape error, mean over the sweeps:
    raw, adjusted, raw_exact, adjusted_exact, seen = [], [], [], [], []
    for seed in range(10):
        walk = np.exp(np.cumsum(np.random.default_rng(seed).normal(0.0, 0.01, keys.shape[0])))
        values = truth * walk * np.exp(rng.normal(0.0, 0.08, keys.shape[0]))
        adj, level = drift_adjusted(keys, values, pos.shape[0])
        raw.append(shape_error(values))
        adjusted.append(shape_error(adj))
        seen.append(float(np.std(level)))
        raw_exact.append(shape_error(truth * walk))  # no step noise: what the drift alone did to the medians
        adjusted_exact.append(shape_error(drift_adjusted(keys, truth * walk, pos.shape[0])[0]))
    assert min(seen) > 0.05  # the drift was seen every time ...
    assert np.mean(adjusted) < 0.85 * np.mean(raw)  # ... and taken out of the position medians
    assert np.mean(adjusted_exact) < 0.7 * np.mean(raw_exact) and max(adjusted_exact) < 0.02
    # No drift: nothing to take out (the correction stays within the noise of a running median).
    calm = truth * np.exp(rng.normal(0.0, 0.08, keys.shape[0]))
    adj, level = drift_adjusted(keys, calm, pos.shape[0])
    assert float(np.std(level)) < 0.03 and shape_error(adj) < 0.04
    # Too few repetitions for two windows: returned as they are.
    few, level = drift_adjusted(keys[:30], calm[:30], pos.shape[0])
    assert np.array_equal(few, calm[:30]) and not level.any()
