"""Where the sweep's noise and bias come from on a CPU: page backing and visit order (issue 16).

Benchmark only (never run in CI). Two measurements on one model (default: the plan's primary model,
exported into --out if missing), ONNX Runtime CPU provider, one intra-op thread:

1. Page backing. A fresh process per backing (huge pages are a property of the process): back-to-back
   steps at KV 1 / 1024 / 4096, runner opened with huge_pages False (4 KiB pages) and True
   (engines/hugepages.py). Median and robust sd (1.4826 MAD / median) of 500 steps after 50 warm ones.
2. Visit order. In one process (huge pages on), blocks of --block rounds alternate between a shuffled
   order and the serpentine walk (engines/sweep.serpentine), one warm-up + one timed run per visit as the
   sweep does. Per position: the median over visits divided by the back-to-back median at that position
   (what a serving engine's consecutive decode steps see), and the order-statistic SE of the median.

    python benchmarks/sweep_noise.py --rounds 80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _robust_sd(x: np.ndarray) -> float:
    med = float(np.median(x))
    return 1.4826 * float(np.median(np.abs(x - med))) / med


def _back_to_back(model: str, huge: bool) -> dict[str, list[float]]:
    from trt_latency.engines.backends import open_runner

    out: dict[str, list[float]] = {}
    with open_runner(model, "ort-cpu", threads=1, inter_threads=1, huge_pages=huge) as runner:
        for past in (1, 1024, 4096):
            x = runner.time_step(past, 1, 550)[50:]
            out[str(past)] = [float(np.median(x)), _robust_sd(x)]
        out["memory"] = [0.0, 0.0]
        print(json.dumps({"memory": runner.memory, "rows": out}))
    return out


def _orders(model: str, rounds: int, block: int) -> None:
    from trt_latency.engines.adaptive import median_se_rel
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.sweep import decode_positions, serpentine

    rng = np.random.default_rng(0)
    with open_runner(model, "ort-cpu", threads=1, inter_threads=1, huge_pages=True) as runner:
        positions = decode_positions(runner.max_past_len, 12, 12)
        shapes = [("decode", p, 1) for p in positions]
        vals: dict[str, dict[int, list[float]]] = {"shuffled": {p: [] for p in positions},
                                                    "serpentine": {p: [] for p in positions}}
        t0 = time.perf_counter()
        for k in range(rounds):
            order = "shuffled" if (k // block) % 2 == 0 else "serpentine"
            seq = ([shapes[i] for i in rng.permutation(len(shapes))] if order == "shuffled"
                   else serpentine(shapes, k, lambda s: s))
            for _, past, _ in seq:
                vals[order][past].append(float(runner.time_step(past, 1, 2)[-1]))
        b2b = np.array([np.median(runner.time_step(p, 1, 80)[30:]) for p in positions])
        wall = time.perf_counter() - t0
    print(f"# visit order: {rounds} rounds in blocks of {block}, huge pages on, {wall:.0f} s; "
          "ratio = median over visits / back-to-back median at the same position")
    print("past_len  b2b_ms   " + "  ".join(f"{o}_ratio {o}_se%" for o in vals))
    ratios: dict[str, list[float]] = {o: [] for o in vals}
    ses: dict[str, list[float]] = {o: [] for o in vals}
    for i, p in enumerate(positions):
        cells = []
        for o in vals:
            v = np.asarray(vals[o][p])
            ratios[o].append(float(np.median(v)) / b2b[i])
            ses[o].append(100 * median_se_rel(v))
            cells.append(f"{ratios[o][-1]:14.2f} {ses[o][-1]:12.2f}")
        print(f"{p:8d} {b2b[i]:7.3f}   " + "  ".join(cells))
    for o in vals:
        r = np.asarray(ratios[o])
        print(f"{o:10s}: ratio to back-to-back median {np.median(r):.2f} (KV <= 93: {np.median(r[:8]):.2f}), "
              f"SE of the median: median {np.median(ses[o]):.2f}%, max {np.max(ses[o]):.2f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="ONNX decoder (default: the plan's primary model in --out)")
    ap.add_argument("--out", default="runs/sweep_noise", help="where the default model is exported")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--block", type=int, default=10, help="rounds per order block (orders alternate)")
    ap.add_argument("--child", choices=("4k", "huge"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from trt_latency.cli.export import ensure_model
        from trt_latency.engines.config import load_plan
        from trt_latency.pipeline import model_path

        plan = load_plan(None)
        key = plan.configs[0]
        model = str(ensure_model(model_path(Path(args.out), key, primary=True), plan.tier(key.tier_idx), key))
    if args.child:
        _back_to_back(model, args.child == "huge")
        return 0
    print("# page backing: back-to-back steps, 500 after 50 warm ones, a fresh process per backing")
    print("backing            past_len  median_ms  robust_sd")
    for child in ("4k", "huge", "4k", "huge"):
        res = subprocess.run([sys.executable, __file__, "--model", model, "--child", child],
                             capture_output=True, text=True, check=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        for past, (med, sd) in rec["rows"].items():
            if past != "memory":
                print(f"{child:6s} {rec['memory'][:40]:40s} {past:>6s} {med:9.3f} {100 * sd:8.1f}%")
    _orders(model, args.rounds, args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
