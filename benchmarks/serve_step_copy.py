"""The serve engine's batched decode step with and without re-laying the past out every step, side by side.

    python benchmarks/serve_step_copy.py [--batch 8] [--lengths 64,512,2048] [--steps 40] [--rounds 5]
                                         [--hidden 32 --layers 2 --kv-heads 2 --head-dim 8] [--json]

engines/ort/slots.SlotDecoder keeps each request's KV in its own slot. Its first version built every batched
step's past by left-padding each row's whole KV into a fresh [B, kv, max L, D] feed: O(B L) copies per step
on top of the engine call. Now the step feeds the previous step's present back as the past while the batch's
membership is unchanged (``reuse_batch``; a re-layout only when a request joins or leaves). This exports the
tests' tiny decoder (random weights, ORT CPU, 1 thread) with a KV capacity above the longest length, fills B
slots to KV length L with random KV, and times ``decode`` over ``steps`` consecutive steps of the same batch
(each one step longer), both ways, interleaved round by round; it reports the median ms per step of each and
the time of the re-layout alone (the copy the reuse saves). Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _decoder(args: argparse.Namespace, capacity: int, tmp: Path) -> Any:
    from trt_latency.engines.config import TierSpec
    from trt_latency.engines.export import export_decoder
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.engines.ort.slots import SlotDecoder

    tier = TierSpec(tier_idx=0, name="step-copy", hidden=args.hidden, layers=args.layers,
                    heads=2 * args.kv_heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    intermediate=args.hidden * 3 // 2, vocab=512, experts=1, dtype="float32",
                    max_past_len=capacity, max_prefill_len=32)
    runner = OrtRunner(export_decoder(tier, 1, args.layers, tmp / "model.onnx"), "cpu", intra_op_threads=1,
                       huge_pages=False)
    return SlotDecoder(runner, args.batch)


def _fill(dec: Any, length: int, rng: np.random.Generator) -> list[int]:
    """B busy slots at KV length ``length``, random KV and last tokens (the step's cost does not read values)."""
    idx = []
    for _ in range(len(dec.slots)):
        i = dec.acquire()
        s = dec.slots[i]
        for buf in s.kv:
            buf[:, :length] = rng.standard_normal(buf[:, :length].shape).astype(buf.dtype)
        s.length, s.last_token = length, int(rng.integers(1, dec.vocab))
        s.generation += 1
        idx.append(i)
    return idx


def _steps_ms(dec: Any, idx: list[int], length: int, steps: int, reuse: bool) -> float:
    """Median ms of one step over ``steps`` consecutive steps of the same batch, from KV length ``length``."""
    dec.reuse_batch = reuse
    for i in idx:
        dec.slots[i].length = length
        dec.slots[i].generation += 1  # a fresh batch: the first step re-lays out either way
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        dec.decode(idx)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])  # the first step re-lays out in both modes


def _relayout_ms(dec: Any, idx: list[int], length: int, reps: int = 20) -> float:
    """The re-layout alone (zeroed feeds + each row's KV copied in, as a step without reuse builds them)."""
    slots = [dec.slots[i] for i in idx]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        past = [np.zeros((len(slots), dec.sig.kv_heads, length, dec.sig.head_dim), dtype=slots[0].kv[0].dtype)
                for _ in slots[0].kv]
        for r, s in enumerate(slots):
            for j, arr in enumerate(past):
                arr[r] = s.kv[j][:, :length]
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", default="64,512,2048")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lengths = [int(v) for v in args.lengths.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dec = _decoder(args, max(lengths) + args.steps * args.rounds * 2 + 8, Path(tmp))
        idx = _fill(dec, max(lengths), rng)
        for length in lengths:
            before, after = [], []
            for _ in range(args.rounds):  # interleaved: a load change hits both
                before.append(_steps_ms(dec, idx, length, args.steps, reuse=False))
                after.append(_steps_ms(dec, idx, length, args.steps, reuse=True))
            b, a = statistics.median(before), statistics.median(after)
            rows.append({"batch": args.batch, "kv_len": length, "relayout_every_step_ms": b,
                         "reuse_present_ms": a, "speedup": b / a,
                         "relayout_alone_ms": _relayout_ms(dec, idx, length)})
        dec.runner.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"batched decode step, B={args.batch}, tiny decoder (hidden {args.hidden}, {args.layers} layers, "
          f"kv heads {args.kv_heads} x {args.head_dim}), ORT CPU 1 thread; median ms/step of {args.rounds} rounds "
          f"x {args.steps} steps")
    print(f"{'L':>6} {'re-layout every step':>21} {'reuse present':>14} {'speedup':>8} {'re-layout alone':>16}")
    for r in rows:
        print(f"{r['kv_len']:>6} {r['relayout_every_step_ms']:>21.3f} {r['reuse_present_ms']:>14.3f} "
              f"{r['speedup']:>8.2f} {r['relayout_alone_ms']:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
