"""GPU results on CPU: committed benchmarks/gpu/<device>/ data refits to what was recorded, and the
independent check's logic (benchmarks/gpu/independent_loop.py) runs on a real CPU calibration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"
COMMITTED = sorted(GPU_DIR.glob("*/samples.csv"))

TINY_PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32, intermediate: 128,
     vocab: 128, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 32}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 4, linear_points: 4, reps: 3, warmup: 1}
  prefill: {lengths: [4, 16], reps: 2}
  seed: 0
replay: {requests: 0, vision_tokens: [0], text_tokens: [4, 8], output_tokens: [2, 4], seed: 0}
"""


def _load_independent_loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_independent_loop", GPU_DIR / "independent_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


il = _load_independent_loop()


# ------------------------------------------------------------------------------- committed GPU data


def _refit(samples_csv: Path, cal: dict[str, Any]) -> Any:
    from trt_latency.estimator.fit import fit_samples
    from trt_latency.estimator.samples import read_samples

    kv = {(c["tier_idx"], c["top_k"], c["num_active_blocks"]): c["kv_bytes_per_token"] for c in cal["configs"]}
    return fit_samples(read_samples(samples_csv), kv_bytes_per_token=kv)


def check_result_folder(folder: Path) -> dict[str, Any]:
    """What a committed benchmarks/gpu/<device>/ folder must satisfy: refitting samples.csv gives the
    recorded calibration.yaml fit (knots, values, leave-one-position-out error), and summary.json's sweep
    medians, fitted slope, roofline slope and fit error are what those files say. Returns summary.json."""
    for name in ("samples.csv", "calibration.yaml", "summary.json", "decode.png"):
        assert (folder / name).is_file(), f"{folder.name}/{name} missing"
    cal = yaml.safe_load((folder / "calibration.yaml").read_text())
    summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
    refit = _refit(folder / "samples.csv", cal)
    recorded = {(c["tier_idx"], c["top_k"], c["num_active_blocks"]): c for c in cal["configs"]}
    assert {c.key for c in refit.configs} == set(recorded)
    for cfg in refit.configs:
        rec = recorded[cfg.key]
        assert cfg.fit_error["n_positions"] == rec["fit_error"]["n_positions"]
        for field in ("loo_median_rel", "loo_max_rel"):
            assert cfg.fit_error[field] == pytest.approx(rec["fit_error"][field], rel=1e-9, abs=1e-12), field
        assert cfg.decode_knots == pytest.approx(rec["decode_knots"], rel=1e-9)
        assert cfg.decode_values_ms == pytest.approx(rec["decode_values_ms"], rel=1e-9, abs=1e-12)
    key = (summary["config"]["tier_idx"], summary["config"]["top_k"], summary["config"]["num_active_blocks"])
    primary = next(c for c in refit.configs if c.key == key)
    for field in ("loo_median_rel", "loo_max_rel"):
        assert summary["fit_error"][field] == pytest.approx(primary.fit_error[field], rel=1e-9, abs=1e-12), field
    assert summary["fit_error"]["n_positions"] == primary.fit_error["n_positions"]
    sweep = il.read_decode_samples(folder / "samples.csv", key)
    assert len(summary["positions"]) == 3
    for row in summary["positions"]:
        assert row["sweep_median_ms"] == pytest.approx(float(np.median(sweep[row["past_len"]])), rel=1e-12)
        assert row["agree"] == (abs(row["relative_difference"]) <= summary["tolerance"])
    slope = summary["slope"]
    assert slope["fitted_ns_per_token"] == pytest.approx(
        il.fitted_slopes_ns_per_token(primary.decode_knots, primary.decode_values_ms)["overall"], rel=1e-9)
    assert slope["kv_bytes_per_token"] == primary.kv_bytes_per_token
    assert slope["roofline_ns_per_token"] == pytest.approx(slope["kv_bytes_per_token"] / slope["bandwidth_gbps"])
    return summary


@pytest.mark.skipif(not COMMITTED, reason="no GPU run committed yet: benchmarks/gpu/<device>/samples.csv appears "
                    "once a session with a GPU runs benchmarks/gpu/run.sh (see benchmarks/gpu/README.md)")
