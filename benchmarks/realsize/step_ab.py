"""Our decode step and genai's ``generate_next_token``, interleaved in one process, at long KV.

The realsize runs read the step at KV 4096 low on one VM in every run (results.md, fifth pass), while KV
16-1024 scattered around 0. This separates the two curves from the processes they ran in: one process holds
our runner (``open_runner(..., "ort-cpu")``, ordinary backing, as calibrate opens it by default) and genai's
``og.Model`` with one ``Generator`` per KV length, each grown by a real prefill of that many tokens; then
rounds in which each length is stepped on both sides in a random order (ours: the last of three back-to-back
``time_step(L, 1, 3)``, as the sweep keeps a step after its warm-up; genai: one ``generate_next_token``, its
KV growing by one per round).

    python benchmarks/realsize/step_ab.py /work/scratch/models/qwen2.5-0.5b-int4 --positions 1024,4096
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import onnxruntime_genai as og

    from trt_latency.engines.backends import open_runner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="genai model folder (make_models.py): model.onnx and genai_config.json")
    ap.add_argument("--positions", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    positions = [int(v) for v in args.positions.split(",")]
    runner = open_runner(f"{args.model_dir}/model.onnx", "ort-cpu", threads=1, inter_threads=1,
                         max_past_len=max(positions) + args.rounds + 8)
    cfg = og.Config(args.model_dir)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                      "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    vocab = int(json.load(open(f"{args.model_dir}/genai_config.json"))["model"]["vocab_size"])
    generators = {}
    for L in positions:  # a real prefill of L tokens, then the selection of its pending logits
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=L + args.rounds + 8, min_length=L + args.rounds + 8, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(np.random.default_rng(L).integers(4, vocab, L).astype(np.int32))
        g.generate_next_token()
        generators[L] = g
        runner.time_step(L, 1, 3)

    def genai_ms(L: int) -> float:
        t = time.perf_counter()
        generators[L].generate_next_token()
        return (time.perf_counter() - t) * 1e3

    res: dict[int, dict[str, list[float]]] = {L: {"ours": [], "genai": []} for L in positions}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for L in positions:
            for side in rng.permutation(["ours", "genai"]):
                res[L][str(side)].append(float(runner.time_step(L, 1, 3)[-1]) if side == "ours" else genai_ms(L))
    for L in positions:
        o, g = float(np.median(res[L]["ours"])), float(np.median(res[L]["genai"]))
        print(f"KV {L}: ours {o:.2f} ms, genai {g:.2f} ms, ours/genai {o / g:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
