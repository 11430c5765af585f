"""Is a process's decode step drawn when it loads the model? The same model loaded K times in one process.

docs/decisions.md 14 (why the replay runs in fresh processes) quotes this script's output:

    python benchmarks/realsize/load_order.py MODEL_DIR --runtime ort   [--models 4] [--huge-pages]
    python benchmarks/realsize/load_order.py MODEL_DIR --runtime genai [--models 4] [--backing-from CAL]

``ort``: K trt-latency OrtRunners (one ONNX Runtime session each, 1 thread) on MODEL_DIR/model.onnx, each
timed at KV 16, 1024 and 4096 (synthetic KV, the sweep's own ``time_step``), in interleaved rounds so the
host's drift falls on every model alike. ``genai``: K ``og.Model`` of the genai folder, each running short
generators (a 16-token prompt, then 12 timed ``generate_next_token`` at KV 17-28), interleaved the same
way. It prints the median step per model, in load order. Run it in the genai scratch venv (setup.sh); the
numbers are this host's at this minute: rerun it twice before reading anything into one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def ort_models(model: Path, k: int, huge_pages: bool, rounds: int) -> None:
    from trt_latency.engines.ort.runner import OrtRunner

    runners = []
    for i in range(k):
        t = time.perf_counter()
        runners.append(OrtRunner(model / "model.onnx", intra_op_threads=1, inter_op_threads=1, max_past_len=4104,
                                 max_new_tokens=1024, huge_pages=huge_pages))
        print(f"load {i}: {time.perf_counter() - t:.2f} s, {runners[-1].memory}", flush=True)
    positions = (16, 1024, 4096)
    res: dict[tuple[int, int], list[float]] = {(i, p): [] for i in range(k) for p in positions}
    for r in runners:
        r.time_step(16, 1, 3)
    for _ in range(rounds):
        for i, r in enumerate(runners):
            for p in positions:
                res[(i, p)].extend(r.time_step(p, 1, 3).tolist())
    for p in positions:
        print(f"KV {p}: " + " / ".join(f"{np.median(res[(i, p)]):.2f}" for i in range(k)) + " ms (load order)")


def genai_models(model: Path, k: int, backing_from: str | None, rounds: int) -> None:
    import onnxruntime_genai as og

    models = []
    for i in range(k):
        t = time.perf_counter()
        config = og.Config(str(model))
        config.clear_providers()
        config.overlay('{"model": {"decoder": {"session_options": {"intra_op_num_threads": 1, '
                       '"inter_op_num_threads": 1}}}}')
        models.append(og.Model(config))
        print(f"load {i}: {time.perf_counter() - t:.2f} s", flush=True)
    if backing_from:
        from trt_latency import apply_backing

        print(apply_backing(backing_from).describe())
    rng = np.random.default_rng(0)
    res: dict[int, list[float]] = {i: [] for i in range(k)}
    for _ in range(rounds):
        for i, m in enumerate(models):
            params = og.GeneratorParams(m)
            params.set_search_options(max_length=60, min_length=60, do_sample=False)
            g = og.Generator(m, params)
            g.append_tokens(rng.integers(4, 150000, 16).astype(np.int32))
            g.generate_next_token()
            for _ in range(12):
                t0 = time.perf_counter_ns()
                g.generate_next_token()
                res[i].append((time.perf_counter_ns() - t0) / 1e6)
            del g
    print("KV 17-28: " + " / ".join(f"{np.median(res[i]):.2f}" for i in range(k)) + " ms (load order)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a genai model folder (make_models.py): model.onnx + genai_config.json")
    ap.add_argument("--runtime", choices=("ort", "genai"), default="ort")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--huge-pages", action="store_true", help="ort: the runners' huge-page backing")
    ap.add_argument("--backing-from", metavar="CAL", help="genai: trt_latency.apply_backing(CAL) after loading")
    args = ap.parse_args(argv)
    if args.runtime == "ort":
        ort_models(args.model, args.models, args.huge_pages, args.rounds)
    else:
        genai_models(args.model, args.models, args.backing_from, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
