"""Our ONNX Runtime prefill and genai's, interleaved in one process, at the same prompt lengths.

Separates the prefill curve (is the calibration's prefill the runtime's?) from the host's level, which moves
between processes and minutes by more than the difference asked about (docs/decisions.md 14). One process:
our runner (``open_runner(..., "ort-cpu")``, as calibrate opens it) and genai's ``og.Model`` at one thread
each, both on huge pages (applied after both have run once, as ``trt_latency.apply_backing`` is); then rounds
over the lengths in a shuffled order, each length timed on both sides in a random order: our
``time_step(0, P, 1)`` (one prefill of P tokens) and genai's ``append_tokens`` of P tokens on a fresh
``Generator``. Per length: the medians, ours / genai, and each side's ms per token.

    python benchmarks/realsize/prefill_ab.py /work/scratch/models/qwen2.5-0.5b-int4 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

LENGTHS = (8, 16, 32, 44, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime_genai as og

    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.hugepages import back_with_huge_pages

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="genai model folder (make_models.py): model.onnx and genai_config.json")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write every timing here")
    args = ap.parse_args(argv)
    lengths = [int(v) for v in args.lengths.split(",")]
    runner = open_runner(f"{args.model_dir}/model.onnx", "ort-cpu", huge_pages=True, threads=1, inter_threads=1,
                         max_past_len=max(lengths) + 64, max_new_tokens=max(lengths))
    cfg = og.Config(args.model_dir)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                      "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    vocab = int(json.load(open(f"{args.model_dir}/genai_config.json"))["model"]["vocab_size"])

    def genai_ms(p: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=p + 4, do_sample=False)
        g = og.Generator(model, params)
        ids = np.random.default_rng(p).integers(4, vocab, p).astype(np.int32)
        t = time.perf_counter()
        g.append_tokens(ids)
        return (time.perf_counter() - t) * 1e3

    for p in (16, max(lengths)):  # both sides' buffers exist before the backing is applied
        runner.time_step(0, p, 1)
        genai_ms(p)
    print(back_with_huge_pages().describe(), flush=True)
    sides = {"ours": lambda p: float(runner.time_step(0, p, 1)[0]), "genai": genai_ms}
    res: dict[int, dict[str, list[float]]] = {p: {"ours": [], "genai": []} for p in lengths}
    rng = np.random.default_rng(0)
    for r in range(args.rounds):
        for p in rng.permutation(lengths):
            for side in rng.permutation(list(sides)):
                res[int(p)][str(side)].append(sides[str(side)](int(p)))
        print(f"round {r + 1} of {args.rounds}", flush=True)
    print(f"{'P':>6} {'ours ms':>9} {'genai ms':>9} {'ours/genai':>11} {'ours/token':>11} {'genai/token':>12}")
    for p in lengths:
        o, g = float(np.median(res[p]["ours"])), float(np.median(res[p]["genai"]))
        print(f"{p:>6} {o:>9.1f} {g:>9.1f} {o / g:>11.3f} {o / p:>11.2f} {g / p:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(p): v for p, v in res.items()}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
