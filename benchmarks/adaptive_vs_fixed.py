"""Adaptive sweep benchmark (issue 16): calibrate wall time + fit error, and adaptive vs fixed at equal time.

(a) `trt-latency calibrate` with the default plan into a fresh folder, --runs times: wall time (measured
    around the subprocess) and, per config, the leave-one-position-out error (median / max) and the
    precision the sweep reached (from calibration.yaml's fit_error). Targets on the CI machine class
    (2 cores): wall <= 60 s, LOPO median <= 1 %, max <= 3 %.
(b) Per config of the default plan, on one engine and one runner, in the same process: the adaptive sweep
    (sweep.adaptive + the fit's refiner, deadline --budget s) and the fixed plan (every position every
    round) given exactly the adaptive sweep's wall time; both fitted the same way; LOPO side by side.
    Which of the two goes first alternates per config and run (slow machine drift hits both alike).

    python benchmarks/adaptive_vs_fixed.py               # 1 calibrate + 1 side-by-side round, ~4 min
    python benchmarks/adaptive_vs_fixed.py --runs 5      # the issue's five runs
    python benchmarks/adaptive_vs_fixed.py --skip-calibrate --budget 10
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def _pct(v: Any) -> str:
    return f"{100 * float(v):5.2f}%" if isinstance(v, int | float) else "  n/a "


def calibrate_once(work: Path, extra: list[str]) -> tuple[float, list[dict[str, Any]], int, list[str]]:
    from trt_latency.estimator.calibration import load_calibration

    out = work / "calibrate"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "trt_latency", "calibrate", "--out", str(out), "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"calibrate failed with exit code {proc.returncode}")
    cal = load_calibration(out / "calibration.yaml")
    rows = []
    for c in cal.configs:
        fe = c.fit_error
        se = [v for v in fe.get("position_se_rel", []) if isinstance(v, int | float)]
        sd = [v for v in fe.get("position_se_rel_drift", []) if isinstance(v, int | float)]
        rows.append({"config": f"t{c.tier_idx}.k{c.top_k}.b{c.num_active_blocks}",
                     "loo_med": fe.get("loo_median_rel"), "loo_max": fe.get("loo_max_rel"),
                     "se_med": float(np.median(se)) if se else None, "se_max": max(se) if se else None,
                     "sd_med": float(np.median(sd)) if sd else None, "sd_max": max(sd) if sd else None,
                     "within": fe.get("loo_within_2se"), "drift": fe.get("drift_sd_rel"),
                     "reps": sum(fe.get("position_reps", [])), "stops": fe.get("sweep_stop_counts", {})})
    n_samples = sum(1 for _ in (out / "samples.csv").open()) - 1
    # Where the time went: calibrate's own sweep / precision / replay / wall lines.
    keep = ("  sweep ", "    decode precision", "    prefill precision", "  requests ", "  wall time", "  replay ")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(keep)]
    return wall, rows, n_samples, lines


def _lopo(samples_path: Path, key: Any) -> tuple[float, float, int]:
    from trt_latency.estimator.fit import fit_config
    from trt_latency.estimator.samples import read_samples

    cfg, _, _ = fit_config(read_samples(samples_path), tuple(key))
    fe = cfg.fit_error
    return float(fe["loo_median_rel"]), float(fe["loo_max_rel"]), int(fe["n_decode_samples"])


def side_by_side(work: Path, budget: float, run: int) -> list[dict[str, Any]]:
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.export import export_decoder
    from trt_latency.engines.sweep import run_sweep
    from trt_latency.estimator.refine import LopoRefiner

    plan = load_plan()
    fixed_plan = replace(plan, sweep=replace(plan.sweep, adaptive=None))
    results = []
    for i, key in enumerate(plan.configs):
        tier = plan.tier(key.tier_idx)
        folder = work / f"side{run}.{i}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        model = export_decoder(tier, key.top_k, key.num_active_blocks, folder / "model.onnx", seed=plan.sweep.seed)
        with open_runner(model, "ort-cpu", threads=plan.runtime.intra_op_threads,
                         inter_threads=plan.runtime.inter_op_threads, max_past_len=tier.max_past_len,
                         max_new_tokens=tier.max_prefill_len, seed=plan.sweep.seed) as runner:
            runner.time_step(1, 1, 20)  # first-touch of the session and buffers, outside both arms
            order = ("adaptive", "fixed") if (i + run) % 2 == 0 else ("fixed", "adaptive")
            seconds: dict[str, float] = {}
            for arm in order:
                path = folder / f"samples.{arm}.csv"
                if arm == "adaptive":
                    res = run_sweep(runner, key, plan, path, progress=False, refiner=LopoRefiner(),
                                    deadline=time.perf_counter() + budget)
                else:  # the adaptive arm's time when it ran first, else the same budget (it never ends early)
                    limit = seconds.get("adaptive", budget)
                    res = run_sweep(runner, key, fixed_plan, path, progress=False,
                                    deadline=time.perf_counter() + limit)
                seconds[arm] = res.seconds
            if order[0] == "fixed" and seconds["adaptive"] < seconds["fixed"] - 0.5:
                # The adaptive arm finished before its deadline: redo the fixed arm at its exact time.
                path = folder / "samples.fixed.csv"
                path.unlink()
                res = run_sweep(runner, key, fixed_plan, path, progress=False,
                                deadline=time.perf_counter() + seconds["adaptive"])
                seconds["fixed"] = res.seconds
        row: dict[str, Any] = {"config": f"t{key.tier_idx}.k{key.top_k}.b{key.num_active_blocks}",
                               "first": order[0]}
        for arm in ("adaptive", "fixed"):
            med, mx, n = _lopo(folder / f"samples.{arm}.csv", key)
            row[arm] = {"s": seconds[arm], "loo_med": med, "loo_max": mx, "decode_rows": n}
        results.append(row)
        a, f = row["adaptive"], row["fixed"]
        print(f"  run {run} {row['config']:<9} first {order[0]:<8}  adaptive {a['s']:5.1f} s {a['decode_rows']:>5} "
              f"rows LOPO {_pct(a['loo_med'])} / {_pct(a['loo_max'])}   fixed {f['s']:5.1f} s {f['decode_rows']:>5} "
              f"rows LOPO {_pct(f['loo_med'])} / {_pct(f['loo_max'])}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="repetitions of (a) and (b) (default 1)")
    parser.add_argument("--budget", type=float, default=15.0,
                        help="(b): seconds per config for the adaptive sweep; the fixed one gets the same (default 15)")
    parser.add_argument("--skip-calibrate", action="store_true", help="only (b)")
    parser.add_argument("--skip-side-by-side", action="store_true", help="only (a)")
    parser.add_argument("--calibrate-args", default="", help="extra arguments for (a), e.g. '--time-budget 45'")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="adaptive_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_calibrate:
            print("(a) trt-latency calibrate, default plan, fresh folder", flush=True)
            walls = []
            met = total = 0
            for run in range(args.runs):
                wall, rows, n, lines = calibrate_once(work, args.calibrate_args.split())
                walls.append(wall)
                print(f"  run {run}: wall {wall:.1f} s, {n} timed repetitions", flush=True)
                for line in lines:
                    print("   |" + line, flush=True)
                for r in rows:
                    ok = (isinstance(r["loo_med"], float) and isinstance(r["loo_max"], float)
                          and r["loo_med"] <= 0.01 and r["loo_max"] <= 0.03)
                    met, total = met + ok, total + 1
                    print(f"    {r['config']:<9} LOPO median {_pct(r['loo_med'])} max {_pct(r['loo_max'])}"
                          f"{' (target met)' if ok else ''}   SE of medians median {_pct(r['se_med'])} max "
                          f"{_pct(r['se_max'])}, drift divided out {_pct(r['sd_med'])} / {_pct(r['sd_max'])} "
                          f"(drift {_pct(r['drift'])}; {r['within']} misses within 2 SE)   "
                          f"{r['reps']} decode reps, stops {r['stops']}", flush=True)
            print(f"  wall time median {float(np.median(walls)):.1f} s, max {max(walls):.1f} s over {len(walls)} "
                  f"run(s) (target <= 60 s on 2 quiet cores); LOPO median <= 1% and max <= 3% in {met} of {total} "
                  f"config-runs", flush=True)
        if not args.skip_side_by_side:
            print(f"(b) adaptive vs fixed plan at equal wall time ({args.budget:g} s per config), LOPO median / max",
                  flush=True)
            all_rows = []
            for run in range(args.runs):
                all_rows += side_by_side(work, args.budget, run)
            ratio_med = [r["adaptive"]["loo_med"] / r["fixed"]["loo_med"] for r in all_rows if r["fixed"]["loo_med"]]
            ratio_max = [r["adaptive"]["loo_max"] / r["fixed"]["loo_max"] for r in all_rows if r["fixed"]["loo_max"]]
            wins = sum(1 for r in all_rows if r["adaptive"]["loo_max"] <= r["fixed"]["loo_max"])
            print(f"  adaptive / fixed, median over {len(all_rows)} config-runs: LOPO median x"
                  f"{float(np.median(ratio_med)):.2f}, LOPO max x{float(np.median(ratio_max)):.2f}; adaptive max "
                  f"<= fixed max in {wins} of {len(all_rows)}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
