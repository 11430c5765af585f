"""calibrate's vision step (VLM deployments): sweep the encoder (and the embedding step), fit vision(N) per
images per call, store the calibration's ``vision`` section, and build the chain the replay runs.

Called by trt_latency.pipeline when ``--vision-onnx`` is given: ``sweep_vision`` is measure's encoder phase
(a Ray actor runs it too), ``fit_vision_section`` is finish's; kept in its own module so the decoder
pipeline stays as it is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

VISION_IMAGES = (1, 2)  # images per call swept: 1 and 2 give the together-vs-separate difference


def vision_signature(args: Any) -> Any:
    from trt_latency.engines.vision import read_vision_signature

    return read_vision_signature(args.vision_onnx, family=args.vision_family, config=args.vision_config,
                                 feeds=args.vision_feeds, tokens_per_patch=args.vision_tokens_per_patch)


def open_chain(args: Any, threads: int, huge_pages: bool = True) -> Any:
    from trt_latency.engines.vision import EmbeddingStep, VisionChain, VisionEncoder

    encoder = VisionEncoder(vision_signature(args), threads=threads or 1, huge_pages=huge_pages)
    embedding = (EmbeddingStep(args.embedding_onnx, threads=threads or 1, huge_pages=huge_pages)
                 if args.embedding_onnx else None)
    return VisionChain(encoder, embedding, together=args.vision_images_per_call == "together")


def chain_from_calibration(cal: Any, cal_path: str | Path, threads: int, huge_pages: bool = True) -> Any:
    """The encoder chain a VLM calibration was swept with, reopened from its provenance (the loadtest serves
    requests through it); None for a calibration without a ``vision`` section. A relative path is read next
    to the calibration when it is not found from here; a missing file fails in one line naming the field."""
    from types import SimpleNamespace

    from trt_latency.errors import InputError

    vis = cal.vision
    if vis is None:
        return None
    models = cal.provenance.get("vision_models") or {}
    base = Path(cal_path).parent

    def located(field: str, required: bool) -> Path | None:
        raw = str(models.get(field) or "")
        if not raw:
            if required:
                raise InputError("a VLM calibration without its encoder's path", path=str(cal_path),
                                 field=f"provenance.vision_models.{field}", expected="the encoder ONNX file")
            return None
        p = Path(raw)
        if not p.is_file() and not p.is_absolute() and (base / p).is_file():
            p = base / p
        if not p.is_file():
            raise InputError("file not found", path=str(cal_path), field=f"provenance.vision_models.{field}",
                             expected="the ONNX file calibrate swept", got=str(p))
        return p

    hook = vis.family[len("hook:"):] if vis.family.startswith("hook:") else None
    args = SimpleNamespace(vision_onnx=located("encoder", True), embedding_onnx=located("embedding", False),
                           vision_family=None if hook else vis.family, vision_feeds=hook,
                           vision_config=str(models.get("config") or "") or None,
                           vision_tokens_per_patch=vis.tokens_per_patch, vision_images_per_call=vis.images_per_call)
    return open_chain(args, threads, huge_pages)


def sweep_vision(args: Any, plan: Any, path: Path, max_seconds: float | None = None) -> dict[str, Any]:
    """The encoder sweep (pipeline.measure's vision phase): rows into ``path`` (vision_samples.csv, redone
    whole); returns what the fit needs about the encoder (plain data: a Ray actor returns it)."""
    from trt_latency.engines.vision import MIN_ROUNDS, run_vision_sweep, vision_patch_points

    chain = open_chain(args, plan.runtime.intra_op_threads, plan.runtime.huge_pages)
    enc = chain.encoder
    lo, hi = args.vision_patches
    patches = vision_patch_points(enc.adapter, lo, hi, args.vision_points)
    if path.is_file():
        path.unlink()  # the encoder sweep is short: redone whole (no resume bookkeeping)
    # MIN_ROUNDS over all sizes (medians over the whole sweep against a busy host), then more rounds for the
    # sizes whose median is still imprecise (the small, cheap, noisy calls), within the budget's share
    extra = {} if max_seconds is None else {"max_seconds": max(float(max_seconds), 0.0)}
    sweep = run_vision_sweep(enc, patches, VISION_IMAGES, MIN_ROUNDS, chain.embedding, seed=plan.sweep.seed,
                             path=path, **extra)
    return {"family": enc.sig.family, "source": enc.sig.source, "encoder": str(enc.sig.path),
            "tokens_per_patch": float(enc.tokens_per_patch), "native_patches": float(enc.adapter.native_patches),
            "patches": [int(x) for x in patches], "calls": len(sweep.rows), "seconds": float(sweep.seconds),
            "rounds": [min(sweep.rounds.values()), max(sweep.rounds.values())]}


def fit_vision_section(args: Any, swept: dict[str, Any], path: Path, cal_path: Path) -> list[str]:
    """Fit vision(N) per images per call from ``path`` and store the calibration's vision section
    (pipeline.finish); returns the report lines."""
    from trt_latency.engines.vision import MIN_ROUNDS, read_vision_samples
    from trt_latency.estimator.calibration import load_calibration, save_calibration
    from trt_latency.estimator.vision import fit_vision

    rows = read_vision_samples(path)
    family, tpp, native = swept["family"], swept["tokens_per_patch"], swept["native_patches"]
    patches = swept["patches"]
    vis = fit_vision(rows, family, tpp, args.vision_images_per_call, native_patches=native)
    fixed = fit_vision(rows, family, tpp, args.vision_images_per_call, max_visits=MIN_ROUNDS, native_patches=native)
    cal = load_calibration(cal_path)
    prov = dict(cal.provenance)
    prov["vision_models"] = {"encoder": swept["encoder"], "family_source": swept["source"],
                             "embedding": str(args.embedding_onnx or ""), "config": str(args.vision_config or "")}
    save_calibration(replace(cal, vision=vis, provenance=prov), cal_path)
    lo, hi = swept["rounds"]
    lines = [f"  vision {family} ({swept['source']}): {len(patches)} patch counts {patches[0]}..{patches[-1]} "
             f"x images per call {list(VISION_IMAGES)}, {swept['calls']} timed calls in {swept['seconds']:.1f} s "
             f"({lo}-{hi} per size) -> {path.name}; tokens per patch "
             f"{vis.tokens_per_patch:g}, images_per_call {vis.images_per_call}"]
    nan = float("nan")
    for i, (a, b, c) in sorted(vis.fits.items()):
        e, f = vis.error.get(i, {}), fixed.error.get(i, {})
        lines.append(f"    {i} image(s)/call: vision(N) = {a:.4f} + {b:.3e} N + {c:.3e} N^2 ms; leave-one-size-out "
                     f"|rel err| median {e.get('loso_median_rel', nan):.1%}, max {e.get('loso_max_rel', nan):.1%} "
                     f"over {int(e.get('n_sizes', 0))} sizes (first {MIN_ROUNDS} visits per size only: "
                     f"{f.get('loso_median_rel', nan):.1%}, {f.get('loso_max_rel', nan):.1%}); noisiest median's "
                     f"SE {e.get('median_se_max', nan):.1%} ({f.get('median_se_max', nan):.1%})")
    if 2 in vis.fits:
        n = float(patches[len(patches) // 2])
        lines.append(f"    two images of {n:g} patches: one call {vis.call_ms(n, 2):.2f} ms vs two calls "
                     f"{2 * vis.call_ms(n, 1):.2f} ms")
    if vis.native_ms:
        lines.append(f"    native grid {vis.native_patches:g} patches (no position-embedding interpolation), measured: "
                     + ", ".join(f"{i} image(s)/call {ms:.3f} ms (the fit says {vis.fit_ms(vis.native_patches, i):.3f})"
                                 for i, ms in sorted(vis.native_ms.items())))
    if vis.embedding is not None:
        lines.append(f"    embedding step: {vis.embedding[0]:.4f} + {vis.embedding[1]:.3e} S ms")
    return lines
