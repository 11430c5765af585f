"""The calibration pipeline as a library function: export -> sweep -> fit -> calibration.yaml, decode.png,
replay -> requests.csv -> serving-loop terms (fitted on the even request_ids) -> conformal factors (from the
odd ones). `trt-latency calibrate` only parses its flags into CalibrateOptions and calls ``calibrate``.

    from trt_latency.pipeline import CalibrateOptions, calibrate
    result = calibrate(CalibrateOptions(onnx="model.onnx", out="out", quick=True))

Every config is replayed with its own model and runner into the one requests.csv, config i under
request_ids i * REPLAY_ID_STRIDE + (0 .. n-1); its loop terms and conformal factors come from its own
rows. A config left without a replay (--no-replay, or too few requests) borrows the primary config's
loop terms (source "borrowed:t<i>.k<k>.b<b>") and gets no conformal factors.

Every step writes a file a user can keep; a rerun into the same --out continues where the last run
stopped (existing models are reused when their metadata matches, the sweep and the replay skip rows
already in samples.csv / requests.csv, the fit is redone from all rows).
"""

from __future__ import annotations

import datetime
import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.engines.signature import VISION_NOTE, capped_past
from trt_latency.errors import ConfigError, TrtLatencyError

DEFAULT_OUT = "trt-latency-out"



# ------------------------------------------------------------------------------------------ models


@dataclass
class CalibrateOptions:
    """What `trt-latency calibrate` takes (the CLI flags, same names)."""

    config: str | None = None  # plan YAML; None = the packaged configs/default.yaml
    onnx: str | None = None  # time this ONNX decoder instead of exporting the plan's models
    engine: str | None = None  # time this TensorRT engine
    backend: str = "auto"
    out: str = DEFAULT_OUT
    quick: bool = False
    no_replay: bool = False
    requests: int | None = None  # replay size per config (default: the plan's)
    no_progress: bool = False
    no_plot: bool = False
    kv_mode: str = "auto"
    io: str | None = None
    dims: str | None = None
    max_past_len: int | None = None
    precision: float | None = None  # target relative SE of each position's median (None: the plan's; 0: fixed)
    time_budget: float | None = None  # seconds for the whole calibrate (None: the plan's)
    huge_pages: bool | None = None  # --huge-pages / --no-huge-pages (None: the plan's runtime.huge_pages)
    # VLM deployments (trt_latency/pipeline_vision.py): the vision encoder, its family / config / feeds
    # hook, the embedding step, and how a request's images go to the encoder.
    vision_onnx: str | None = None
    vision_family: str | None = None
    vision_config: str | None = None
    vision_feeds: str | None = None
    vision_tokens_per_patch: float | None = None
    embedding_onnx: str | None = None
    vision_images_per_call: str = "together"
    vision_patches: tuple[int, int] = (16, 1024)
    vision_points: int = 8

    @classmethod
    def from_namespace(cls, ns: Any) -> CalibrateOptions:
        return cls(**{f: getattr(ns, f) for f in cls.__dataclass_fields__ if hasattr(ns, f)})


@dataclass(frozen=True)
class CalibrateResult:
    """The files a calibration wrote (None where a step was skipped) and its wall time."""

    out: Path
    models: tuple[Path, ...]
    samples: Path
    calibration: Path
    plot: Path | None
    requests: Path | None
    kv_mode: str
    seconds: float
    batch_plot: Path | None = None  # batch.png (a plan with a batch block)




@dataclass
class Target:
    """One config to time: its key, tier dims and the model/engine file."""

    key: Any  # ConfigKey
    tier: Any  # TierSpec
    path: Path
    exported: bool = False  # written by this run (vs reused / supplied)
    signature: Any = None  # DecoderSignature of a user's --onnx model


def model_path(out: Path, key: Any, primary: bool = False) -> Path:
    """The one naming scheme for exported models (calibrate, sweep, replay): the primary config of a
    calibration is model.onnx (what loadtest looks for beside calibration.yaml), every other config
    model.t<tier_idx>.k<top_k>.b<num_active_blocks>.onnx."""
    if primary:
        return out / "model.onnx"
    return out / f"model.{_key_name(key)}.onnx"


def _export_if_needed(tier: Any, key: Any, path: Path, seed: int) -> bool:
    """Export unless `path` already holds this exact model (same content hash); True if written."""
    from trt_latency.engines.export import (
        EXTERNAL_DATA_THRESHOLD,
        build_model,
        export_decoder,
        model_metadata,
    )

    if path.is_file():
        model, weight_bytes = build_model(tier, key.top_k, key.num_active_blocks, seed)
        if weight_bytes <= EXTERNAL_DATA_THRESHOLD:
            if hashlib.sha256(model.SerializeToString()).hexdigest() == _sha256(path):
                return False
        else:  # weights live in a side file: the metadata (dims, config, seed) identifies the model
            try:
                meta = model_metadata(path)
            except Exception:  # noqa: BLE001 - an unreadable leftover is simply rewritten
                meta = {}
            wanted = {**{f: getattr(tier, f) for f in tier.__dataclass_fields__},
                      "top_k": key.top_k, "num_active_blocks": key.num_active_blocks, "seed": seed}
            if meta and all(meta.get(k) == v for k, v in wanted.items()):
                return False
    export_decoder(tier, key.top_k, key.num_active_blocks, path, seed=seed)
    return True


