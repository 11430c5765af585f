"""Before/after: `trt-latency bench --json` of two installs, interleaved in one run, medians side by side.

    python benchmarks/compare_builds.py CAL BEFORE_PYTHON AFTER_PYTHON [--pairs 3] [--rounds 5]

BEFORE_PYTHON / AFTER_PYTHON are the interpreters of two environments with trt-latency installed
(e.g. a checkout of main and this branch, each built). Runs alternate (before, after, before, ...)
so a machine shared with other work slows both alike; each figure is the median over the pairs.
Besides `bench`'s wall-clock figures, each pair also times admit, a live AdmissionController.decide and
choose in CPU time of the process (`*_cpu_ns`, the fastest of 9 rounds, as timeit advises: on a machine
shared with other work, wall clock counts the time the process waits for a core, CPU time does not,
and the fastest round is the one least disturbed); the table shows the median over the pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

FIGURES = ("cython_ns", "admit_cpu_ns", "bare_python_ns", "batch_decisions_per_s", "batch_decisions_per_cpu_s",
           "decide_ns", "decide_cpu_ns", "decide_bare_python_ns", "choose_ns", "choose_cpu_ns")  # fmt: skip

# Runs in either build: the APIs it uses exist before and after issue 10 (Request's home moved).
CPU_TIMES = """
import json, sys, time
import numpy as np
from trt_latency import AdmissionController, Estimator
try:
    from trt_latency.serving.validation import Request
except ImportError:
    from trt_latency.estimator.admission import Request
est = Estimator.load(sys.argv[1])
key = est.configs()[0]
ctl = AdmissionController(est, alpha=0.05)
rng = np.random.default_rng(1)
for _ in range(400):  # the same synthetic traffic as `bench`: the correction and threshold go live
    v, t, n = int(rng.choice([0, 64, 256])), int(rng.integers(8, 257)), int(rng.integers(2, 65))
    p = est.predict(v, t, n, *key)
    noise = float(np.exp(0.08 * rng.standard_normal()))
    r = Request(v, t, n, *key, p.total_ms * float(rng.uniform(0.5, 2.0)))
    if ctl.decide(r).admit:
        ctl.observe(r, p.prefill_ms * noise, p.total_ms * noise)
budget = round(est.predict(64, 100, 64, *key).total_ms * 1.1, 3)
request = Request(64, 100, 64, *key, float(budget))
def cpu_ns(f, *args, number=100000, rounds=9):
    out = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(number):
            f(*args)
        out.append((time.process_time() - t) / number * 1e9)
    return min(out)
res = {"admit_cpu_ns": cpu_ns(est.admit, budget, 64, 100, 64, *key, 0.05), "decide_cpu_ns": cpu_ns(ctl.decide, request)}
if hasattr(est, "choose"):
    cands = [est.preference[i % len(est.preference)] for i in range(8)]
    cheapest = min(est.predict(64, 100, 64, *k).total_ms for k in est.preference)
    res["choose_cpu_ns"] = cpu_ns(est.choose, round(cheapest * 0.5, 3), 64, 100, 64, cands, 0.05, number=25000)
print(json.dumps(res))
"""


def bench(python: str, cal: str, rounds: int) -> dict:
    code = "import sys; from trt_latency.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([python, "-c", code, "bench", "-c", cal, "--rounds", str(rounds), "--json"],
                         check=True, capture_output=True, text=True, cwd="/").stdout  # fmt: skip
    res = json.loads(out.strip().splitlines()[-1])
    cpu = subprocess.run([python, "-c", CPU_TIMES, cal], check=True, capture_output=True, text=True, cwd="/").stdout
    res.update(json.loads(cpu.strip().splitlines()[-1]))
    return res


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
