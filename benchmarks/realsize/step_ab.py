"""Our decode step and genai's ``generate_next_token``, interleaved in one process, at long KV.

The realsize runs read the step at KV 4096 low on one VM in every run (results.md, fifth pass), while KV
16-1024 scattered around 0. This separates the two curves, and the sweep's way of visiting a position, from
the processes they ran in: one process holds our runner (``open_runner(..., "ort-cpu")``, ordinary backing,
as calibrate opens it by default) and genai's ``og.Model`` with one ``Generator`` per KV length, each grown by
a real prefill of that many tokens. Then rounds; in each:

- sweep: one walk over the calibration's position grid (``--grid``, ascending on even rounds and descending
  on odd ones, one run per visit right after the neighbour's: engines/sweep.serpentine, as calibrate's sweep
  measures);
- back-to-back: per length, the last of three ``time_step(L, 1, 3)`` (a warm step at that length);
- genai: per length, one ``generate_next_token`` (its KV growing by one per round).

The last two are taken per length in a random order.

    python benchmarks/realsize/step_ab.py /work/scratch/models/qwen2.5-0.5b-int4 --positions 1024,4096
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

# The decode positions of the 240-s default calibration of the 0.5B int4 model (fifth pass, F6).
SWEEP_GRID = (1, 2, 4, 5, 10, 21, 44, 93, 199, 341, 424, 683, 903, 1024, 1365, 1707, 1923, 2048, 2389, 2731,
              3072, 3413, 3755, 4096)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime_genai as og

    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.sweep import serpentine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="genai model folder (make_models.py): model.onnx and genai_config.json")
    ap.add_argument("--positions", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--grid", default=",".join(map(str, SWEEP_GRID)),
                    help="the sweep's positions walked each round (default: the 240-s calibration's grid)")
    args = ap.parse_args(argv)
    positions = [int(v) for v in args.positions.split(",")]
    grid = sorted(set(int(v) for v in args.grid.split(",")) | set(positions))
    runner = open_runner(f"{args.model_dir}/model.onnx", "ort-cpu", threads=1, inter_threads=1,
                         max_past_len=max(grid) + args.rounds + 8)  # the walk reaches the grid's end
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

    res: dict[int, dict[str, list[float]]] = {L: {"sweep": [], "ours": [], "genai": []} for L in positions}
    rng = np.random.default_rng(0)
    for rnd in range(args.rounds):
        for L in serpentine(grid, rnd, lambda x: ("decode", x, 1)):
            ms = float(runner.time_step(L, 1, 1)[-1])
            if L in res:
                res[L]["sweep"].append(ms)
        for L in positions:
            for side in rng.permutation(["ours", "genai"]):
                res[L][str(side)].append(float(runner.time_step(L, 1, 3)[-1]) if side == "ours" else genai_ms(L))
    for L in positions:
        s, o, g = (float(np.median(res[L][k])) for k in ("sweep", "ours", "genai"))
        print(f"KV {L}: sweep visit {s:.2f} ms, back-to-back {o:.2f} ms, genai {g:.2f} ms; "
              f"sweep/genai {s / g:.3f}, back-to-back/genai {o / g:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
