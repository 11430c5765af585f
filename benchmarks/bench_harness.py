"""Harness overhead: the sweep's per-step figure vs a bare ONNX Runtime loop at the same KV position.

The "sweep" side is exactly what engines.sweep does per row (engines.sweep.measure_once: warm-up
runs, then one timed run, through OrtRunner.time_step). The "bare" side is written here with plain onnxruntime calls only (its own numpy
buffers and IOBinding, perf_counter around run_with_iobinding) on the same InferenceSession, so
provider, threads and graph optimisations are identical and only the harness differs. (Two
sessions in one process would make their intra-op thread pools spin against each other on a
2-core machine, which measures contention, not harness overhead; --own-session shows that.)
The two sides are interleaved round by round so machine drift hits both equally.
Target: median ratio within 5%.

    python benchmarks/bench_harness.py [--positions 1 2048 4096] [--rounds 300] [--threads 2] [--warmup 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bare_loop(path: Path, past_len: int, threads: int, inter: int, sess=None):  # type: ignore[no-untyped-def]
    """Plain onnxruntime: IOBinding over numpy buffers; returns a `time_once(warmup)` closure."""
    import onnxruntime as ort

    if sess is None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = inter
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    kv_heads, head_dim = inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]
    hidden = inputs["inputs_embeds"].shape[2]
    vocab = sess.get_outputs()[0].shape[2]
    rng = np.random.default_rng(0)
    binding = sess.io_binding()
    keep = []  # the buffers must outlive the binding
    x = (rng.standard_normal((1, 1, hidden)) * 0.1).astype(np.float32)
    pos = np.full((1, 1), past_len, dtype=np.int64)
    for name, arr in (("inputs_embeds", x), ("position_ids", pos)):
        keep.append(arr)
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
    for name in inputs:
        if name.startswith("past_key_values."):
            arr = (rng.standard_normal((1, kv_heads, past_len, head_dim)) * 0.1).astype(np.float32)
            keep.append(arr)
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
    for out in sess.get_outputs():
        shape = (1, 1, vocab) if out.name == "logits" else (1, kv_heads, past_len + 1, head_dim)
        arr = np.empty(shape, dtype=np.float32)
        keep.append(arr)
        binding.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(arr))

    def time_once(warmup: int) -> float:
        for _ in range(warmup):
            sess.run_with_iobinding(binding)
        t0 = time.perf_counter_ns()
        sess.run_with_iobinding(binding)
        return (time.perf_counter_ns() - t0) * 1e-6

    # The same page backing as the runner's (engines/hugepages.py): otherwise this compares 4 KiB with 2 MiB
    # pages, not the two harnesses.
    from trt_latency.engines.hugepages import back_with_huge_pages

    back_with_huge_pages()
    time_once.keep = keep  # type: ignore[attr-defined]
    return time_once


def main(argv: list[str] | None = None) -> int:
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.export import export_decoder
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.engines.sweep import measure_once

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, nargs="+", default=None)
    # Per-visit noise on a shared VM is ~15-20% (robust sd): 60 rounds leave ~4% standard error on the
    # ratio of medians, too coarse for a 5% target; 300 rounds bring it near 2%.
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs before each timed one (default: the plan's sweep.decode.warmup)")
    parser.add_argument("--own-session", action="store_true", help="give the bare loop its own session")
    parser.add_argument("--skip-blocks", action="store_true", help="skip the blocks-executed scaling check")
    args = parser.parse_args(argv)
    plan = load_plan()
    key = plan.primary
    tier = plan.tier(key.tier_idx)
    threads = plan.runtime.intra_op_threads if args.threads is None else args.threads
    inter = plan.runtime.inter_op_threads
    warmup = plan.sweep.decode.warmup if args.warmup is None else args.warmup
    positions = args.positions or [1, tier.max_past_len // 2, tier.max_past_len]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_decoder(tier, key.top_k, key.num_active_blocks, Path(tmp) / "model.onnx")
        runner = OrtRunner(path, intra_op_threads=threads, inter_op_threads=inter)
        print(f"model {tier.name} config {tuple(key)}, {threads} intra-op threads, warm-up {warmup}, "
              f"{args.rounds} interleaved rounds per position")
        print(f"{'past_len':>8} {'sweep ms':>10} {'bare ms':>10} {'ratio':>7}")
        worst = 0.0
        for p in positions:
            bare = bare_loop(path, p, threads, inter, None if args.own_session else runner.session)
            sweep_ms, bare_ms = [], []
            for r in range(args.rounds):
                # Alternate which side goes first so neither always gets the warmer cache.
                sides = [0, 1] if r % 2 == 0 else [1, 0]
                for side in sides:
                    if side == 0:
                        sweep_ms.append(measure_once(runner, p, 1, warmup))
                    else:
                        bare_ms.append(bare(warmup))
            ms, mb = float(np.median(sweep_ms)), float(np.median(bare_ms))
            worst = max(worst, abs(ms / mb - 1))
            print(f"{p:>8} {ms:>10.4f} {mb:>10.4f} {ms / mb:>7.3f}")
        print(f"largest |ratio - 1| = {worst * 100:.1f}% (target <= 5%): {'OK' if worst <= 0.05 else 'ABOVE TARGET'}")
        runner.close()
        if not args.skip_blocks:
            blocks_scaling(tier, key, Path(tmp), threads, inter, warmup, args.rounds)
    return 0


def blocks_scaling(tier, key, tmp: Path, threads: int, inter: int, warmup: int, rounds: int) -> None:  # type: ignore[no-untyped-def]
    """Decode step with half the blocks in the graph vs all: fewer blocks executed must cost less."""
    from trt_latency.engines.export import export_decoder
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.engines.sweep import measure_once

    half = max(1, key.num_active_blocks // 2)
    if half == key.num_active_blocks:
        return
    past = tier.max_past_len // 2
    runners = {b: OrtRunner(export_decoder(tier, key.top_k, b, tmp / f"blocks{b}.onnx"), intra_op_threads=threads,
                            inter_op_threads=inter) for b in (half, key.num_active_blocks)}
    ms: dict[int, list[float]] = {b: [] for b in runners}
    for r in range(rounds):
        for b in (sorted(runners) if r % 2 == 0 else sorted(runners, reverse=True)):
            ms[b].append(measure_once(runners[b], past, 1, warmup))
    med = {b: float(np.median(v)) for b, v in ms.items()}
    print(f"blocks executed at past_len {past}: {half} blocks {med[half]:.4f} ms, "
          f"{key.num_active_blocks} blocks {med[key.num_active_blocks]:.4f} ms, "
          f"ratio {med[half] / med[key.num_active_blocks]:.3f} (block count ratio {half / key.num_active_blocks:.2f})")


if __name__ == "__main__":
    sys.exit(main())
