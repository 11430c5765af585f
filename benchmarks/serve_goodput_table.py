"""Tabulate benchmarks/serve_goodput.sh from aiperf's own JSON exports (profile_export_aiperf.json per run).

    python benchmarks/serve_goodput_table.py RUNS_DIR [--slo slo.txt] [--alpha 0.05]
    python benchmarks/serve_goodput_table.py --capacity DIR [DIR ...] --ttft-x 2 --lat-x 1.5   # -> "cap ttft lat"
    python benchmarks/serve_goodput_table.py --predicted-capacity CAL --max-batch 8 --isl 32 --osl 32  # -> "cap"
    python benchmarks/serve_goodput_table.py --attainment DIR    # -> the share of completed requests within every SLO

--capacity: the median over the closed-loop runs given (request throughput, and TTFT_X / LAT_X x the p50 TTFT
and request latency), each run's figures on stderr: one run is at the mercy of a shared machine's load.
--predicted-capacity: what the calibration (engine + its serving-loop terms) predicts a full batch sustains:
per request one prefill stall (prefill + o_p + c) plus its 1/B share of OSL - 1 batched decode steps
T(B, X at the mean KV length) + o. A cross-check of the measured capacity (HTTP and the client come on top).

Per run (RUNS_DIR/<load>x-<mode>/): goodput (aiperf's, DistServe's definition: completed requests within every
SLO per second), completed, rejected (aiperf's error count: the server's 429s), the violation share among
completed (1 - good / completed), p50/p99 TTFT and ITL; then the done-when checks of issue 25. With repeats
(RUNS_DIR/rep<r>/<load>x-<mode>/, serve_goodput.sh's REPEATS): each repeat's table, the median (min .. max) of
each figure over the repeats, and each check on the median of its per-repeat figure (goodput as the ratio to
the baseline run on the same trace in the same repeat), with how many repeats passed it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def export(run: Path) -> dict[str, Any]:
    found = sorted(run.rglob("profile_export_aiperf.json"))
    if not found:
        raise SystemExit(f"{run}: no profile_export_aiperf.json (did aiperf run? see {run}.log)")
    return json.loads(found[0].read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def stat(d: dict[str, Any], name: str, key: str = "avg") -> float | None:
    v = d.get(name)
    return float(v[key]) if isinstance(v, dict) and v.get(key) is not None else None


def row(d: dict[str, Any]) -> dict[str, Any]:
    duration = stat(d, "benchmark_duration") or float("nan")
    completed = stat(d, "request_count") or 0.0
    goodput = stat(d, "goodput")
    # aiperf's own count of requests that met every SLO; goodput x duration only where it is missing (their
    # product is off by aiperf's rounding: 0.080 for 13 of 173 late, 0.075)
    good = stat(d, "good_request_count")
    if good is None:
        good = goodput * duration if goodput is not None else None
    return {"goodput": goodput, "completed": completed, "rejected": stat(d, "error_request_count") or 0.0,
            "violations": (1.0 - good / completed) if good is not None and completed else None,
            "ttft_p50": stat(d, "time_to_first_token", "p50"), "ttft_p99": stat(d, "time_to_first_token", "p99"),
            "itl_p50": stat(d, "inter_token_latency", "p50"), "itl_p99": stat(d, "inter_token_latency", "p99"),
            "duration": duration}


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def measured_capacity(dirs: list[Path], ttft_x: float, lat_x: float) -> tuple[float, float, float]:
    runs = []
    for run in dirs:
        d = export(run)
        cap = stat(d, "request_throughput")
        ttft, lat = stat(d, "time_to_first_token", "p50"), stat(d, "request_latency", "p50")
        if cap is None or ttft is None or lat is None:
            raise SystemExit(f"{run}: no request_throughput / p50 TTFT / p50 request_latency")
        print(f"{run.name}: {cap:.3f} req/s, p50 TTFT {ttft:.1f} ms, p50 request latency {lat:.1f} ms", file=sys.stderr)
        runs.append((cap, ttft, lat))
    return (median([r[0] for r in runs]), ttft_x * median([r[1] for r in runs]), lat_x * median([r[2] for r in runs]))


def predicted_capacity(cal: Path, max_batch: int, isl: int, osl: int) -> float:
    """Requests per second a full batch of max_batch sustains by the calibration's serving model."""
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving.batch_admission import BatchEstimator

    est = BatchEstimator.from_estimator(Estimator(load_calibration(cal)), serving=True)
    step = est.step_ms([isl + osl / 2.0] * max_batch) + est.loop[0]
    per_request_ms = est.prefill_ms(isl) + (osl - 1) * step / max_batch
    return 1e3 / per_request_ms


def runs_of(d: Path) -> dict[str, dict[str, Any]]:
    """RUN_DIR/<load>x-<mode>/ -> its row, by "<load>x-<mode>"."""
    return {r.name: row(export(r)) for r in sorted(d.iterdir()) if r.is_dir()}


