"""Time held-out requests through onnxruntime-genai's own ``Generator``: the independent side of compare.py.

Runs in its own process, in a venv with onnxruntime-genai (setup.sh), on a genai model folder
(make_models.py). Nothing of trt-latency times anything here; the only trt-latency call is the optional
``--backing-from CAL`` (the documented serving-side call ``trt_latency.apply_backing``), which puts this
process on the calibration's memory backing after the model is loaded, as a serving process would.

    python benchmarks/realsize/time_genai.py MODEL_DIR --out genai.json [--requests 30 --seed 2024]

What is timed (time.perf_counter_ns around genai's own calls, greedy search, EOS masked by min_length):
- requests: a seeded held-out mix, prompts log-uniform in [32, 2048], outputs log-uniform in [2, 128] with a
  quarter of the requests at exactly 2 outputs (their decode part is the first step after the prefill). Per
  request: ``Generator(model, params)`` (create_ms), ``append_tokens(prompt)`` (the prefill: genai runs the
  model here), the first ``generate_next_token()`` (selection from the pending logits, no model run) -> TTFT
  = create + append + first select; then n-1 ``generate_next_token()`` calls, each one model run at KV
  P, P+1, ... plus selection (step_ms). total = TTFT + sum(step_ms).
- sweep: KV positions L (default 16 .. 4096) on one generator grown by ``append_tokens`` of the next chunk
  (the prefill to 4096 is paid once: it is most of the run), the selection (untimed), then
  ``--step-reps + 1`` timed ``generate_next_token()`` at KV about L, L+1, ...: the first is the first step
  after that chunk (first_step_ms; it pays for the chunk's logits), the rest are steady steps (step_ms).
  The first step after a whole prompt's prefill is in the 2-token requests (their decode part).
Threads: a genai_config.json overlay (model.decoder.session_options.intra_op_num_threads /
inter_op_num_threads), default 1 and 1 like calibrate's default plan.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

POSITIONS = (16, 256, 1024, 2048, 4096)


def held_out_mix(n: int, seed: int, prompts: tuple[int, int] = (32, 2048),
                 outputs: tuple[int, int] = (2, 128)) -> list[tuple[int, int]]:
    """(prompt, output) pairs: log-uniform lengths, every 4th request a 2-token one (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    p = np.exp(rng.uniform(np.log(prompts[0]), np.log(prompts[1] + 1), n)).astype(int)
    o = np.exp(rng.uniform(np.log(outputs[0]), np.log(outputs[1] + 1), n)).astype(int)
    o[::4] = 2
    return [(int(a), int(b)) for a, b in zip(np.clip(p, *prompts), np.clip(o, *outputs), strict=True)]


def _ms(t0: int, t1: int) -> float:
    return (t1 - t0) * 1e-6


def _anon_huge_mib() -> int:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) >> 10
    except OSError:
        pass
    return -1


