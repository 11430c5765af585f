"""Before/after: `trt-latency bench --json` of two installs, interleaved in one run, medians side by side.

    python benchmarks/compare_builds.py CAL BEFORE_PYTHON AFTER_PYTHON [--pairs 3] [--rounds 5]

BEFORE_PYTHON / AFTER_PYTHON are the interpreters of two environments with trt-latency installed
(e.g. a checkout of main and this branch, each built). Runs alternate (before, after, before, ...)
so a machine shared with other work slows both alike; each figure is the median over the pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

FIGURES = ("cython_ns", "bare_python_ns", "batch_decisions_per_s", "batch_decisions_per_cpu_s", "decide_ns",
           "decide_bare_python_ns", "choose_ns")  # fmt: skip


def bench(python: str, cal: str, rounds: int) -> dict:
    code = "import sys; from trt_latency.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([python, "-c", code, "bench", "-c", cal, "--rounds", str(rounds), "--json"],
                         check=True, capture_output=True, text=True, cwd="/").stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calibration")
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.pairs):
        runs["before"].append(bench(args.before, args.calibration, args.rounds))
        runs["after"].append(bench(args.after, args.calibration, args.rounds))
    print(f"{'figure':28s} {'before':>14s} {'after':>14s} {'after/before':>12s}")
    for name in FIGURES:
        vals = {k: [r[name] for r in v if r.get(name) is not None] for k, v in runs.items()}
        if not vals["after"]:
            continue
        b = statistics.median(vals["before"]) if vals["before"] else None
        a = statistics.median(vals["after"])
        ratio = f"{a / b:12.3f}" if b else f"{'n/a':>12s}"
        print(f"{name:28s} {b if b is not None else float('nan'):14.1f} {a:14.1f} {ratio}")
    print(f"decide_threshold_online: before {runs['before'][0]['decide_threshold_online']}, "
          f"after {runs['after'][0]['decide_threshold_online']}")


if __name__ == "__main__":
    main()
