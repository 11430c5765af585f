"""Issue 12's serving target, rerunnable: the continuous-batching load test at overload, N runs.

    python benchmarks/batch_loadtest.py -c runs/quick/calibration.yaml --runs 5 --requests 300 --max-batch 8

Runs ``trt-latency loadtest --max-batch B --json`` once per seed (0 .. runs-1; each a new arrival trace and
a new conformal replay on the real engine), prints each run's four policies and whether trt-latency's
policy meets the target: violation_rate <= alpha + 0.02 and goodput_rps >= every other policy's. The
JSON of every run goes to --out (default runs/batch_loadtest/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--calibration", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--out", default="runs/batch_loadtest")
    p.add_argument("extra", nargs="*", help="more loadtest flags (after --)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    met = 0
    for seed in range(args.runs):
        cmd = ["trt-latency", "loadtest", "-c", args.calibration, "--max-batch", str(args.max_batch), "--requests",
               str(args.requests), "--alpha", str(args.alpha), "--seed", str(seed), "--json", *args.extra]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"run {seed}: loadtest failed ({res.returncode}): {res.stderr.strip()}", file=sys.stderr)
            return 1
        (out / f"run{seed}.json").write_text(res.stdout)
        report = json.loads(res.stdout)
        pol = report["policies"]
        ours = pol["trt-latency"]
        best_other = max(v["goodput_rps"] for k, v in pol.items() if k != "trt-latency")
        ok = ours["violation_rate"] <= args.alpha + 0.02 and ours["goodput_rps"] >= best_other
        met += ok
        conf = report.get("conformal") or {}
        print(f"run {seed}: {report['requests']} requests at {report['rate_rps']:.1f} rps "
              f"({report['overload']:.1f}x capacity), factor {report['factor']:.3f} "
              f"(fitted on {conf.get('n_fit')}, held-out coverage at alpha: "
              f"{dict(zip(conf.get('alphas', []), conf.get('heldout_coverage', []), strict=False)).get(args.alpha)})")
        for name, v in pol.items():
            print(f"  {name:17s} goodput_rps {v['goodput_rps']:7.3f}  violation_rate {v['violation_rate']:.3f}  "
                  f"admitted {v['admitted']:3d}  rejected {v['rejected']:3d}  p99_ttft_ms {v['p99_ttft_ms']:8.1f}  "
                  f"p99_tpot_ms {v['p99_tpot_ms']:7.1f}")
        print(f"  -> {'meets' if ok else 'misses'} the target (violation <= {args.alpha + 0.02:.2f}, "
              f"goodput >= {best_other:.3f})")
    print(f"{met} of {args.runs} runs meet the target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