def main(argv: list[str] | None = None) -> int:
    import onnxruntime_genai as og

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="genai model folder (genai_config.json, model.onnx)")
    ap.add_argument("--out", type=Path, required=True, help="JSON written here (and a .csv of the requests)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2024, help="held-out mix seed (calibrate's replay uses its own)")
    ap.add_argument("--positions", default=",".join(map(str, POSITIONS)))
    ap.add_argument("--step-reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="intra_op_num_threads (inter_op is 1)")
    ap.add_argument("--backing-from", metavar="CALIBRATION",
                    help="apply the calibration's memory backing to this process (trt_latency.apply_backing)")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)

    load_start = os.getloadavg()[0]
    cfg = og.Config(str(args.model))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    t0 = time.perf_counter_ns()
    model = og.Model(cfg)
    load_ms = _ms(t0, time.perf_counter_ns())
    gcfg = json.loads((args.model / "genai_config.json").read_text())
    vocab = int(gcfg["model"]["vocab_size"])
    rng = np.random.default_rng(args.seed + 1)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(4, vocab, n).astype(np.int32)

    def generator(max_length: int) -> og.Generator:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False)
        return og.Generator(model, params)

    # warm-up: one small request and one long prefill, untimed (first-call allocations, kernel selection)
    for p, n in ((64, 4), (1024, 2)):
        g = generator(p + n)
        g.append_tokens(tokens(p))
        for _ in range(n):
            g.generate_next_token()
        del g

    backing = None
    if args.backing_from:  # after the weights and the warm-up buffers exist, as a serving process would
        from trt_latency import apply_backing

        backing = apply_backing(args.backing_from).describe()

    requests: list[dict[str, Any]] = []
    for i, (p, n) in enumerate(held_out_mix(args.requests, args.seed)):
        a = time.perf_counter_ns()
        g = generator(p + n)
        b = time.perf_counter_ns()
        g.append_tokens(tokens(p))
        c = time.perf_counter_ns()
        g.generate_next_token()
        d = time.perf_counter_ns()
        steps = []
        for _ in range(n - 1):
            s = time.perf_counter_ns()
            g.generate_next_token()
            steps.append(_ms(s, time.perf_counter_ns()))
        del g
        ttft = _ms(a, d)
        requests.append({"i": i, "prompt": p, "output": n, "create_ms": _ms(a, b), "append_ms": _ms(b, c),
                         "select_ms": _ms(c, d), "ttft_ms": ttft, "total_ms": ttft + sum(steps),
                         "step_ms": steps})
        print(f"request {i}: P={p} n={n} ttft={ttft:.1f} ms total={ttft + sum(steps):.1f} ms", flush=True)

    sweep = []
    if not args.no_sweep:  # one generator grown chunk by chunk: the prefill to 4096 is paid once, not per L
        positions = sorted(int(v) for v in args.positions.split(","))
        g = generator(positions[-1] + (len(positions) + 1) * (args.step_reps + 2))
        kv = 0  # KV length of the next model run: the sequence's length less the pending token
        for L in positions:
            chunk = max(L - kv, 1)
            g.append_tokens(tokens(chunk))  # the prefill of the next chunk (its logits pending)
            g.generate_next_token()  # selection only
            times, kvs = [], []
            for _ in range(args.step_reps + 1):
                kvs.append(len(g.get_sequence(0)) - 1)
                s = time.perf_counter_ns()
                g.generate_next_token()  # one model run at KV kvs[-1] + the selection
                times.append(_ms(s, time.perf_counter_ns()))
            kv = len(g.get_sequence(0))
            sweep.append({"kv": L, "chunk": chunk, "first_step_ms": times[0], "step_ms": times[1:],
                          "step_kv": kvs[1:]})
            print(f"sweep KV {L}: first step after a {chunk}-token chunk {times[0]:.2f} ms, steady median "
                  f"{np.median(times[1:]):.2f} ms", flush=True)
        del g

    result = {
        "model": str(args.model), "threads": args.threads, "seed": args.seed, "load_ms": load_ms,
        "versions": {k: _version(k) for k in ("onnxruntime-genai", "onnxruntime", "numpy")},
        "load_avg": [load_start, os.getloadavg()[0]], "thp": _thp(), "anon_huge_mib": _anon_huge_mib(), "backing": backing or "ordinary (none applied)",
        "requests": requests, "sweep": sweep,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    with args.out.with_suffix(".csv").open("w") as fh:
        fh.write("i,prompt,output,create_ms,append_ms,select_ms,ttft_ms,total_ms\n")
        for r in requests:
            fh.write(",".join(str(round(r[k], 4)) if isinstance(r[k], float) else str(r[k]) for k in
                              ("i", "prompt", "output", "create_ms", "append_ms", "select_ms", "ttft_ms",
                               "total_ms")) + "\n")
    print(f"wrote {args.out} (AnonHugePages {result['anon_huge_mib']} MiB, THP {result['thp']})", flush=True)
    return 0


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return ""


def _thp() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.find("[") + 1:text.find("]")]
    except OSError:
        return "unavailable"


if __name__ == "__main__":
    sys.exit(main())
