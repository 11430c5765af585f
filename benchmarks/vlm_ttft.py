"""VLM TTFT: calibrate the fixture chain, then predict held-out requests with 1 and 2 images.

The chain is tests/data/vlm/vit/vision.onnx (ViT, torch.onnx.export) -> tests/data/vlm/vit/embedding.onnx
-> tests/data/thirdparty/genai-llama-embeds (onnxruntime-genai builder), ONNX Runtime CPU, one thread.
`calibrate` (plan benchmarks/vlm_plan.yaml, with its replay through the chain, as a user runs it) fits the
decoder, the encoder and the serving-loop terms; then requests whose patch counts per image were not swept
are run through the real chain (after one warm-up round: at least --reps rounds, then more for the requests
whose median is still imprecise, up to --max-reps) and compared with Estimator.predict(...).prefill_ms
(TTFT = encoder + embedding + decoder prefill + the loop's prefill overhead o_p). 2 images go to the
encoder in one call (`together`) and in two calls (`separate`): the calibration's two fits predict each.
The vision fit's leave-one-size-out error is printed for the whole sweep beside each size's first 15
visits (about a fixed-count sweep) and beside ordinary least squares on ms, on the same samples.

    python benchmarks/vlm_ttft.py [--encoder vit|qwen2.5-vl] [--out /tmp/vlm-bench] [--reps 9]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VIT = ROOT / "tests" / "data" / "vlm" / "vit"
DECODER = ROOT / "tests" / "data" / "thirdparty" / "genai-llama-embeds" / "model.onnx"
HELD_OUT_PATCHES = (100, 196, 324, 484, 729, 900)  # per image; the sweep's sizes are 16 .. 1024 geometric
QWEN_HELD_OUT_PATCHES = (96, 192, 320, 480, 736, 896)  # multiples of the 2x2 merge block, not swept


def main() -> int:
    from trt_latency.engines.adaptive import median_se_rel
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.vision import MIN_ROUNDS, read_vision_samples
    from trt_latency.estimator.model import Estimator
    from trt_latency.estimator.vision import loso_errors, vision_medians
    from trt_latency.pipeline import CalibrateOptions, calibrate
    from trt_latency.pipeline_vision import open_chain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/vlm-bench")
    ap.add_argument("--reps", type=int, default=9, help="rounds over every held-out request (after a warm-up round)")
    ap.add_argument("--max-reps", type=int, default=40,
                    help="more rounds for the requests whose median's relative SE is above 2%% (the short ones)")
    ap.add_argument("--text", type=int, default=32, help="text tokens per request")
    ap.add_argument("--encoder", choices=("vit", "qwen2.5-vl"), default="vit",
                    help="vit: the ViT + embedding-step chain; qwen2.5-vl: the Qwen2.5-VL encoder (tokens = patches/4), "
                         "features joined on the host (no embedding model)")
    args = ap.parse_args()
    if args.encoder == "vit":
        vision, embedding = VIT / "vision.onnx", str(VIT / "embedding.onnx")
    else:
        vision, embedding = ROOT / "tests" / "data" / "vlm" / "qwen2.5-vl" / "vision.onnx", None
    opts = CalibrateOptions(config=str(ROOT / "benchmarks" / "vlm_plan.yaml"), onnx=str(DECODER), out=args.out,
                            no_plot=True, no_progress=True, vision_onnx=str(vision),
                            embedding_onnx=embedding)
    calibrate(opts, say=lambda s: None)
    est = Estimator.load(Path(args.out) / "calibration.yaml")
    vis = est.vision
    assert vis is not None
    separate = Estimator(dataclasses.replace(est.calibration, vision=dataclasses.replace(vis, images_per_call="separate")))
    loop = est.serving_loop()
    print(f"serving loop from the replay: o_p {loop.prefill_ms:.4f} ms ({loop.source}, {loop.n_requests} requests)")
    print(f"vision fit ({vis.family}, patches {vis.patch_range[0]:g}..{vis.patch_range[1]:g}), leave-one-size-out "
          f"|rel err| median / max on the same sweep:")
    samples = read_vision_samples(Path(args.out) / "vision_samples.csv")
    for i in sorted(vis.fits):
        cells = []
        for label, visits, relative in ((f"first {MIN_ROUNDS} visits, OLS on ms", MIN_ROUNDS, False),
                                        (f"first {MIN_ROUNDS} visits, relative", MIN_ROUNDS, True),
                                        ("all visits, relative (stored)", None, True)):
            x, y, se = vision_medians(samples, i, visits)
            fitted = x != vis.native_patches  # the native grid is measured apart, not fitted
            x, y, se = x[fitted], y[fitted], se[fitted]
            e = np.abs(loso_errors(x, y, relative))
            cells.append(f"{label}: {np.median(e):.1%} / {np.max(e):.1%} (median SE <= {np.max(se):.1%})")
        print(f"  {i} image(s)/call: " + "; ".join(cells))
    rng = np.random.default_rng(1)

    def tokens(patches: int) -> int:
        return int(round(patches * vis.tokens_per_patch))

    chains = {"together": open_chain(opts, 1), "separate": open_chain(dataclasses.replace(
        opts, vision_images_per_call="separate"), 1)}
    runner = open_runner(DECODER, threads=1, max_past_len=2560, max_new_tokens=2304)
    held = HELD_OUT_PATCHES if args.encoder == "vit" else QWEN_HELD_OUT_PATCHES
    cases = [(n, 1, "together") for n in held] + [(n, 2, m) for n in held
                                                             for m in ("together", "separate")]
    times: dict[int, list[float]] = {k: [] for k in range(len(cases))}
    parts: dict[int, list[tuple[float, float, float]]] = {k: [] for k in range(len(cases))}
    for rep in range(max(args.reps, args.max_reps) + 1):  # rounds over the cases, shuffled: host noise spreads
        todo = [k for k in range(len(cases)) if rep <= args.reps or median_se_rel(times[k]) > 0.02]
        if not todo:
            break
        for k in rng.permutation(todo):
            n, images, mode = cases[int(k)]
            embeds, timing = chains[mode].prompt(runner, tokens(n) * images, args.text, images, rng)
            res = runner.generate(embeds, 1)
            if rep:  # round 0 pays for the new shapes
                times[int(k)].append(timing.before_prefill_ms + res.ttft_ms)
                parts[int(k)].append((timing.vision_ms, timing.embedding_ms, res.ttft_ms))
    rows = []
    split = []
    for k, (n, images, mode) in enumerate(cases):
        model = est if mode == "together" else separate
        pred = model.predict(tokens(n) * images, args.text, 1, images=images)  # serving: with o_p
        rows.append((n, images, mode, statistics.median(times[int(k)]), pred.prefill_ms, pred.flags))
        m_parts = [statistics.median(x[j] for x in parts[int(k)]) for j in range(3)]
        v_pred = model.vision_ms(tokens(n) * images, images)
        e_pred = vis.embedding_ms(tokens(n) * images + args.text)
        split.append((m_parts, (v_pred, e_pred, pred.prefill_ms - v_pred - e_pred)))
    print(f"\n{'patches/img':>11} {'images':>6} {'calls':>9}  measured vs predicted ms: encoder | embedding | decoder")
    for (n, images, mode, *_), (m_ms, p_ms) in zip(rows, split, strict=True):
        print(f"{n:>11} {images:>6} {mode if images > 1 else '-':>9}  " + " | ".join(
            f"{a:7.2f} vs {b:7.2f}" for a, b in zip(m_ms, p_ms, strict=True)))
    print(f"\n{'patches/img':>11} {'images':>6} {'calls':>9} {'measured ms':>11} {'predicted':>9} {'rel err':>8}"
          f" {'runs':>5} {'SE':>5}")
    for k, (n, images, mode, m, p, flags) in enumerate(rows):
        print(f"{n:>11} {images:>6} {mode if images > 1 else '-':>9} {m:>11.2f} {p:>9.2f} {p / m - 1:>+8.1%}"
              f" {len(times[k]):>5} {median_se_rel(times[k]):>5.1%}" + (f"  {flags}" if flags else ""))
    for label, sel in (("1 image", lambda r: r[1] == 1), ("2 images, one call", lambda r: r[1] == 2 and r[2] == "together"),
                       ("2 images, two calls", lambda r: r[1] == 2 and r[2] == "separate")):
        errs = [abs(r[4] / r[3] - 1) for r in rows if sel(r)]
        print(f"{label:<20} median |rel err| {statistics.median(errs):.1%}, max {max(errs):.1%} over {len(errs)}, "
              f"{sum(e <= 0.10 for e in errs)} within 10%")
    both = [(r[3], r[4]) for r in rows if r[1] == 2]
    one = [m for (m, _), r in zip(both, [r for r in rows if r[1] == 2], strict=True) if r[2] == "together"]
    two = [m for (m, _), r in zip(both, [r for r in rows if r[1] == 2], strict=True) if r[2] == "separate"]
    print("2 images: measured one call / two calls per size: " + ", ".join(f"{a / b:.2f}" for a, b in zip(one, two, strict=True)))
    print("cpu load at the end (1 min avg):", open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?")
    return 0


if __name__ == "__main__":
    sys.exit(main())