def tier_from_onnx(path: Path, plan: Any, args: Any) -> tuple[Any, Any, Any]:
    """(TierSpec, ConfigKey, DecoderSignature) of a user's decoder: trt_latency metadata when it has it,
    else its signature (shapes, genai_config.json / config.json, the graph, --dims)."""
    from trt_latency.engines.config import DTYPE_SIZES, ConfigKey, TierSpec
    from trt_latency.engines.export import tier_from_metadata
    from trt_latency.engines.signature import read_signature

    sig = read_signature(path, io=getattr(args, "io", None), dims=getattr(args, "dims", None))
    sig.resolve_kv_mode(getattr(args, "kv_mode", "auto"))  # a mode the model cannot run fails here, in one line
    base = plan.tier(plan.primary.tier_idx)
    flag = getattr(args, "max_past_len", None)
    from trt_latency.engines.export import model_metadata

    meta = model_metadata(path)
    if meta and all(f in meta for f in TierSpec.__dataclass_fields__):
        tier, key = tier_from_metadata(meta)
        return replace(tier, max_past_len=capped_past(tier.max_past_len, tier.max_past_len, flag)), key, sig
    max_past = capped_past(base.max_past_len, sig.max_past_len, flag)
    # The longest prompt fits the model too (a prefill of S writes positions 0 .. S-1).
    max_prefill = min(base.max_prefill_len, sig.max_past_len + 1) if sig.max_past_len else base.max_prefill_len
    tier = TierSpec(tier_idx=0, name=path.stem, hidden=sig.hidden or 1, layers=sig.blocks,
                    heads=sig.heads or sig.kv_heads, kv_heads=sig.kv_heads, head_dim=sig.head_dim, intermediate=0,
                    vocab=sig.vocab, experts=1, dtype=sig.kv_dtype if sig.kv_dtype in DTYPE_SIZES else "float16",
                    max_past_len=max_past, max_prefill_len=max_prefill)
    return tier, ConfigKey(tier.tier_idx, 1, sig.blocks), sig


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _targets(args: CalibrateOptions, plan: Any, out: Path) -> tuple[Any, list[Target]]:
    if args.onnx:
        tier, key, sig = tier_from_onnx(Path(args.onnx), plan, args)
        plan = replace(plan, tiers={tier.tier_idx: tier}, configs=[key])
        return plan, [Target(key, tier, Path(args.onnx), signature=sig)]
    if args.engine:
        engine = Path(args.engine)
        if not engine.is_file():
            raise ConfigError("file not found", path=str(engine), expected="a TensorRT engine (.plan / .engine)")
        key = plan.primary
        return plan, [Target(key, plan.tier(key.tier_idx), engine)]
    targets = []
    for i, key in enumerate(plan.configs):
        tier = plan.tier(key.tier_idx)
        if getattr(args, "max_past_len", None) is not None:  # our own models: the flag can only shorten
            tier = replace(tier, max_past_len=capped_past(tier.max_past_len, tier.max_past_len, args.max_past_len))
        targets.append(Target(key, tier, model_path(out, key, primary=i == 0)))
    return plan, targets


# ------------------------------------------------------------------------------------------ report


