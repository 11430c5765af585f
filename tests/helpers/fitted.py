"""A synthetic samples.csv and the calibration `trt-latency fit` makes of it (the CLI tests share them)."""

from __future__ import annotations

import csv
from pathlib import Path

from helpers.fit_data import synthetic_rows
from trt_latency.cli import main
from trt_latency.estimator.samples import SAMPLES_COLUMNS


def write_samples_csv(directory: Path) -> Path:
    path = directory / "samples.csv"
    rows = synthetic_rows(reps=3, configs=((0, 1, 4), (0, 1, 2)))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SAMPLES_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**{c: "" for c in SAMPLES_COLUMNS}, "batch": 1, "backend": "ort-cpu", "device": "cpu", **r})
    return path


def fit_calibration(samples_csv: Path) -> Path:
    out = samples_csv.parent / "calibration.yaml"
    assert main(["fit", str(samples_csv), "-o", str(out)]) == 0
    return out
