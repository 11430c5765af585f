"""The batch decision's cost with and without the serving-loop terms, side by side in one process.

    python benchmarks/serve_decide_cost.py -c CAL [--running 64] [--rounds 7] [--number 20000]

``serve`` prices the calibration's serving-loop terms (o, c(P), o_p) by folding them into the batch tables
(serving/batch_reference.build_batch_tables), so a decision runs the same arithmetic on shifted numbers.
This times BatchAdmissionController.decide on the engine-only tables (what ``trt-latency bench`` times) and
on the served tables, interleaved round by round, with ``running`` requests in the batch (protect policy),
fresh and after an event (the batch's own finish times recomputed). Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from typing import Any

import numpy as np


def controller(est: Any, running: int, serving: bool) -> Any:
    from trt_latency.serving.batch_admission import BatchAdmissionController, BatchEstimator

    best = BatchEstimator.from_estimator(est, serving=serving)
    ctl = BatchAdmissionController(best, alpha=None, policy="protect", max_batch=running + 1)
    rng = np.random.default_rng(1)
    lo, hi = (int(v) for v in est.calibration.config(*est.config_key()).valid_past_len)
    for i in range(running):
        ctl.started(i, int(rng.integers(max(lo, 1), max(hi // 2, lo + 2))), int(rng.integers(2, 128)),
                    float(rng.uniform(1e3, 1e5)), now=0.0)
    return ctl


def main(argv: list[str] | None = None) -> int:
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--calibration", required=True)
    p.add_argument("--running", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--number", type=int, default=20000)
    args = p.parse_args(argv)
    est = Estimator(load_calibration(args.calibration))
    ctls = {"engine_only": controller(est, args.running, False), "serving_loop": controller(est, args.running, True)}
    prompt, n = 100, 32
    budget = {k: 2.0 * float(c.decide(-1, prompt, n, 1e12, 1.0).predicted_ms) for k, c in ctls.items()}
    times: dict[str, list[float]] = {f"{k}_{w}": [] for k in ctls for w in ("ns", "after_event_ns")}
    for _ in range(args.rounds):
        for k, c in ctls.items():
            g = {"f": c.decide, "p": prompt, "n": n, "b": budget[k], "i": c._state.invalidate if c._state else None}
            times[f"{k}_ns"].append(timeit.timeit("f(-1, p, n, b, 1.0)", globals=g, number=args.number)
                                    / args.number * 1e9)
            if c._state is not None:
                inv = timeit.timeit("i()", globals=g, number=args.number)
                times[f"{k}_after_event_ns"].append((timeit.timeit("i(); f(-1, p, n, b, 1.0)", globals=g,
                                                                   number=args.number) - inv) / args.number * 1e9)
    out: dict[str, Any] = {k: statistics.median(v) for k, v in times.items() if v}
    out["running"] = args.running
    out["compiled"] = ctls["engine_only"]._state is not None
    out["loop_terms"] = list(ctls["serving_loop"].estimator.loop)
    out["ratio_serving_over_engine"] = out["serving_loop_ns"] / out["engine_only_ns"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
