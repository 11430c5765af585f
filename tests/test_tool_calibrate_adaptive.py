"""`trt-latency calibrate --precision/--time-budget`: the sweep's per-position record reaches calibration.yaml."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers.plans import CALIBRATE_PLAN as TINY_PLAN

from trt_latency.cli import main

pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_calibrate_adaptive_records_se_and_stop_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.estimator.calibration import load_calibration

    plan = tmp_path / "tiny.yaml"
    plan.write_text(TINY_PLAN.replace("decode: {log_points: 3, linear_points: 2, reps: 2, warmup: 1}",
                                      "decode: {log_points: 3, linear_points: 2, reps: 12, warmup: 1}"))
    out = tmp_path / "out"
    cmd = ["calibrate", str(plan), "--quick", "--out", str(out), "--backend", "ort-cpu", "--no-progress",
           "--no-replay", "--precision", "0.5", "--time-budget", "120"]
    assert main(cmd) == 0
    text = capsys.readouterr().out
    assert "decode precision: target 50.00%" in text
    fe = load_calibration(out / "calibration.yaml").configs[0].fit_error
    n = fe["n_positions"]
    assert fe["sweep_precision_target"] == 0.5
    assert len(fe["positions"]) == len(fe["position_se_rel"]) == len(fe["position_stop"]) == n
    assert set(fe["position_stop"]) <= {"precision", "max_reps"}
    assert sum(fe["position_reps"]) == fe["n_decode_samples"]
    with (out / "samples.positions.csv").open(newline="") as fh:
        side = list(csv.DictReader(fh))
    assert len(side) == n + len(fe["prefill_lengths"])
    assert main(cmd[:-4] + ["--precision", "2"]) == 1  # a relative SE must be < 1
    assert "--precision" in capsys.readouterr().err