@pytest.mark.parametrize("samples_csv", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_gpu_run_refits_to_recorded_fit_error(samples_csv: Path) -> None:
    summary = check_result_folder(samples_csv.parent)
    assert summary["provider"] == "cuda"  # a committed run is a GPU run, never a CPU smoke run


def test_gpu_plan_is_the_issue_tier() -> None:
    """configs/gpu.yaml: the ~1B fp16 tier of issue 6, past_len to 32768, a sweep small enough for 5 minutes."""
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.sweep import decode_positions, plan_rows

    plan = load_plan(ROOT / "configs" / "gpu.yaml")
    tier = plan.tier(plan.primary.tier_idx)
    assert (tier.hidden, tier.layers, tier.heads, tier.kv_heads, tier.head_dim, tier.intermediate, tier.vocab) == (
        2048, 16, 32, 8, 64, 8192, 32000)
    assert tier.dtype == "float16" and tier.experts == 1 and tier.max_past_len >= 32768
    assert 0.9e9 < tier.params(plan.primary.num_active_blocks) < 1.2e9
    assert 1 <= len(plan.configs) <= 2
    positions = decode_positions(tier.max_past_len, plan.sweep.decode.log_points, plan.sweep.decode.linear_points)
    assert positions[0] == 1 and positions[-1] == tier.max_past_len and len(positions) >= 20
    rows = plan_rows(tier, plan.sweep)
    steps = sum((plan.sweep.decode.warmup if r.phase == "decode" else plan.sweep.prefill.warmup) + 1 for r in rows)
    assert steps < 3000  # at <= ~10 ms a step on an H100, well under a minute of GPU time
    assert load_plan(ROOT / "configs" / "gpu.yaml", quick=True).configs == plan.configs[:1]


# ------------------------------------------------------------------------------- helpers on a real CPU run


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) `trt-latency calibrate --backend ort-cpu` output folder."""
    from trt_latency.cli import main

    out = tmp_path_factory.mktemp("cpu_run")
    plan = out / "tiny.yaml"
    plan.write_text(TINY_PLAN)
    assert main(["calibrate", str(plan), "--backend", "ort-cpu", "--out", str(out), "--no-replay",
                 "--no-progress"]) == 0
    return out


def test_pure_helpers_on_cpu_calibration(cpu_run: Path) -> None:
    cal = il.read_calibration(cpu_run / "calibration.yaml")
    cfg = il.primary_config(cal)
    key = (cfg["tier_idx"], cfg["top_k"], cfg["num_active_blocks"])
    assert key == (0, 1, 2)
    sweep = il.read_decode_samples(cpu_run / "samples.csv", key)
    # Same rows the project's reader sees: decode, new_tokens 1, this config.
    from trt_latency.estimator.samples import read_samples

    s = read_samples(cpu_run / "samples.csv")
    dec = (s.phase == "decode") & (s.new_tokens == 1)
    assert sorted(sweep) == sorted(int(p) for p in np.unique(s.past_len[dec]))
    assert sum(len(v) for v in sweep.values()) == int(dec.sum())
    assert all(len(v) == 3 for v in sweep.values())  # reps: 3
    positions = il.pick_positions(list(sweep))
    assert positions[0] == min(sweep) and positions[-1] == max(sweep) == 256
    assert positions[1] == 128  # nearest half of 256 among the swept positions

    # Feed the sweep's own samples in as the "independent" medians at the three positions: zero difference.
    independent = {p: {"wall_median_ms": float(np.median(sweep[p])), "reps": len(sweep[p])} for p in positions}
    summary = il.build_summary(device_name="cpu-test", provider="cpu", independent=independent, sweep=sweep,
                               calibration=cal, bandwidth_gbps=20.0, bandwidth_method="given")
    assert summary["all_agree"] and [r["past_len"] for r in summary["positions"]] == positions
    assert all(r["relative_difference"] == 0.0 for r in summary["positions"])
    # 10% slower everywhere: flagged.
    slower = {p: {**v, "wall_median_ms": v["wall_median_ms"] * 1.1} for p, v in independent.items()}
    flagged = il.build_summary(device_name="cpu-test", provider="cpu", independent=slower, sweep=sweep,
                               calibration=cal, bandwidth_gbps=20.0, bandwidth_method="given")
    assert not flagged["all_agree"]
    assert all(r["relative_difference"] == pytest.approx(0.1) for r in flagged["positions"])

    # Slopes: kv bytes per token of the tiny tier = 2 * 2 blocks * 1 kv head * 32 * 4 B = 512.
    slope = summary["slope"]
    assert slope["kv_bytes_per_token"] == 512 == cfg["kv_bytes_per_token"]
    assert slope["roofline_ns_per_token"] == pytest.approx(512 / 20.0)
    knots, values = cfg["decode_knots"], cfg["decode_values_ms"]
    assert slope["fitted_ns_per_token"] == pytest.approx((values[-1] - values[0]) / (knots[-1] - knots[0]) * 1e6)
    assert slope["fitted_over_roofline"] == pytest.approx(slope["fitted_ns_per_token"] / (512 / 20.0))
    assert summary["fit_error"] == {k: cfg["fit_error"][k] for k in ("loo_median_rel", "loo_max_rel", "n_positions")}
    assert "fit leave-one-position-out error" in il.format_summary(summary)


def test_slope_math() -> None:
    assert il.fitted_slopes_ns_per_token([0, 1000, 3000], [1.0, 1.5, 3.5]) == {
        "overall": pytest.approx(2.5 / 3000 * 1e6), "last_segment": pytest.approx(1000.0)}
    assert il.roofline_slope_ns_per_token(32768, 4096.0) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        il.roofline_slope_ns_per_token(1, 0.0)
    med = {1: 1.0, 1024: 2.0, 2048: 3.0, 4096: 5.0}
    assert il.median_slope_ns_per_token(med, 1024) == pytest.approx(1.0 / 1024 * 1e6)
    assert il.median_slope_ns_per_token(med, 4096) is None
    with pytest.raises(ValueError):
        il.pick_positions([1, 2])


@pytest.mark.slow
def test_independent_loop_script_on_cpu(cpu_run: Path, tmp_path: Path) -> None:
    """The whole script path on the CPU provider against the tiny run: real session, real timings."""
    out = tmp_path / "summary"
    rc = il.main(["--run-dir", str(cpu_run), "--provider", "cpu", "--out", str(out), "--reps", "5",
                  "--warmup", "1", "--bandwidth-mib", "16"])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == (0 if summary["all_agree"] else 3)  # agreement itself is a benchmark result, not asserted
    assert summary["provider"] == "cpu" and summary["device_name"]
    assert [r["past_len"] for r in summary["positions"]] == [1, 128, 256]
    for row in summary["positions"]:
        assert row["independent_reps"] == 5 and row["independent_wall_median_ms"] > 0
        assert row["independent_event_median_ms"] is None  # no CUDA events on the CPU provider
    assert summary["slope"]["bandwidth_gbps"] > 0
    assert summary["slope"]["bandwidth_method"].startswith("host copy")
    assert set(summary["independent_samples_ms"]) == {"1", "128", "256"}
    assert il.main(["--show", str(out / "summary.json")]) == 0


@pytest.mark.slow
def test_run_sh_cpu_smoke(tmp_path: Path) -> None:
    """benchmarks/gpu/run.sh end to end with PROVIDER=cpu on the tiny plan: same steps, same output folder."""
    import os
    import subprocess

    plan = tmp_path / "tiny.yaml"
    plan.write_text(TINY_PLAN)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PROVIDER": "cpu",
           "PLAN": str(plan), "SKIP_INSTALL": "1", "PYTHON": sys.executable, "BUDGET_S": "120"}
    proc = subprocess.run(["bash", str(GPU_DIR / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode in (0, 5), log  # 5: all steps ran, medians disagree (CPU timing noise is a result)
    dest = tmp_path / "out" / f"cpu-smoke-{os.uname().machine.replace('_', '-')}"
    assert sorted(p.name for p in dest.iterdir()) == ["calibration.yaml", "decode.png", "run.log", "samples.csv",
                                                      "summary.json"], log
    assert not list((tmp_path / "out").rglob("*.onnx*"))  # models stay in WORK, never in OUT
    summary = check_result_folder(dest)
    assert summary["provider"] == "cpu"
    text = (dest / "run.log").read_text()
    assert "DONE  calibrate" in text and "SKIP cuda-event-check" in text
