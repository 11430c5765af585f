"""The same decode step on both memory backings, interleaved in one process (issue 24, part 3).

Two runners of one model in one process: first H (``huge_pages=True``: its weights and buffers advised and
collapsed onto 2 MiB pages, engines/hugepages.py), then S (``huge_pages=False``: opened after the collapse,
in fresh mappings, on the ordinary backing: 4 KiB pages under THP ``madvise``). Then rounds of the same
steps, H and S in a shuffled order per (round, position), so that the machine's drift and the other load
fall on both alike. Per position: median step of each, S / H, and the order-statistic spread over rounds.

    python benchmarks/realsize/backing_ab.py tests/data/thirdparty/genai-llama-fp32/model.onnx
    python benchmarks/realsize/backing_ab.py /work/scratch/models/qwen2.5-0.5b-int4/model.onnx --positions 16,1024,4096

The process's AnonHugePages is printed after each runner opens: S adding none confirms that S is on 4 KiB
pages (on THP ``always`` both are on huge pages and the ratio should read 1).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.hugepages import anon_huge_bytes, thp_mode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--positions", default="16,256,1024")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="back-to-back steps per visit; the last is kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the per-position figures here")
    args = ap.parse_args(argv)
    positions = [int(v) for v in args.positions.split(",")]
    opts = dict(threads=args.threads, inter_threads=1, max_past_len=max(positions) + 8)
    before = anon_huge_bytes()
    huge = open_runner(args.model, "ort-cpu", huge_pages=True, **opts)
    after_h = anon_huge_bytes()
    small = open_runner(args.model, "ort-cpu", huge_pages=False, **opts)
    after_s = anon_huge_bytes()
    runners = {"huge": huge, "ordinary": small}
    print(f"THP {thp_mode()}; AnonHugePages: {before >> 20} MiB before, {after_h >> 20} MiB after H opened, "
          f"{after_s >> 20} MiB after S opened")
    print(f"H: {huge.memory}\nS: {small.memory}")
    rng = np.random.default_rng(0)
    vals: dict[str, dict[int, list[float]]] = {k: {p: [] for p in positions} for k in runners}
    for r in runners.values():  # warm both at every position
        for p in positions:
            r.time_step(p, 1, 3)
    for _ in range(args.rounds):
        for p in positions:
            for name in rng.permutation(list(runners)):
                vals[str(name)][p].append(float(runners[str(name)].time_step(p, 1, args.steps)[-1]))
    rows = []
    print(f"{'KV':>6} {'huge ms':>9} {'ordinary ms':>12} {'ordinary/huge':>14} {'per-round ratio p10..p90':>26}")
    for p in positions:
        h, s = np.asarray(vals["huge"][p]), np.asarray(vals["ordinary"][p])
        ratio = s / h  # same round, adjacent in time
        rows.append({"kv": p, "huge_ms": float(np.median(h)), "ordinary_ms": float(np.median(s)),
                     "ratio": float(np.median(s) / np.median(h)), "ratio_p10": float(np.percentile(ratio, 10)),
                     "ratio_p90": float(np.percentile(ratio, 90))})
        r = rows[-1]
        print(f"{p:>6} {r['huge_ms']:>9.3f} {r['ordinary_ms']:>12.3f} {r['ratio']:>14.3f} "
              f"{r['ratio_p10']:>12.3f} .. {r['ratio_p90']:.3f}")
    for r in runners.values():
        r.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "thp": thp_mode(), "anon_huge_mib": [before >> 20, after_h >> 20,
                       after_s >> 20], "memory": {"huge": huge.memory, "ordinary": small.memory},
                       "rounds": args.rounds, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
