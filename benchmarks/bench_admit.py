"""Admission benchmark: `python benchmarks/bench_admit.py [CAL]` (same as `trt-latency bench -c CAL`).

Without CAL it fits a calibration from synthetic samples first (a known piecewise-linear truth),
so the figures can be reproduced on any machine without an engine.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from trt_latency.cli import main


def synthetic_calibration(folder: Path) -> Path:
    import numpy as np

    from trt_latency.estimator.calibration import save_calibration
    from trt_latency.estimator.fit import fit_samples
    from trt_latency.estimator.samples import samples_from_rows

    rng = np.random.default_rng(0)
    rows = []
    for blocks in (2, 4):
        for past_len in (1, 16, 64, 256, 512, 1024, 1536, 2048, 3072, 4096):
            truth = 0.2 * blocks + 1e-4 * blocks * past_len + 2e-4 * blocks * max(past_len - 1024, 0)
            for rep in range(5):
                rows.append({"num_active_blocks": blocks, "top_k": 1, "phase": "decode", "past_len": past_len,
                             "new_tokens": 1, "rep": rep, "latency_ms": truth * (1 + 0.01 * rng.standard_normal())})
        for s in (8, 64, 256, 1024):
            for rep in range(3):
                rows.append({"num_active_blocks": blocks, "top_k": 1, "phase": "prefill", "past_len": 0,
                             "new_tokens": s, "rep": rep, "latency_ms": 0.1 * blocks + 0.002 * blocks * s})
    path = folder / "calibration.yaml"
    save_calibration(fit_samples(samples_from_rows(rows, source="synthetic")), path)
    return path


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(["bench", "-c", *sys.argv[1:]]))
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(["bench", "-c", str(synthetic_calibration(Path(tmp)))]))
