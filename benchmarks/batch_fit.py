"""Batch fit benchmark: how well T(B, X) predicts batched decode steps it was not fitted on.

    python benchmarks/batch_fit.py [--config PLAN] [--out DIR] [--reps N] [--json]

On the plan's primary config (the reference decoder, exported) it runs the quick decode sweep and the
plan's full batch sweep (configs/default.yaml: batch sizes 1, 2, 4, 8; uniform and ragged batches) into
DIR/samples.csv (resumable: a rerun measures only what is missing), fits the calibration and reports

- leave-one-batch-size-out (LOBO): each size B > 1 predicted from the others by the contract's
  interpolation rule (the largest size extrapolated from the two below it), median and max over its
  uniform-batch medians, overall and per size;
- leave-one-position-out (LOPO) inside each size's curve;
- ragged batches (timed, never fitted): measured median vs T(B, X) per shape, median and max error, and
  how many are within the 10% target.

The load average is printed with the numbers: on a shared machine the per-visit noise (15-20%) sets
the floor of every held-out error here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def measure(config: str | None, out: Path, reps: int | None, progress: bool) -> tuple[Any, Any, str]:
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.batch_sweep import run_batch_sweep
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.export import export_decoder
    from trt_latency.engines.sweep import run_sweep

    full = load_plan(config)
    if full.batch is None:
        raise SystemExit(f"{full.source}: the plan has no batch block")
    plan = replace(load_plan(config, quick=True), batch=full.batch if reps is None else replace(full.batch, reps=reps))
    key = plan.primary
    tier = plan.tier(key.tier_idx)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model.onnx"
    if not model.is_file():
        export_decoder(tier, key.top_k, key.num_active_blocks, model, seed=plan.sweep.seed)
    samples = out / "samples.csv"
    assert plan.batch is not None
    with open_runner(model, "ort-cpu", threads=plan.runtime.intra_op_threads,
                     inter_threads=plan.runtime.inter_op_threads, max_past_len=tier.max_past_len,
                     max_new_tokens=tier.max_prefill_len, seed=plan.sweep.seed,
                     max_batch=max(plan.batch.sizes)) as runner:
        run_sweep(runner, key, plan, samples, progress=progress)
        run_batch_sweep(runner, key, plan, samples, progress=progress)
        kv_read = str(runner.batch_kv_read)  # type: ignore[attr-defined]
        device = f"{runner.backend} on {runner.device}"
    from trt_latency.estimator.fit import fit_samples
    from trt_latency.estimator.samples import read_samples

    s = read_samples(samples)
    return s, fit_samples(s, batch_kv_read=kv_read), device


def report(samples: Any, cal: Any) -> dict[str, Any]:
    from trt_latency.estimator.batch_fit import _predict, batch_rows

    cfg = cal.configs[0]
    section = cfg.batch
    err = dict(section["fit_error"])
    m = batch_rows(samples, cfg.key)
    b = samples.batch[m]
    kv_max, kv_total = np.asarray(samples.kv_max)[m], np.asarray(samples.kv_total)[m]
    x = kv_total if section["kv_read"] == "packed" else b * kv_max
    lat = samples.latency_ms[m]
    ragged = []
    for row in np.unique(np.stack([b, kv_max, kv_total], axis=1), axis=0):
        if row[2] == row[0] * row[1]:
            continue
        sel = (b == row[0]) & (kv_max == row[1]) & (kv_total == row[2])
        med = float(np.median(lat[sel]))
        pred = _predict(section, int(row[0]), float(x[sel][0]))
        ragged.append({"batch": int(row[0]), "kv_max": int(row[1]), "kv_total": int(row[2]),
                       "x": float(x[sel][0]), "reps": int(sel.sum()), "measured_ms": med, "predicted_ms": pred,
                       "rel_err": pred / med - 1.0})
    within = sum(1 for r in ragged if abs(r["rel_err"]) <= 0.10)
    return {"config": list(cfg.key), "kv_read": section["kv_read"], "sizes": section["sizes"],
            "lobo_median_rel": err.get("lobo_median_rel"), "lobo_max_rel": err.get("lobo_max_rel"),
            "lobo_by_size": err.get("lobo_by_size"), "lobo_interpolated_median_rel": err.get("lobo_interpolated_median_rel"),
            "lobo_interpolated_max_rel": err.get("lobo_interpolated_max_rel"), "lopo_median_rel": err.get("lopo_median_rel"),
            "lopo_max_rel": err.get("lopo_max_rel"), "ragged_median_rel": err.get("ragged_median_rel"),
            "ragged_max_rel": err.get("ragged_max_rel"), "ragged_within_10pct": f"{within}/{len(ragged)}",
            "ragged": ragged}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--config", help="plan YAML (default: the packaged configs/default.yaml)")
    ap.add_argument("--out", default="/tmp/trt-latency-batch-fit", help="folder for the model and samples.csv")
    ap.add_argument("--reps", type=int, help="rounds of the batch sweep (default: the plan's)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    samples, cal, device = measure(args.config, Path(args.out), args.reps, progress=not args.json and sys.stderr.isatty())
    rep = report(samples, cal)
    rep.update(device=device, seconds=round(time.perf_counter() - t0, 1),
               load_average=[round(load0, 2), round(os.getloadavg()[0], 2)], cpus=os.cpu_count())
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    from trt_latency.estimator.batch_fit import format_batch_table

    print(f"# {device}; load average {rep['load_average'][0]} -> {rep['load_average'][1]} on {rep['cpus']} CPUs "
          f"({'a busy machine' if max(rep['load_average']) > 1 else 'idle'}); {rep['seconds']} s")
    print(format_batch_table(cal, samples), end="")
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    print(f"LOBO (leave one batch size out): median {pct(rep['lobo_median_rel'])}, max {pct(rep['lobo_max_rel'])}; "
          f"interpolated sizes only (B between two measured sizes): median "
          f"{pct(rep['lobo_interpolated_median_rel'])}, max {pct(rep['lobo_interpolated_max_rel'])}")
    print(f"ragged step-time prediction vs measured: median {pct(rep['ragged_median_rel'])}, max "
          f"{pct(rep['ragged_max_rel'])}; within 10%: {rep['ragged_within_10pct']} shapes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