def table(rows: dict[str, dict[str, Any]], title: str = "") -> None:
    print(f"{title}| load | admission | goodput (req/s) | completed | rejected | violations among completed | "
          "TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        load, mode = name.split("-", 1)
        print(f"| {load} | {mode} | {fmt(r['goodput'])} | {fmt(int(r['completed']))} | {fmt(int(r['rejected']))} | "
              f"{fmt(r['violations'], 3)} | {fmt(r['ttft_p50'], 1)} / {fmt(r['ttft_p99'], 1)} | "
              f"{fmt(r['itl_p50'], 2)} / {fmt(r['itl_p99'], 2)} |")
    print()


Check = tuple[str, Callable[[dict[str, dict[str, Any]]], float], Callable[[float], bool]]


def goodput_ratio(a: str, b: str) -> Callable[[dict[str, dict[str, Any]]], float]:
    """trt-latency's goodput over a baseline's on the same trace (a paired ratio)."""
    def read(rows: dict[str, dict[str, Any]]) -> float:
        ga, gb = (rows.get(n, {}).get("goodput") for n in (a, b))
        if ga is None or gb is None:
            return float("nan")
        return float(ga) / float(gb) if gb > 0 else (float("inf") if ga > 0 else float("nan"))
    return read


def late_share(rows: dict[str, dict[str, Any]]) -> float:
    v = rows.get("2x-trt-latency", {}).get("violations")
    return 1.0 if v is None else float(v)


def checks(alpha: float) -> list[Check]:
    """Issue 25's done-when checks: (text, the figure a set of runs reads, the figure passes)."""
    return [
        ("2x: trt-latency goodput >= 1.5 x none", goodput_ratio("2x-trt-latency", "2x-none"), lambda v: v >= 1.5),
        ("2x: trt-latency goodput > seed-1.3", goodput_ratio("2x-trt-latency", "2x-seed-1.3"), lambda v: v > 1.0),
        (f"2x: violations among admitted <= alpha + 0.03 = {alpha + 0.03:.2f}", late_share,
         lambda v: v <= alpha + 0.03),
        ("1x: trt-latency goodput >= 0.95 x none", goodput_ratio("1x-trt-latency", "1x-none"), lambda v: v >= 0.95),
    ]


def summary(sets: list[tuple[str, dict[str, dict[str, Any]]]], alpha: float) -> None:
    """The median over the repeats of each run's figures, then each check on the median of its per-repeat
    figure (a goodput ratio is paired within a repeat: the same trace, minutes apart at most)."""
    print(f"Median over {len(sets)} repeats (min .. max):\n")
    print("| load | admission | goodput (req/s) | rejected | violations among completed | TTFT p99 (ms) |")
    print("|---|---|---|---|---|---|")

    def cell(name: str, key: str, digits: int) -> str:
        v = [float(rows[name][key]) for _, rows in sets if rows.get(name, {}).get(key) is not None]
        return f"{median(v):.{digits}f} ({min(v):.{digits}f} .. {max(v):.{digits}f})" if v else "-"

    for name in sets[0][1]:
        load, mode = name.split("-", 1)
        print(f"| {load} | {mode} | {cell(name, 'goodput', 2)} | {cell(name, 'rejected', 0)} | "
              f"{cell(name, 'violations', 3)} | {cell(name, 'ttft_p99', 1)} |")
    print()
    for text, figure, passes in checks(alpha):
        values = [figure(rows) for _, rows in sets]
        read = [v for v in values if not math.isnan(v)]  # nan: a repeat without one of the two runs
        if not read:
            print(f"- not run: {text} (MODES left a mode out)")
            continue
        m = median(read)
        alone = sum(passes(v) for v in read)
        print(f"- {'PASS' if passes(m) else 'FAIL'}: {text}: median {m:.3f} (repeats "
              f"{', '.join(f'{v:.3f}' for v in values)}; {alone} of {len(read)} passed alone)")

def fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="?")
    p.add_argument("--capacity", type=Path, nargs="+")
    p.add_argument("--predicted-capacity", type=Path, metavar="CAL")
    p.add_argument("--attainment", type=Path, metavar="DIR")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--isl", type=int, default=32)
    p.add_argument("--osl", type=int, default=32)
    p.add_argument("--ttft-x", type=float, default=2.0)
    p.add_argument("--lat-x", type=float, default=1.5)
    p.add_argument("--slo", type=Path)
    p.add_argument("--alpha", type=float, default=0.05)
    args = p.parse_args(argv)
    if args.predicted_capacity is not None:
        print(f"{predicted_capacity(args.predicted_capacity, args.max_batch, args.isl, args.osl):.3f}")
        return 0
    if args.attainment is not None:  # SLO attainment of one run (aiperf's good_request_count / completed)
        r = row(export(args.attainment))
        if r["violations"] is None:
            raise SystemExit(f"{args.attainment}: no good_request_count (was aiperf run with --goodput?)")
        print(f"{1.0 - r['violations']:.4f}")
        return 0
    if args.capacity is not None:
        cap, ttft, lat = measured_capacity(args.capacity, args.ttft_x, args.lat_x)
        print(f"{cap:.3f} {ttft:.1f} {lat:.1f}")
        return 0
    if not args.runs:
        p.error("RUNS_DIR or --capacity")
    runs = Path(args.runs)
    reps = sorted((d for d in runs.iterdir() if d.is_dir() and d.name.startswith("rep")), key=lambda d: int(d.name[3:]))
    sets = [(d.name, runs_of(d)) for d in reps] if reps else [("", runs_of(runs))]
    if args.slo is not None and args.slo.is_file():
        print(args.slo.read_text(encoding="utf-8").strip() + "\n")
    for name, rows in sets:
        table(rows, f"{name}: " if name else "")
    if len(sets) > 1:
        summary(sets, args.alpha)
    else:
        for text, figure, passes in checks(args.alpha):
            v = figure(sets[0][1])
            print(f"- {'PASS' if passes(v) else 'FAIL'}: {text} (reads {v:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