def _versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {"python": sys.version.split()[0], "numpy": np.__version__}
    for dist in ("trt-latency", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def position_table(samples: Any, cal: Any) -> str:
    """Per config: past_len, reps, measured median and p90, fitted value, relative error."""
    from trt_latency.estimator.fit import decode_latencies, decode_rows
    from trt_latency.estimator.model import Estimator

    est = Estimator(cal)
    lines: list[str] = []
    for cfg in cal.configs:
        # The medians the fit used (the machine's drift divided out: estimator.fit.drift_adjusted); p90 raw.
        rows = decode_rows(samples, cfg.key)
        past, lat, _ = decode_latencies(samples, rows)
        raw = samples.latency_ms[rows]
        lines.append(f"config tier_idx={cfg.tier_idx} top_k={cfg.top_k} num_active_blocks={cfg.num_active_blocks}")
        lines.append(f"  {'past_len':>8}  {'reps':>4}  {'median ms':>10}  {'p90 ms':>9}  {'fitted ms':>10}  {'fit err':>8}")
        for p in np.unique(past):
            y = lat[past == p]
            med = float(np.median(y))
            fitted = float(est.decode_step_ms(int(p), tier_idx=cfg.tier_idx, top_k=cfg.top_k,
                                              num_active_blocks=cfg.num_active_blocks, serving=False))
            lines.append(f"  {int(p):>8}  {y.size:>4}  {med:>10.4f}  {float(np.quantile(raw[past == p], 0.9)):>9.4f}  "
                         f"{fitted:>10.4f}  {(fitted - med) / med:>+8.1%}")
        lines.append(fit_summary(cfg))
        lines.append("")
    return "\n".join(lines)


def fit_summary(cfg: Any) -> str:
    knots = [float(k) for k in cfg.decode_knots]
    values = [float(v) for v in cfg.decode_values_ms]
    slopes = [(values[i + 1] - values[i]) / (knots[i + 1] - knots[i]) * 1e3 for i in range(len(knots) - 1)]
    overall = (values[-1] - values[0]) / (knots[-1] - knots[0]) * 1e3
    err = cfg.fit_error or {}
    loo_med, loo_max = err.get("loo_median_rel"), err.get("loo_max_rel")
    a, b, c = (float(x) for x in cfg.prefill_coeffs)
    parts = [
        "  fit: " + f"{len(knots)} knots at past_len " + ", ".join(f"{k:.0f}" for k in knots),
        "       T(L) at knots (ms): " + ", ".join(f"{v:.4f}" for v in values),
        f"       slope {overall:.3f} us per KV token overall (per segment: "
        + ", ".join(f"{s:.3f}" for s in slopes) + ")",
    ]
    if isinstance(loo_med, int | float) and isinstance(loo_max, int | float):
        within, total = err.get("loo_within_2se"), err.get("loo_with_se")
        noise = (f"; {within} of {total} within 2 SE of their own median (the rest: model error or a shift "
                 f"that more rounds would not remove)" if isinstance(within, int) and total else "")
        parts.append(f"       leave-one-position-out error: median {loo_med:.1%}, max {loo_max:.1%}"
                     f" over {err.get('n_positions', '?')} positions{noise}")
    drift = err.get("drift_sd_rel")
    if isinstance(drift, int | float) and drift > 0:
        parts.append(f"       machine drift divided out of the medians: {drift:.1%} robust sd over the sweep "
                     "(the level all positions shared at the time)")
    parts.append(f"       prefill(S) = {a:.4f} + {b:.3e}*S + {c:.3e}*S^2 ms")
    if cfg.kv_bytes_per_token:
        line = f"       KV cache: {cfg.kv_bytes_per_token} bytes per token"
        if overall > 0:
            ms_per_mib = overall * 1e-3 / cfg.kv_bytes_per_token * 2**20
            line += (f"; slope = {ms_per_mib:.3f} ms per MiB of KV "
                     f"(an effective {2**20 / (ms_per_mib * 1e-3) / 1e9:.1f} GB/s if it were all KV reads)")
        parts.append(line)
    return "\n".join(parts)


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------ run


def calibrate(args: CalibrateOptions, say: Callable[[str], None] | None = None) -> CalibrateResult:
    """Run the whole calibration into ``args.out``; ``say`` gets the report lines (default: print)."""
    from trt_latency.engines.config import load_plan

    started = time.perf_counter()
    if args.requests is not None and args.requests < 0:
        raise ConfigError(field="--requests", expected="an integer >= 0", got=args.requests)
    plan = load_plan(args.config, quick=args.quick)
    plan = _with_adaptive_flags(plan, args)
    if args.huge_pages is not None:
        plan = replace(plan, runtime=replace(plan.runtime, huge_pages=args.huge_pages))
    budget = plan.sweep.adaptive.time_budget_s if plan.sweep.adaptive is not None else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = "tensorrt" if args.engine and args.backend == "auto" else args.backend
    if args.engine and backend != "tensorrt":
        raise ConfigError(field="--backend", expected="tensorrt (or auto) with --engine", got=backend)
    plan, targets = _targets(args, plan, out)
    if args.vision_onnx:  # a vision model the adapters cannot feed fails now, not after the decoder sweep
        from trt_latency.pipeline_vision import vision_signature

        vision_signature(args)
    progress = not args.no_progress
    samples_path = out / "samples.csv"
    cal_path = out / "calibration.yaml"
    plot_path = out / "decode.png"
    requests_path = out / "requests.csv"
    say = say or _Say()

    say(f"trt-latency calibrate: plan {plan.source}{' (--quick)' if plan.quick else ''}, "
        f"{len(targets)} config(s), output {out}/")
    if not (args.onnx or args.engine):
        for t in targets:
            t.exported = _export_if_needed(t.tier, t.key, t.path, plan.sweep.seed)
            say(f"  model {t.path.name}: {'exported' if t.exported else 'reused (same content hash)'}")
    runner_info: dict[str, str] = {}
    sweep_stats: list[str] = []
    options = {"kv_mode": args.kv_mode, "io": args.io, "dims": args.dims}
    sweeps: dict[Any, Any] = {}
    refiner = _refiner(plan)
    n_requests = plan.replay.requests if args.requests is None else args.requests
    n_replays = len(targets) if not args.no_replay and n_requests > 0 else 0
    replay_costs: list[float] = []  # estimated replay seconds of the configs swept so far
    if plan.batch is not None:
        # Batched steps first (a fixed grid): the adaptive decode sweeps below then share what the time
        # budget has left, so --time-budget caps the whole calibrate, batch sweep included.
        batch_targets = targets if plan.batch.all_configs else targets[:1]
        for i, t in enumerate(batch_targets):
            # Its share of the budget (BATCH_SHARE), split over the configs it covers: the rounds past
            # MIN_ROUNDS are precision, not coverage, and the decode sweeps are what calibrate is for.
            end = (None if budget is None else
                   time.perf_counter() + max(started + BATCH_SHARE * budget - time.perf_counter(), 0.0)
                   / (len(batch_targets) - i))
            runner_info.update(_batch_sweep_one(t, plan, backend, samples_path, progress, options, say, end))
    for i, t in enumerate(targets):
        deadline = _deadline_fn(started, budget, len(targets) - i, replay_costs, n_replays, plan, t.tier, n_requests)
        info, sweeps[tuple(t.key)] = _sweep_one(t, plan, backend, samples_path, progress, options, say, refiner,
                                                deadline)
        runner_info.update(info)
        sweep_stats.append(info.get("summary", ""))
        cost = _replay_seconds(sweeps[tuple(t.key)].states, plan, t.tier, n_requests)
        if cost is not None:
            replay_costs.append(cost)
    # Configs that finished early left budget behind: one more pass over those the deadline cut short.
    pending = [t for t in targets if sweeps[tuple(t.key)].out_of_time]
    for i, t in enumerate(pending):
        end = _sweep_deadline(started, budget, len(pending) - i, replay_costs, n_replays)
        if end is None or end - time.perf_counter() < MIN_PASS_S:
            continue
        _, sweeps[tuple(t.key)] = _sweep_one(t, plan, backend, samples_path, progress, options, say, refiner, end)

    cal, samples = _fit(samples_path, plan, targets, runner_info, args)
    cal = _with_sweep_record(cal, sweeps, plan)
    from trt_latency.estimator.calibration import save_calibration

    save_calibration(cal, cal_path)
    vision_lines: list[str] = []
    if args.vision_onnx:
        from trt_latency.pipeline_vision import calibrate_vision

        vision_lines = calibrate_vision(args, plan, out, cal_path, say)
    plot_written = False if getattr(args, "no_plot", False) else _plot(samples, cal, plot_path, runner_info)
    batch_plot = None if getattr(args, "no_plot", False) else _plot_batch(samples, cal, out / "batch.png", runner_info)

    replaying = not args.no_replay and n_requests > 0
    replay_note = "skipped (--no-replay)" if args.no_replay else "skipped (0 requests)"
    if replaying:
        from trt_latency.engines.replay import REPLAY_ID_STRIDE

        if n_requests > REPLAY_ID_STRIDE:
            raise ConfigError(field="--requests", expected=f"at most {REPLAY_ID_STRIDE} requests per config",
                              got=n_requests)
        written = skipped = 0
        seconds = 0.0
        cut = ""
        for i, t in enumerate(targets):
            result = _replay(t, plan, backend, requests_path, n_requests, progress, id_offset=i * REPLAY_ID_STRIDE,
                             options=options, say=say, vision=args if args.vision_onnx else None)
            written += result.rows_written
            skipped += result.rows_skipped
            seconds += result.seconds
            if budget is not None and time.perf_counter() - started > budget and i + 1 < len(targets):
                cut = f"--time-budget spent after {i + 1} of {len(targets)} configs; "
                break
        replay_note = (f"{cut}{written + skipped} requests, {n_requests} per config ({written} replayed in "
                       f"{_fmt_time(seconds)}, {skipped} already there)")
    loop_lines: list[str] = []
    if requests_path.is_file() and requests_path.stat().st_size > 0:
        # Also with --no-replay: the rows an earlier run left keep their loop terms and factors.
        loop_lines, conformal_note = _serving_loop_and_conformal(cal_path, requests_path, [t.key for t in targets])
        if not replaying:
            replay_note += f", the {requests_path.name} an earlier run left is used"
        replay_note += conformal_note
    else:
        loop_lines = _no_log_lines()

    say("")
    say("Decode step latency per KV position: measured (median, p90 over repetitions) vs the fitted model")
    say(position_table(samples, _load(cal_path)))
    if plan.batch is not None:
        from trt_latency.estimator.batch_fit import format_batch_table

        say(format_batch_table(cal, samples))
    wall = time.perf_counter() - started
    say("Summary")
    say(f"  backend      {runner_info.get('backend', backend)} on {runner_info.get('device', '?')}")
    say(f"  kv_mode      {runner_info.get('kv_mode', 'concat')}"
        + (f" (token input {runner_info['token_input']})" if runner_info.get("token_input") else ""))
    say(f"  threads      intra_op {plan.runtime.intra_op_threads}, inter_op {plan.runtime.inter_op_threads}")
    if runner_info.get("memory"):
        say(f"  memory       {runner_info['memory']}")
    for t in targets:
        say(f"  model        {t.path}")
    say(f"  samples      {samples_path} ({len(samples)} timed repetitions)")
    say(f"  calibration  {cal_path}")
    no_plot = "not written (--no-plot)" if getattr(args, "no_plot", False) else "not written (matplotlib missing)"
    say(f"  plot         {plot_path if plot_written else no_plot}")
    if batch_plot is not None:
        say(f"  batch plot   {batch_plot}")
    say(f"  requests     {requests_path if requests_path.is_file() else '-'}: {replay_note}")
    for line in loop_lines:
        say(line)
    for line in vision_lines:
        say(line)
    say(f"  wall time    {_fmt_time(wall)}")
    if replaying:
        say(f"Next: trt-latency analyze {requests_path} -c {cal_path}")
    return CalibrateResult(out=out, models=tuple(t.path for t in targets), samples=samples_path,
                           calibration=cal_path, plot=plot_path if plot_written else None,
                           requests=requests_path if requests_path.is_file() else None,
                           kv_mode=runner_info.get("kv_mode", "concat"), seconds=wall, batch_plot=batch_plot)


class _Say:
    def __call__(self, text: str) -> None:
        print(text, flush=True)


def _open(target: Target, plan: Any, backend: str, options: dict[str, Any] | None = None) -> Any:
    from trt_latency.engines.backends import open_runner

    return open_runner(target.path, backend=backend, threads=plan.runtime.intra_op_threads,
                       inter_threads=plan.runtime.inter_op_threads, max_past_len=target.tier.max_past_len,
                       max_new_tokens=target.tier.max_prefill_len, seed=plan.sweep.seed,
                       huge_pages=plan.runtime.huge_pages, **(options or {}))


def _sweep_one(target: Target, plan: Any, backend: str, samples_path: Path, progress: bool,
               options: dict[str, Any] | None = None, say: Callable[[str], None] = print, refiner: Any = None,
               deadline: Any = None) -> tuple[dict[str, str], Any]:
    from trt_latency.engines.adaptive import describe
    from trt_latency.engines.sweep import run_sweep

    with _open(target, plan, backend, options) as runner:
        result = run_sweep(runner, target.key, plan, samples_path, progress=progress, refiner=refiner,
                           deadline=deadline)
        k = target.key
        summary = (f"  sweep tier_idx={k.tier_idx} top_k={k.top_k} num_active_blocks={k.num_active_blocks}: "
                   f"{result.rows_written} repetitions timed, {result.rows_skipped} already in "
                   f"{samples_path.name}, {len(result.positions)} decode positions up to "
                   f"{max(result.positions) if result.positions else 0}, {len(result.prefill_lengths)} prefill "
                   f"lengths, {_fmt_time(result.seconds)} ({runner.backend} on {runner.device}, "
                   f"kv_mode {getattr(runner, 'kv_mode', 'concat')})")
        say(summary)
        say(describe(result.states, plan.sweep.adaptive, plan.sweep.warmups()))
        return {"backend": runner.backend, "device": runner.device, "summary": summary,
                "kv_mode": getattr(runner, "kv_mode", "concat"),
                "memory": getattr(runner, "memory", ""),
                "token_input": getattr(runner, "token_input", "")}, result


# ------------------------------------------------------------------------------------------ adaptive

TAIL_SHARE = 0.3  # of --time-budget kept for fit + replay before any sweep has priced the replay
BATCH_SHARE = 0.15  # of --time-budget the batch sweep may use (past its MIN_ROUNDS)
FIT_RESERVE_S = 4.0  # fit, plot, loop terms and conformal factors (seconds, 2 cores)
MIN_PASS_S = 1.0  # a second pass shorter than this is not worth reopening a runner
REPLAY_OVERHEAD = 1.3  # a replayed request costs more than its engine steps (binding, argmax, embeds per step)


def _with_adaptive_flags(plan: Any, args: CalibrateOptions) -> Any:
    """The plan with --precision / --time-budget applied to its sweep.adaptive section."""
    from trt_latency.engines.config import AdaptiveSpec

    if args.precision is None and args.time_budget is None:
        return plan
    if args.precision is not None and not 0 <= args.precision < 1:
        raise ConfigError(field="--precision", expected="a relative standard error in [0, 1), e.g. 0.004",
                          got=args.precision)
    if args.time_budget is not None and not args.time_budget > 0:
        raise ConfigError(field="--time-budget", expected="a number of seconds > 0", got=args.time_budget)
    spec = plan.sweep.adaptive or AdaptiveSpec(precision=0.0)
    if args.precision is not None:
        spec = replace(spec, precision=float(args.precision))
    if args.time_budget is not None:
        spec = replace(spec, time_budget_s=float(args.time_budget))
    return replace(plan, sweep=replace(plan.sweep, adaptive=spec))


def _refiner(plan: Any) -> Any:
    """The fit's say on which positions need more rounds (estimator/refine.py); None for a fixed plan."""
    spec = plan.sweep.adaptive
    if spec is None or not spec.enabled:
        return None
    from trt_latency.estimator.refine import LopoRefiner

    return LopoRefiner()


def _sweep_deadline(started: float, budget: float | None, configs_left: int, replay_costs: list[float],
                    n_replays: int, now: float | None = None) -> float | None:
    """An equal share of what the budget leaves for sweeps to each config still to sweep (a config that
    finishes early hands its rest on). What follows the sweeps is priced from the sweeps measured so far
    (each config's replay from its own medians); with nothing measured yet, TAIL_SHARE of the budget."""
    if budget is None:
        return None
    now = time.perf_counter() if now is None else now
    if n_replays and not replay_costs:
        tail = TAIL_SHARE * budget
    else:
        mean = sum(replay_costs) / len(replay_costs) if replay_costs else 0.0
        tail = FIT_RESERVE_S + sum(replay_costs[:n_replays]) + mean * max(n_replays - len(replay_costs), 0)
    left = budget - tail - (now - started)
    return now + max(left, 0.0) / max(configs_left, 1)


def _deadline_fn(started: float, budget: float | None, configs_left: int, replay_costs: list[float],
                 n_replays: int, plan: Any, tier: Any, n_requests: int) -> Any:
    """The sweep's deadline as a function of its own state: re-read every round, it prices this config's
    replay from the medians measured so far (from the first rounds on), not only from the configs before."""
    if budget is None:
        return None
    start = time.perf_counter()
    requests = _requests_for_pricing(plan, tier, n_requests if n_replays else 0)

    def deadline(states: Any) -> float:
        own = _replay_seconds(states, plan, tier, n_requests, requests) if states and requests else None
        costs = replay_costs if own is None else [*replay_costs, own]
        end = _sweep_deadline(started, budget, configs_left, costs, n_replays, now=start)
        assert end is not None
        return end

    return deadline


def _requests_for_pricing(plan: Any, tier: Any, n: int) -> list[Any]:
    from trt_latency.engines.replay import draw_requests

    return draw_requests(plan.replay, n, tier) if n > 0 else []


def _replay_seconds(states: Any, plan: Any, tier: Any, n: int, requests: list[Any] | None = None) -> float | None:
    """The replay's cost for one config, priced from its sweep's medians: per request, prefill at the
    prompt length plus (output - 1) decode steps at the mean position it passes through."""
    dec = sorted((s.x, s.median()) for s in states if s.phase == "decode" and s.n)
    pre = sorted((s.x, s.median()) for s in states if s.phase == "prefill" and s.n)
    if n <= 0 or len(dec) < 2 or not pre:
        return None
    dx, dy = np.array(dec, dtype=np.float64).T
    px, py = np.array(pre, dtype=np.float64).T
    total_ms = 0.0
    for r in requests if requests is not None else _requests_for_pricing(plan, tier, n):
        prompt = r.vision_tokens + r.text_tokens
        total_ms += float(np.interp(prompt, px, py))
        total_ms += (r.output_tokens - 1) * float(np.interp(prompt + r.output_tokens / 2.0, dx, dy))
    return total_ms * 1e-3 * REPLAY_OVERHEAD


def _with_sweep_record(cal: Any, sweeps: dict[Any, Any], plan: Any) -> Any:
    """Each config's fit_error gains the sweep's per-position repetitions, achieved SE and stop reason."""
    from trt_latency.engines.adaptive import sweep_record

    configs = []
    for c in cal.configs:
        result = sweeps.get(tuple(c.key))
        if result is not None and result.states:
            c = replace(c, fit_error={**c.fit_error, **sweep_record(result.states, plan.sweep.adaptive)})
        configs.append(c)
    return replace(cal, configs=configs)


def _batch_sweep_one(target: Target, plan: Any, backend: str, samples_path: Path, progress: bool,
                     options: dict[str, Any] | None = None, say: Callable[[str], None] = print,
                     deadline: float | None = None) -> dict[str, str]:
    """The batch axis (plan.batch): batched decode steps per size into the same samples.csv; returns what
    the fit needs to know about the engine (batch_kv_read). A runner that cannot batch is reported, not fatal."""
    from trt_latency.engines.base import supports_batch
    from trt_latency.engines.batch_sweep import run_batch_sweep

    sizes = plan.batch.sizes
    with _open(target, plan, backend, {**(options or {}), "max_batch": max(sizes)}) as runner:
        name = _key_name(target.key)
        if not supports_batch(runner):
            say(f"  batch sweep {name}: skipped ({runner.backend} runner cannot batch this model)")
            return {}
        result = run_batch_sweep(runner, target.key, plan, samples_path, progress=progress, deadline=deadline)
        say(f"  batch sweep {name}: batch sizes {', '.join(str(b) for b in result.sizes)} (1 = the decode sweep), "
            f"{result.shapes} shapes, {result.rows_written} steps timed, {result.rows_skipped} already in "
            f"{samples_path.name}, {_fmt_time(result.seconds)}"
            + (" (time budget share used up: fewer rounds than the plan's)" if result.out_of_time else "")
            + f"; kv_read {runner.batch_kv_read}")
        return {"batch_kv_read": runner.batch_kv_read}


def _plot_batch(samples: Any, cal: Any, path: Path, runner_info: dict[str, str]) -> Path | None:
    try:
        from trt_latency.plots import plot_batch

        title = f"trt-latency batched decode: {runner_info.get('backend', '')} on {runner_info.get('device', '')}"
        return Path(written) if (written := plot_batch(samples, cal, path, title=title)) else None
    except ImportError:  # matplotlib missing
        return None


def _fit(samples_path: Path, plan: Any, targets: list[Target], runner_info: dict[str, str],
         args: CalibrateOptions) -> tuple[Any, Any]:
    from trt_latency.estimator.fit import fit_samples
    from trt_latency.estimator.samples import read_samples

    samples = read_samples(samples_path)
    keys = {tuple(t.key) for t in targets}
    keep = np.array([(int(a), int(b), int(c)) in keys for a, b, c in
                     zip(samples.tier_idx, samples.top_k, samples.num_active_blocks, strict=True)], dtype=bool)
    if not keep.all():  # rows of configs this plan does not list (an older run into the same folder)
        samples = _subset(samples, keep)
    kv_bytes = {tuple(t.key): t.tier.kv_bytes_per_token(t.key.num_active_blocks) for t in targets}
    cal = fit_samples(samples, kv_bytes_per_token=kv_bytes, batch_kv_read=runner_info.get("batch_kv_read"))
    provenance = dict(cal.provenance)
    provenance.update(
        backend=runner_info.get("backend", ""),
        device=runner_info.get("device", ""),
        kv_mode=runner_info.get("kv_mode", "concat"),
        memory=runner_info.get("memory", ""),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=_versions(),
        plan={"source": str(plan.source), "quick": bool(plan.quick),
              "configs": [list(t.key) for t in targets]},
        models={f"t{t.key.tier_idx}.k{t.key.top_k}.b{t.key.num_active_blocks}": {
            "path": str(t.path), "sha256": _sha256(t.path)} for t in targets},
        engine_sha256=_sha256(targets[0].path),
        tiers={str(t.tier.tier_idx): {f: getattr(t.tier, f) for f in t.tier.__dataclass_fields__} for t in targets},
    )
    sigs = {_key_name(t.key): _signature_record(t.signature) for t in targets if t.signature is not None}
    if sigs:
        provenance["signatures"] = sigs
    cal = replace(cal, provenance=provenance)
    return cal, samples


def _signature_record(sig: Any) -> dict[str, Any]:
    """What calibration.yaml keeps of a user model's signature (how it was bound, and where dims came from)."""
    d = sig.describe()
    return {k: d[k] for k in ("token_input", "attention_mask", "position_ids", "kv_layout", "blocks", "kv_heads",
                              "head_dim", "kv_dtype", "max_past_len", "share_buffer", "sources")}


def _subset(samples: Any, keep: np.ndarray) -> Any:
    from dataclasses import fields

    values = {}
    for f in fields(samples):
        v = getattr(samples, f.name)
        if isinstance(v, np.ndarray):
            values[f.name] = v[keep]
        elif isinstance(v, list):
            values[f.name] = [x for x, k in zip(v, keep, strict=True) if k]
        else:
            values[f.name] = v
    return type(samples)(**values)


def _load(path: Path) -> Any:
    from trt_latency.estimator.calibration import load_calibration

    return load_calibration(path)


def _plot(samples: Any, cal: Any, path: Path, runner_info: dict[str, str]) -> bool:
    try:
        from trt_latency.plots import plot_calibration
    except ImportError:
        return False
    title = f"trt-latency calibration: {runner_info.get('backend', '')} on {runner_info.get('device', '')}"
    try:
        plot_calibration(samples, cal, path, title=title)
    except ImportError:  # matplotlib missing: the calibration stands without its picture
        return False
    return True


def _replay(target: Target, plan: Any, backend: str, requests_path: Path, n: int, progress: bool,
            id_offset: int = 0, options: dict[str, Any] | None = None, say: Callable[[str], None] = print,
            vision: Any = None) -> Any:
    from trt_latency.engines.replay import run_replay

    spec = replace(plan.replay, requests=n)
    with _open(target, plan, backend, options) as runner:
        if getattr(runner, "token_input", "") == "input_ids":
            say("  " + VISION_NOTE)
        chain = None
        if vision is not None:  # requests with vision tokens run encoder -> embedding -> decoder
            from trt_latency.pipeline_vision import open_chain

            chain = open_chain(vision, plan.runtime.intra_op_threads, plan.runtime.huge_pages)
        result = run_replay(runner, target.key, target.tier, spec, requests_path, n, progress=progress,
                            id_offset=id_offset, chain=chain)
    say(f"  replay {_key_name(target.key)} (request_id {id_offset}..{id_offset + n - 1}): "
        f"{result.rows_written} replayed in {_fmt_time(result.seconds)}, {result.rows_skipped} already there")
    return result


def _key_name(key: Any) -> str:
    t, k, b = (int(x) for x in key)
    return f"t{t}.k{k}.b{b}"


def borrow_primary_loop(loops: dict[Any, Any], primary: Any, keys: list[Any]) -> dict[Any, Any]:
    """`loops` with every config of `keys` that has no replay-fitted terms given the primary's (when
    the primary has them), flagged source "borrowed:<primary>". Conformal factors are never borrowed."""
    from trt_latency.estimator.calibration import ServingLoop, borrowed_source

    donor = loops.get(tuple(primary))
    if donor is None or donor.source != "replay":
        return dict(loops)
    out = dict(loops)
    for key in keys:
        key = tuple(key)
        if key != tuple(primary) and (key not in out or out[key].source != "replay"):
            out[key] = ServingLoop(donor.decode_step_ms, donor.first_step_ms, donor.prefill_ms,
                                   donor.n_requests, borrowed_source(tuple(primary)))
    return out


LOOP_HEADER = ("  serving loop: total(n) = prefill + o_p + [n>=2] c + sum (T_engine + o); terms fitted on the "
               "even request_ids of each config, checked on the odd ones")


def _in_plan_order(cal: Any, keys: list[Any]) -> list[Any]:
    """The calibration's configs in the plan's order (primary first)."""
    by_key = {c.key: c for c in cal.configs}
    return [by_key[tuple(int(x) for x in k)] for k in keys if tuple(int(x) for x in k) in by_key]


def _loop_rows(configs: list[Any], reports: dict[Any, Any]) -> list[str]:
    """One line per config: its terms and where they come from."""
    lines = [f"    {'config':<9} {'o ms/step':>9} {'c ms once':>9} {'o_p ms':>8}  source"]
    for c in configs:
        lp = c.serving_loop
        if lp is None:
            lines.append(f"    {_key_name(c.key):<9} {'-':>9} {'-':>9} {'-':>8}  none (no replay): engine-only")
            continue
        src = lp.source
        r = reports.get(c.key)
        if lp.source == "replay":
            src = f"replay ({lp.n_requests} requests)"
        elif lp.source == "none":
            src = f"none (only {r.n_fit if r else 0} fit requests): zero"
        else:
            src = f"{lp.source} ({lp.n_requests} requests there)"
        lines.append(f"    {_key_name(c.key):<9} {lp.decode_step_ms:>9.4f} {lp.first_step_ms:>9.4f} "
                     f"{lp.prefill_ms:>8.4f}  {src}")
    return lines


def _no_log_lines() -> list[str]:
    """No request log at all: nothing to fit or borrow; say so in one line."""
    return ["  serving loop: no replayed requests: engine-only predictions, no conformal factors "
            "(admit(alpha=...) uses the residual quantiles)"]


def _serving_loop_and_conformal(cal_path: Path, requests_path: Path, keys: list[Any]) -> tuple[list[str], str]:
    """Fit the serving-loop terms per config on its even request_ids, store them (configs without
    enough rows borrow the primary's), then the conformal factors per config from its odd ones only
    (scored against the serving prediction), so the factors' coverage guarantee is not spent on data
    the loop terms were fitted to. Returns (summary lines, note for the requests line)."""
    from trt_latency.estimator.calibration import save_calibration, with_serving_loop
    from trt_latency.estimator.fit import fit_serving_loop, split_requests
    from trt_latency.estimator.model import Estimator
    from trt_latency.estimator.requests import read_requests
    from trt_latency.serving.conformal import attach_conformal, fit_conformal

    wanted = {tuple(int(x) for x in k) for k in keys}
    try:
        cal = _load(cal_path)
        log = read_requests(requests_path)
        if len(log) == 0:
            return _no_log_lines(), ""
        # Rows of configs this plan does not list (an older run into the same folder) take no part.
        mine = np.array([(int(a), int(b), int(c)) in wanted for a, b, c in
                         zip(log.tier_idx, log.top_k, log.num_active_blocks, strict=True)], dtype=bool)
        fit_mask, holdout = split_requests(log.request_id)
        reports = fit_serving_loop(log, Estimator(cal), fit_mask & mine, holdout & mine)
        loops = borrow_primary_loop({k: r.loop for k, r in reports.items()}, keys[0], keys)
        cal = with_serving_loop(cal, loops)
        save_calibration(cal, cal_path)
    except TrtLatencyError as exc:
        return [], f"; serving-loop terms and conformal factors not stored ({exc})"
    configs = _in_plan_order(cal, keys)
    lines = [LOOP_HEADER, *_loop_rows(configs, reports)]
    lines.append("  held-out total time, median |measured/predicted - 1|: engine-only -> with loop terms "
                 "(decode part alone; median measured/predicted)")
    for c in configs:
        r = reports.get(c.key)
        if r is None or r.n_holdout == 0:
            lines.append(f"    {_key_name(c.key):<9} no held-out requests")
            continue
        lines.append(f"    {_key_name(c.key):<9} {r.n_holdout:>4} requests: {r.holdout_median_rel_engine:6.1%} -> "
                     f"{r.holdout_median_rel_serving:6.1%}  (decode {r.holdout_decode_median_rel_engine:6.1%} -> "
                     f"{r.holdout_decode_median_rel_serving:6.1%}; ratio {r.holdout_median_ratio_engine:.3f} -> "
                     f"{r.holdout_median_ratio_serving:.3f})")
    names = ("vision_tokens", "text_tokens", "output_tokens", "tier_idx", "top_k", "num_active_blocks", "total_ms")
    held = {name: np.asarray(getattr(log, name))[holdout & mine] for name in names}
    lines.append("  conformal factors (each config's odd request_ids, against its serving prediction)")
    try:
        fits = fit_conformal(Estimator(cal), held)
        if fits:
            cal = attach_conformal(cal, fits)
            save_calibration(cal, cal_path)
    except TrtLatencyError as exc:
        return lines, f"; conformal factors not stored ({exc})"
    for c in configs:
        f = fits.get(c.key)
        if f is None:
            lines.append(f"    {_key_name(c.key):<9} none (no held-out requests of its own): admit(alpha=...) "
                         "uses the residual quantiles")
            continue
        shown = ", ".join(f"{a:g}: {v:.3f}" if np.isfinite(v) else f"{a:g}: n/a"
                          for a, v in zip(f.alphas, f.factors, strict=True))
        lines.append(f"    {_key_name(c.key):<9} n = {f.n:>4}, alpha -> factor  {shown}")
    n_loop = sum(1 for c in cal.configs if c.serving_loop is not None and c.serving_loop.source == "replay")
    n_borrowed = sum(1 for c in cal.configs if c.serving_loop is not None
                     and c.serving_loop.source.startswith("borrowed:"))
    note = f"; loop terms fitted for {n_loop} config(s)"
    if n_borrowed:
        note += f", borrowed by {n_borrowed}"
    return lines, note + f", conformal factors for {len(fits)} config(s)"
