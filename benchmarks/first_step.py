"""Whose is the first decode step's extra cost after a prefill: the runtime's loop or the engine's?

    python benchmarks/first_step.py MODEL_DIR [--prompts 16 256 1024 2048 4096] [--reps 5] [--threads 1]

MODEL_DIR holds an onnxruntime-genai export (genai_config.json + model.onnx). Needs onnxruntime-genai
(a scratch venv: it brings its own onnxruntime). For each prompt length P, the median over reps of:

- genai: the 2nd generate_next_token after append_tokens(P) (the first decode step, KV P; the 1st call
  only samples token 1 from the prefill's logits) minus the 3rd (KV P + 1): the extra of the first step
  as onnxruntime-genai's Generator pays it;
- ort: the same difference in our IOBinding loop (OrtRunner.generate, same model, same threads):
  the first decode step after a prefill in the bare ONNX Runtime session, the engine's own part;
- run: the same difference in a naive loop (session.run, ONNX Runtime allocating every output, the prefill's
  P x vocab logits included, present fed back as past): the engine with ORT's own output allocation;
- free: the ms to free a P x vocab float32 array that was written (what the runtime frees when the
  prefill's logits, P x vocab, are replaced by the first step's 1 x vocab), in this process;
- alloc+fill: the ms to allocate and write one (what producing those logits costs beyond the matmul).

Timings are wall clock on whatever else the machine runs: rerun on a quiet machine for the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def genai_first_step(model_dir: Path, prompts: list[int], reps: int, threads: int) -> dict[int, tuple[float, float]]:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(0)
    out = {}
    for p in [8, *prompts]:  # 8: warm-up
        first, second = [], []
        for _ in range(reps):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=p + 3, min_length=p + 3, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(rng.integers(0, vocab, p).astype(np.int32))
            gen.generate_next_token()  # token 1: sampled from the prefill's logits, no model run
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                gen.generate_next_token()
                times.append((time.perf_counter() - t0) * 1e3)
            first.append(times[0])
            second.append(times[1])
            del gen
        out[p] = (statistics.median(first), statistics.median(second))
    out.pop(8, None) if 8 not in prompts else None
    return out


def ort_first_step(model_dir: Path, prompts: list[int], reps: int, threads: int) -> dict[int, tuple[float, float]]:
    from trt_latency.engines.ort.runner import OrtRunner

    runner = OrtRunner(model_dir / "model.onnx", intra_op_threads=threads, inter_op_threads=1,
                       max_past_len=max(prompts) + 4, max_new_tokens=max(prompts), huge_pages=False)
    rng = np.random.default_rng(0)
    out = {}
    for p in [8, *prompts]:
        first, second = [], []
        for _ in range(reps):
            res = runner.generate(runner.random_prompt(p, rng), 3)
            first.append(res.step_ms[0])
            second.append(res.step_ms[1])
        out[p] = (statistics.median(first), statistics.median(second))
    runner.close()
    out.pop(8, None) if 8 not in prompts else None
    return out


def plain_run_first_step(model_dir: Path, prompts: list[int], reps: int, threads: int) -> dict[int, tuple[float, float]]:
    """The same difference with a naive loop: session.run with ONNX Runtime allocating every output (the
    P x vocab logits of the prefill included) and the present KV fed back as the next past (no IOBinding)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    meta = json.loads((model_dir / "genai_config.json").read_text())["model"]
    dec = meta["decoder"]
    layers, kv, hd = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    out = {}
    for p in [8, *prompts]:
        first, second = [], []
        for _ in range(reps):
            feeds = {"input_ids": rng.integers(0, meta["vocab_size"], (1, p)).astype(np.int64),
                     "attention_mask": np.ones((1, p), np.int64)}
            for i in range(layers):
                for kind in ("key", "value"):
                    feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv, 0, hd), np.float32)
            res = dict(zip(names, sess.run(None, feeds), strict=True))
            times = []
            for j in range(2):
                tok = int(np.argmax(res["logits"][0, -1]))
                feeds = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, p + j + 1), np.int64)}
                for i in range(layers):
                    for kind in ("key", "value"):
                        feeds[f"past_key_values.{i}.{kind}"] = res[f"present.{i}.{kind}"]
                t0 = time.perf_counter()
                res = dict(zip(names, sess.run(None, feeds), strict=True))
                times.append((time.perf_counter() - t0) * 1e3)
            first.append(times[0])
            second.append(times[1])
        out[p] = (statistics.median(first), statistics.median(second))
    out.pop(8, None) if 8 not in prompts else None
    return out


def free_cost(prompts: list[int], vocab: int, reps: int) -> dict[int, tuple[float, float]]:
    out = {}
    for p in prompts:
        frees, allocs = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            a = np.empty((p, vocab), dtype=np.float32)
            a.fill(1.0)  # written, as logits are: every page is resident
            t1 = time.perf_counter()
            del a
            t2 = time.perf_counter()
            allocs.append((t1 - t0) * 1e3)
            frees.append((t2 - t1) * 1e3)
        out[p] = (statistics.median(frees), statistics.median(allocs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 256, 1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, help="vocab of the free measurement (default: the model's)")
    args = ap.parse_args()
    meta = json.loads((args.model_dir / "genai_config.json").read_text())["model"]
    vocab = args.vocab or int(meta["vocab_size"])
    g = genai_first_step(args.model_dir, args.prompts, args.reps, args.threads)
    o = ort_first_step(args.model_dir, args.prompts, args.reps, args.threads)
    r = plain_run_first_step(args.model_dir, args.prompts, args.reps, args.threads)
    f = free_cost(args.prompts, vocab, args.reps)
    print(f"model {args.model_dir} (hidden {meta['decoder']['hidden_size']}, layers "
          f"{meta['decoder']['num_hidden_layers']}, vocab {meta['vocab_size']}), {args.threads} thread(s), "
          f"median of {args.reps}; ms")
    print(f"{'P':>6} {'genai 1st':>10} {'genai 2nd':>10} {'genai +':>9} {'ort 1st':>9} {'ort 2nd':>9} {'ort +':>8} "
          f"{'run 1st':>9} {'run 2nd':>9} {'run +':>8} {'free PxV':>9} {'alloc+fill':>10}")
    for p in args.prompts:
        (g1, g2), (o1, o2), (r1, r2), (fr, al) = g[p], o[p], r[p], f[p]
        print(f"{p:>6} {g1:>10.3f} {g2:>10.3f} {g1 - g2:>+9.3f} {o1:>9.3f} {o2:>9.3f} {o1 - o2:>+8.3f} "
              f"{r1:>9.3f} {r2:>9.3f} {r1 - r2:>+8.3f} {fr:>9.3f} {al:>10.3f}")
    print(f"free Pxvocab measured with vocab {vocab}")


if __name__ == "__main__":
    main()
