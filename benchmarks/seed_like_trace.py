"""A synthetic request log shaped like the seed's production trace, with a slow first decode step.

Stated model (every number is a flag; defaults put decode near the seed's 25-45 ms/token):

    P = vision + text tokens        vision in {0, 256, 576} (p = .3, .3, .4), text ~ U[16, 512]
    n = output tokens               log-uniform on [2, 64]
    TTFT  = (a + b P) * (1 + e_p)   e_p ~ N(0, prefill_noise)
    step j (j = 0 .. n-2, KV length P + j):
          s * (t0 + t1 (P + j) + [j == 0] first + e_j)   e_j ~ N(0, step_noise) per step,
                                                         s ~ logNormal(0, request_spread) per request (load)
    total = TTFT + sum of the steps

So the first decode step after the prefill costs ``--first-step-ms`` more (a warm-up / shape-change
transient, what the CPU replay shows; negative values give a fast first step), later steps grow with
the KV length, and requests differ in speed. Writes REQUESTS.csv (the request-log format) and prints
the seed-style table (decode ms/token per output-length bucket) of what it wrote.

    python benchmarks/seed_like_trace.py --out /tmp/seed_like.csv
    trt-latency compare /tmp/seed_like.csv --alpha 0.05
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from trt_latency.diagnostics.buckets import BUCKETS, in_bucket


def generate(n_requests: int, seed: int = 0, a: float = 60.0, b: float = 0.08, t0: float = 30.0, t1: float = 0.01,
             first: float = 25.0, step_noise: float = 4.0, request_spread: float = 0.08,
             prefill_noise: float = 0.05, max_output: int = 64) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for i in range(n_requests):
        vision = int(rng.choice([0, 256, 576], p=[0.3, 0.3, 0.4]))
        text = int(rng.integers(16, 513))
        n = int(np.floor(np.exp(rng.uniform(np.log(2), np.log(max_output + 1)))))
        p = vision + text
        ttft = (a + b * p) * (1.0 + rng.normal(0.0, prefill_noise))
        j = np.arange(max(n - 1, 0), dtype=np.float64)
        steps = t0 + t1 * (p + j) + rng.normal(0.0, step_noise, j.size)
        if j.size:
            steps[0] += first
        speed = float(np.exp(rng.normal(0.0, request_spread)))
        total = ttft + speed * float(np.maximum(steps, 0.1).sum())
        rows.append({"request_id": i, "vision_tokens": vision, "text_tokens": text, "output_tokens": n,
                     "tier_idx": 0, "top_k": 1, "num_active_blocks": 0, "ttft_ms": round(float(ttft), 4),
                     "total_ms": round(total, 4)})
    return rows


def seed_table(rows: list[dict[str, object]]) -> str:
    n = np.array([int(r["output_tokens"]) for r in rows])  # type: ignore[call-overload]
    rate = np.array([(float(r["total_ms"]) - float(r["ttft_ms"])) / max(int(r["output_tokens"]) - 1, 1)  # type: ignore[arg-type, call-overload]
                     for r in rows])
    lines = ["output tokens      n   decode ms/token   std"]
    for label, lo, hi in BUCKETS:
        mine = in_bucket(n, lo, hi)
        if mine.any():
            lines.append(f"{label:>13} {int(mine.sum()):6d} {rate[mine].mean():17.2f} {rate[mine].std():5.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="request log to write (replaced if it exists)")
    parser.add_argument("-n", "--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-step-ms", type=float, default=25.0, help="extra cost of the first decode step")
    parser.add_argument("--t0", type=float, default=30.0, help="step ms at KV length 0")
    parser.add_argument("--t1", type=float, default=0.01, help="step ms per KV token")
    parser.add_argument("--step-noise", type=float, default=4.0, help="per-step noise std (ms)")
    parser.add_argument("--request-spread", type=float, default=0.08, help="per-request speed spread (log std)")
    args = parser.parse_args()
    from trt_latency.estimator.requests import append_requests

    rows = generate(args.requests, args.seed, t0=args.t0, t1=args.t1, first=args.first_step_ms,
                    step_noise=args.step_noise, request_spread=args.request_spread)
    out = Path(args.out)
    out.unlink(missing_ok=True)
    append_requests(out, rows)
    print(f"wrote {len(rows)} requests to {out}")
    print(seed_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
