"""The calibration pipeline as a library function: export -> measure (per config: pilot, sweep, batch sweep,
encoder sweep, replay) -> finish (fit -> calibration.yaml, decode.png, serving-loop terms fitted on the even
request_ids, conformal factors from the odd ones). `trt-latency calibrate` only parses its flags into
CalibrateOptions and calls ``calibrate``.

    from trt_latency.pipeline import CalibrateOptions, calibrate
    result = calibrate(CalibrateOptions(onnx="model.onnx", out="out", quick=True))

Two public steps, shared by the local run and `calibrate --ray` (trt_latency/cluster.py):
``measure(target, MeasurePlan, Sinks, deadline)`` runs every measuring phase of one config, rows into
sinks (files here, a queue to the Ray driver there); ``finish(out, plan, targets, measured, options)``
fits and writes from the files. --time-budget bounds the whole run: trt_latency/budget.py splits it
(a pilot prices the measurements; each config's window covers its replay too); trt_latency/report.py
formats the report.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.engines.signature import capped_past
from trt_latency.errors import ConfigError, TrtLatencyError
from trt_latency.report import (
    LOOP_HEADER,
    conformal_lines,
    extrapolation_lines,
    fmt_time,
    holdout_lines,
    key_name,
    loop_rows,
    no_log_lines,
    position_table,
    time_lines,
)

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
    max_prompt: int | None = None  # longest prompt timed on a model you bring (None: sweep.prefill.model_max_len)
    precision: float | None = None  # target relative SE of each position's median (None: the plan's; 0: fixed)
    time_budget: float | None = None  # seconds for the whole calibrate (None: the plan's)
    runtime: str = "auto"  # the replay's loop: auto | ort | genai (engines/genai_loop.py)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: the plan's runtime.intra_op_threads)
    huge_pages: bool | None = None  # --huge-pages / --no-huge-pages (None: the plan's runtime.huge_pages)
    replay_processes: int | None = None  # fresh replay processes (None: the plan's runtime.replay_processes)
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
    return out / f"model.{key_name(key)}.onnx"


def export_if_needed(tier: Any, key: Any, path: Path, seed: int) -> bool:
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
    # The longest prompt: --max-prompt, else the plan's for a user's model (sweep.prefill.model_max_len), and it
    # fits the model too (a prefill of S writes positions 0 .. S-1).
    wanted = getattr(args, "max_prompt", None) or plan.sweep.prefill.model_max_len or base.max_prefill_len
    max_prefill = min(wanted, sig.max_past_len + 1) if sig.max_past_len else wanted
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


# The packaged plan's budget (configs/default.yaml, 115 s) buys every figure on small models. A real-size
# model (the Qwen2.5-0.5B-shaped genai int4 export: 289 MiB of weights) needs more: its floors, and the steady
# step within 5 % of the runtime's own, held at 240 s in every same-backing run and missed at 115 s (README,
# "Real-size models"). So a model of at least REAL_SIZE_MIB gets REAL_SIZE_BUDGET_S when the user left the
# budget to the packaged plan.
REAL_SIZE_MIB = 100
REAL_SIZE_BUDGET_S = 240.0


def model_files(path: Path) -> list[Path]:
    """The model and its side files (external weights: NAME.data, NAME_data, ...)."""
    if not path.parent.is_dir():
        return []
    return [p for p in sorted(path.parent.iterdir())
            if p.is_file() and (p == path or p.name.startswith(path.name) or p.name.startswith(path.stem + "."))]


def sized_budget(args: CalibrateOptions, plan: Any, targets: list[Target]) -> tuple[Any, str]:
    """``plan`` with REAL_SIZE_BUDGET_S when the packaged plan's budget would be spent on a real-size model
    (its files >= REAL_SIZE_MIB), and why ("" when unchanged). A --time-budget, a plan of the user's own or
    --quick keeps its budget."""
    spec = plan.sweep.adaptive
    if (args.time_budget is not None or args.config is not None or args.quick or spec is None
            or not spec.time_budget_s or spec.time_budget_s >= REAL_SIZE_BUDGET_S):
        return plan, ""
    size = max((sum(f.stat().st_size for f in model_files(Path(t.path))) for t in targets), default=0)
    if size < REAL_SIZE_MIB << 20:
        return plan, ""
    why = (f"{REAL_SIZE_BUDGET_S:.0f} s, the default for a real-size model ({size / 2**20:.0f} MiB of weights, "
           f">= {REAL_SIZE_MIB} MiB; the packaged plan's {spec.time_budget_s:.0f} s is for small ones)")
    return replace(plan, sweep=replace(plan.sweep, adaptive=replace(spec, time_budget_s=REAL_SIZE_BUDGET_S))), why


def targets_for(args: CalibrateOptions, plan: Any, out: Path) -> tuple[Any, list[Target]]:
    """The configs to time and their model files, with the plan narrowed to them (a user's --onnx: its own
    tier). Callers then apply ``sized_budget``."""
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


# ------------------------------------------------------------------------------------------ measure


@dataclass
class MeasurePlan:
    """What ``measure`` does for one target: every measuring phase, each switched on here."""

    plan: Any  # the plan (engines.config.Plan), flags applied
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)  # kv_mode, io, dims for the runner
    sweep: bool = True  # the decode / prefill sweep
    batch: bool = False  # the plan's batch sweep (plan.batch) on this target
    requests: int = 0  # replayed requests (the plan's size: a cap the budget may lower; 0: no replay)
    exact_requests: bool = False  # --requests N: replay N, budget or not (the deadline still stops it)
    id_offset: int = 0  # request_ids of this target: id_offset + 0 .. n-1
    vision: Any = None  # CalibrateOptions with the VLM chain's flags: the replay runs the chain
    vision_sweep: bool = False  # sweep the encoder here (one target per calibration)
    pilot: bool = True  # price the measurements first and size the plan to the deadline
    refine: bool = True  # the fit's refiner sends positions back (adaptive plans)
    progress: bool = True
    runtime: str = "auto"  # the replay's loop (engines/genai_loop.choose_loop): auto | ort | genai


@dataclass
class Sinks:
    """Where ``measure`` writes: sweep and batch rows, request rows, the encoder sweep's file."""

    samples: Any  # engines.sweep.RowSink
    requests: Any = None  # engines.replay.RequestSink (None: no replay)
    vision: Path | None = None  # vision_samples.csv, written whole by the encoder sweep
    # Called with the first runner before any sink is read: a sink whose resume state depends on the
    # device (a Ray actor: one folder per device class) learns it here.
    opened: Callable[[Any], None] | None = None


@dataclass
class Measured:
    """What ``measure`` hands to ``finish`` (plain data: a Ray actor returns it to the driver)."""

    key: Any
    plan: Any  # the plan as sized for this target (a second pass reuses it)
    runner: dict[str, str] = field(default_factory=dict)  # backend, device, kv_mode, memory, token_input, ...
    sweep: Any = None  # engines.sweep.SweepResult
    batch: Any = None  # engines.batch_sweep.BatchSweepResult
    replay: Any = None  # engines.replay.ReplayResult
    vision: dict[str, Any] | None = None  # the encoder sweep: what the vision fit needs (pipeline_vision)
    prices: Any = None  # budget.Prices from the pilot
    notes: list[str] = field(default_factory=list)  # what the budget changed
    ledger: Any = None  # budget.Ledger: seconds per phase, overruns
    reach: dict[str, int] = field(default_factory=dict)  # measured vs replayed lengths (extrapolation)


def open_target(target: Target, plan: Any, backend: str, options: dict[str, Any] | None = None) -> Any:
    """The runner every measuring phase of ``target`` opens (plan's threads, page backing, profile)."""
    from trt_latency.engines.backends import open_runner

    return open_runner(target.path, backend=backend, threads=plan.runtime.intra_op_threads,
                       inter_threads=plan.runtime.inter_op_threads, max_past_len=target.tier.max_past_len,
                       max_new_tokens=target.tier.max_prefill_len, seed=plan.sweep.seed,
                       huge_pages=plan.runtime.huge_pages, **(options or {}))


def open_replay_runner(target: Target, plan: Any, backend: str, options: dict[str, Any] | None = None,
                       runtime: str = "ort", resolved_backend: str = "ort-cpu", embeddings: bool = False,
                       say: Callable[[str], None] = print) -> Any:
    """The runner the replay serves requests with: the one place the serving loop is chosen. onnxruntime-genai's
    own Generator where ``runtime`` picks it (engines/genai_loop.py: genai_config.json beside the model, CPU),
    else the ONNX Runtime / TensorRT runner the sweep used. ``resolved_backend``: the backend the sweep's
    runner reported (``backend`` may say auto). On ONNX Runtime's CPU provider the loop runs in
    ``plan.runtime.replay_processes`` fresh processes (engines/replay_processes.py); a VLM chain's replay, whose
    encoder feeds the runner's own buffers, and the GPU backends (one CUDA context per process, not measured
    on a device yet) stay in this process."""
    from functools import partial

    from trt_latency.engines.genai_loop import choose_loop
    from trt_latency.engines.genai_loop import open_replay_runner as open_loop

    choice = choose_loop(runtime, target.path, resolved_backend, embeddings=embeddings)
    processes = replay_process_count(plan, resolved_backend, embeddings)
    return open_loop(choice, partial(open_target, target, plan, backend, options), plan.runtime.intra_op_threads,
                     plan.runtime.huge_pages, say, processes=processes)


def replay_process_count(plan: Any, resolved_backend: str, embeddings: bool) -> int:
    """Fresh processes the replay runs in: the plan's runtime.replay_processes on ONNX Runtime's CPU provider
    for token-id requests, else 0 (in this process)."""
    return int(plan.runtime.replay_processes) if resolved_backend == "ort-cpu" and not embeddings else 0


def loop_record(options: CalibrateOptions, target: Target, resolved_backend: str) -> str:
    """The provenance ``loop`` entry ("genai x.y" or "ort"): the same choice open_replay_runner makes."""
    from trt_latency.engines.genai_loop import choose_loop, loop_provenance

    return loop_provenance(choose_loop(options.runtime, target.path, resolved_backend,
                                       embeddings=bool(options.vision_onnx)))


def refiner_for(plan: Any) -> Any:
    """The fit's say on which positions need more rounds (estimator/refine.py); None for a fixed plan."""
    spec = plan.sweep.adaptive
    if spec is None or not spec.enabled:
        return None
    from trt_latency.estimator.refine import LopoRefiner

    return LopoRefiner()


def measure(target: Target, plan: MeasurePlan, sinks: Sinks, deadline: float | None,
            say: Callable[[str], None] = print) -> Measured:
    """Every measuring phase of one target, rows into ``sinks``: pilot (prices, with a deadline), replay,
    batch sweep, encoder sweep (VLM chain), decode / prefill sweep. ``deadline``: time.time() at which this
    target's phases end (None: the plan's sizes, no budget). The priced phases come first, each stopping at
    its own deadline and keeping what it did (a rerun continues); the adaptive sweep, which can use any
    time, comes last and ends at ``deadline`` (after at least its MIN_ROUNDS). The local run calls it per
    target, a Ray actor per work item: one pipeline (DESIGN.md, Scale-out)."""
    from trt_latency.budget import Allocation, Ledger, allocate

    ledger = Ledger()
    end = None if deadline is None else time.perf_counter() + max(deadline - time.time(), 0.0)
    name = key_name(target.key)
    p = plan.plan
    out = Measured(key=target.key, plan=p, ledger=ledger)
    replay_vision = plan.vision if plan.vision is not None and plan.vision.vision_onnx else None
    if replay_vision is None:  # no encoder to replay: the mix is prompts (budget, replay and reach alike)
        from trt_latency.engines.replay import prompt_only

        p = replace(p, replay=prompt_only(p.replay))
    n = plan.requests if sinks.requests is not None else 0
    alloc = Allocation(plan=p, requests=n)
    with open_target(target, p, plan.backend, plan.options) as runner:
        out.runner = runner_record(runner, p)
        if sinks.opened is not None:
            sinks.opened(runner)
        if plan.pilot and end is not None:
            with ledger.phase("pilot"):
                out.prices = _pilot(runner, target, p)
            alloc = allocate(out.prices, p, target.tier, end - time.perf_counter(), requests=n,
                             exact=plan.exact_requests, batch=plan.batch and p.batch is not None,
                             vision=plan.vision_sweep and replay_vision is not None)
            out.plan = p = alloc.plan
            out.notes = alloc.notes
            for note in alloc.notes:
                say(f"  budget {name}: {note}")
    if n > 0 and alloc.requests > 0:
        # Stops where the phases after it would lose their shares (the sweep keeps its MIN_ROUNDS' price).
        # ... but never before its MIN_LOOP_REQUESTS (budget.py): the loop terms are a floor like MIN_ROUNDS.
        replay_end = None if end is None else max(end - alloc.batch_s - alloc.vision_s - alloc.sweep_floor_s,
                                                  time.perf_counter() + alloc.replay_floor_s)
        with ledger.phase("replay", replay_end, where=name):
            out.replay = _replay(target, plan, alloc.requests, sinks.requests, replay_end, replay_vision, say,
                                 str(out.runner.get("backend", "ort-cpu")), sized=p)
        # The longest request the mix can draw (engines/replay.draw_requests caps it at the tier).
        prompt = min(max(p.replay.vision_tokens) + p.replay.text_tokens[1], target.tier.max_prefill_len)
        out.reach.update(prompt_max=prompt,
                         kv_max=min(prompt + p.replay.output_tokens[1] - 1, target.tier.max_past_len))
    if plan.batch and p.batch is not None:
        batch_end = None if end is None else time.perf_counter() + alloc.batch_s
        with ledger.phase("batch sweep", batch_end, where=name):
            out.batch, info = _batch_sweep(target, plan, sinks.samples, batch_end, say)
        out.runner.update(info)
    if plan.vision_sweep and replay_vision is not None and sinks.vision is not None:
        from trt_latency.pipeline_vision import sweep_vision

        vision_s = alloc.vision_s if end is not None else None
        with ledger.phase("vision", None if vision_s is None else time.perf_counter() + vision_s, where=name):
            out.vision = sweep_vision(replay_vision, p, sinks.vision, vision_s)
    if plan.sweep:
        with ledger.phase("sweep", end, where=name):
            out.sweep = _sweep(target, plan, p, sinks.samples, end, say)
        out.reach.update(decode_max=max(out.sweep.positions, default=0),
                         prefill_max=max(out.sweep.prefill_lengths, default=0))
    return out


def _sweep(target: Target, plan: MeasurePlan, p: Any, sink: Any, end: float | None,
           say: Callable[[str], None]) -> Any:
    from trt_latency.engines.adaptive import describe
    from trt_latency.engines.sweep import run_sweep

    with open_target(target, p, plan.backend, plan.options) as runner:
        result = run_sweep(runner, target.key, p, sink, progress=plan.progress,
                           refiner=refiner_for(p) if plan.refine else None, deadline=end)
        k = target.key
        say(f"  sweep tier_idx={k.tier_idx} top_k={k.top_k} num_active_blocks={k.num_active_blocks}: "
            f"{result.rows_written} repetitions timed, {result.rows_skipped} already in "
            f"{Path(result.path).name}, {len(result.positions)} decode positions up to "
            f"{max(result.positions) if result.positions else 0}, {len(result.prefill_lengths)} prefill "
            f"lengths up to {max(result.prefill_lengths) if result.prefill_lengths else 0}, "
            f"{fmt_time(result.seconds)} ({runner.backend} on {runner.device}, "
            f"kv_mode {getattr(runner, 'kv_mode', 'concat')})")
    say(describe(result.states, p.sweep.adaptive, p.sweep.warmups()))
    return result


def runner_record(runner: Any, plan: Any) -> dict[str, str]:
    """What the calibration records of the runner that measured (provenance and the summary)."""
    return {"backend": runner.backend, "device": runner.device, "kv_mode": getattr(runner, "kv_mode", "concat"),
            "memory": getattr(runner, "memory", ""), "token_input": getattr(runner, "token_input", ""),
            "threads": str(plan.runtime.intra_op_threads), "inter_threads": str(plan.runtime.inter_op_threads)}


def _pilot(runner: Any, target: Target, plan: Any) -> Any:
    """budget.pilot on this runner: its decode / prefill prices and one replayed request's overhead."""
    from trt_latency.budget import pilot
    from trt_latency.engines.replay import random_prompt
    from trt_latency.engines.sweep import prefill_lengths

    max_new = getattr(runner, "max_new_tokens", None)
    lengths = prefill_lengths(target.tier, plan.sweep, max_new)
    dtype = np.float16 if target.tier.dtype == "float16" else np.float32

    def one_request(prices: Any) -> float:
        # A short request (prompt 32, 8 tokens out) through the runner's own loop, against its price.
        prompt, output = min(32, max(lengths or [32])), 8
        embeds = random_prompt(runner, prompt, dtype, np.random.default_rng([plan.sweep.seed, 31337]))
        res = runner.generate(embeds, output)
        priced = prices.prefill_ms(prompt) + (output - 1) * prices.decode_ms(prompt + output / 2.0)
        return float(res.total_ms) / priced if priced > 0 else 1.0

    return pilot(runner, min(target.tier.max_past_len, runner.max_past_len), lengths,
                 one_request if hasattr(runner, "generate") else None)


def _batch_sweep(target: Target, plan: MeasurePlan, sink: Any, deadline: float | None,
                 say: Callable[[str], None]) -> tuple[Any, dict[str, str]]:
    """The batch axis (plan.batch): batched decode steps per size into the sweep's sink; returns the result
    and what the fit needs to know about the engine (batch_kv_read). A runner that cannot batch is
    reported, not fatal."""
    from trt_latency.engines.base import supports_batch
    from trt_latency.engines.batch_sweep import run_batch_sweep

    p = plan.plan
    with open_target(target, p, plan.backend, {**plan.options, "max_batch": max(p.batch.sizes)}) as runner:
        name = key_name(target.key)
        if not supports_batch(runner):
            say(f"  batch sweep {name}: skipped ({runner.backend} runner cannot batch this model)")
            return None, {}
        result = run_batch_sweep(runner, target.key, p, sink, progress=plan.progress, deadline=deadline)
        say(f"  batch sweep {name}: batch sizes {', '.join(str(b) for b in result.sizes)} (1 = the decode sweep), "
            f"{result.shapes} shapes, {result.rows_written} steps timed, {result.rows_skipped} already in "
            f"{Path(result.path).name}, {fmt_time(result.seconds)}"
            + (" (time budget share used up: fewer rounds than the plan's)" if result.out_of_time else "")
            + f"; kv_read {runner.batch_kv_read}")
        return result, {"batch_kv_read": runner.batch_kv_read}


def _replay(target: Target, plan: MeasurePlan, n: int, sink: Any, deadline: float | None, vision: Any,
            say: Callable[[str], None], resolved_backend: str = "ort-cpu", sized: Any = None) -> Any:
    """``sized``: the plan as the budget sized it (its replay mix), else the MeasurePlan's own."""
    from trt_latency.engines.replay import mix_line, run_replay

    p = plan.plan if sized is None else sized
    spec = replace(p.replay, requests=n)
    with open_replay_runner(target, p, plan.backend, plan.options, plan.runtime, resolved_backend,
                            embeddings=vision is not None, say=say) as runner:
        if vision is None:
            say(f"  replay {key_name(target.key)}: {mix_line(spec)}")
        chain = None
        if vision is not None:  # requests with vision tokens run encoder -> embedding -> decoder
            from trt_latency.pipeline_vision import open_chain

            chain = open_chain(vision, p.runtime.intra_op_threads, p.runtime.huge_pages)
        result = run_replay(runner, target.key, target.tier, spec, sink, n, progress=plan.progress,
                            id_offset=plan.id_offset, chain=chain, deadline=deadline)
    cut = (f"; --time-budget reached after {result.rows_written + result.rows_skipped} of {n} (a rerun into the "
           "same --out replays the rest)" if result.out_of_time else "")
    say(f"  replay {key_name(target.key)} (request_id {plan.id_offset}..{plan.id_offset + n - 1}): "
        f"{result.rows_written} replayed in {fmt_time(result.seconds)}, {result.rows_skipped} already there{cut}")
    return result


# ------------------------------------------------------------------------------------------ finish


@dataclass
class Finished:
    """What ``finish`` wrote and the report lines it has for the summary."""

    calibration: Path
    samples: Any  # estimator.samples.Samples (all rows of the calibration's configs)
    plot: Path | None
    batch_plot: Path | None
    loop_lines: list[str]
    vision_lines: list[str]
    replay_note: str


def finish(out: Path, plan: Any, targets: list[Target], measured: list[Measured], options: CalibrateOptions,
           ledger: Any = None) -> Finished:
    """Fit, provenance, the sweep record, the vision section, plots, serving-loop terms and conformal
    factors, from the files in ``out`` (samples.csv, requests.csv, vision_samples.csv): the local run and
    the Ray driver call it alike."""
    from trt_latency.budget import Ledger
    from trt_latency.estimator.calibration import save_calibration

    ledger = ledger if ledger is not None else Ledger()
    cal_path, samples_path, requests_path = out / "calibration.yaml", out / "samples.csv", out / "requests.csv"
    info = dict(measured[0].runner) if measured else {}  # the primary's runner, as it measured
    kv_read = next((m.runner["batch_kv_read"] for m in measured if m.runner.get("batch_kv_read")), None)
    if kv_read:  # the batch sweep's engine (the primary's, or every config's with batch.all_configs)
        info["batch_kv_read"] = kv_read
    with ledger.phase("fit"):
        cal, samples = _fit(samples_path, plan, targets, info, options)
        cal = _with_sweep_record(cal, {tuple(m.key): m.sweep for m in measured if m.sweep is not None}, plan)
        save_calibration(cal, cal_path)
    vision_lines: list[str] = []
    swept = next((m.vision for m in measured if m.vision), None)
    if swept is not None and options.vision_onnx:
        from trt_latency.pipeline_vision import fit_vision_section

        with ledger.phase("fit"):
            vision_lines = fit_vision_section(options, swept, out / "vision_samples.csv", cal_path)
    plot_written = batch_plot = None
    if not options.no_plot:
        with ledger.phase("plot"):
            plot_written = plot_path if _plot(samples, cal, (plot_path := out / "decode.png"), info) else None
            batch_plot = _plot_batch(samples, cal, out / "batch.png", info)
    replaying = any(m.replay is not None for m in measured)
    replay_note = "skipped (--no-replay)" if options.no_replay else "skipped (0 requests)"
    if replaying:
        rs = [m.replay for m in measured if m.replay is not None]
        written, skipped = sum(r.rows_written for r in rs), sum(r.rows_skipped for r in rs)
        cut = sum(1 for r in rs if r.out_of_time)
        replay_note = (f"{written + skipped} requests ({written} replayed in {fmt_time(sum(r.seconds for r in rs))}, "
                       f"{skipped} already there)"
                       + (f"; --time-budget stopped {cut} config(s)' replay early" if cut else ""))
    if requests_path.is_file() and requests_path.stat().st_size > 0:
        # Also with --no-replay: the rows an earlier run left keep their loop terms and factors.
        with ledger.phase("loop terms"):
            loop_lines, note = serving_loop_and_conformal(cal_path, requests_path, [t.key for t in targets])
        if not replaying:
            replay_note += f", the {requests_path.name} an earlier run left is used"
        replay_note += note
    else:
        loop_lines = no_log_lines()
    return Finished(calibration=cal_path, samples=samples, plot=plot_written, batch_plot=batch_plot,
                    loop_lines=loop_lines, vision_lines=vision_lines, replay_note=replay_note)


def _fit(samples_path: Path, plan: Any, targets: list[Target], runner_info: dict[str, str],
         options: CalibrateOptions) -> tuple[Any, Any]:
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
        threads={"intra_op": int(runner_info.get("threads") or plan.runtime.intra_op_threads),
                 "inter_op": int(runner_info.get("inter_threads") or plan.runtime.inter_op_threads)},
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=_versions(),
        plan={"source": str(plan.source), "quick": bool(plan.quick),
              "configs": [list(t.key) for t in targets]},
        models={key_name(t.key): {"path": str(t.path), "sha256": _sha256(t.path)} for t in targets},
        engine_sha256=_sha256(targets[0].path),
        loop=loop_record(options, targets[0], runner_info.get("backend", "")),  # the replay's loop
        # ... and how many fresh processes it ran in (0: the calibrating process; docs/decisions.md 14)
        replay_processes=replay_process_count(plan, runner_info.get("backend", ""), bool(options.vision_onnx)),
        tiers={str(t.tier.tier_idx): {f: getattr(t.tier, f) for f in t.tier.__dataclass_fields__} for t in targets},
    )
    ort = onnxruntime_build()
    if ort:
        provenance["onnxruntime"] = ort
    sigs = {key_name(t.key): _signature_record(t.signature) for t in targets if t.signature is not None}
    if sigs:
        provenance["signatures"] = sigs
    cal = replace(cal, provenance=provenance)
    return cal, samples


def onnxruntime_build() -> dict[str, Any]:
    """The ONNX Runtime this process times with, for provenance and the summary: engines/ort/runtime_info's
    ort_build() (package, version, providers, every installed flavour, a warning when they disagree); {}
    without one (a TensorRT-only host)."""
    from trt_latency.engines.ort.runtime_info import ort_build

    info = ort_build()
    return {k: v for k, v in info.items() if v not in (None, [], {})} if info.get("version") else {}


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


def load(path: Path) -> Any:
    from trt_latency.estimator.calibration import load_calibration

    return load_calibration(path)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {"python": sys.version.split()[0], "numpy": np.__version__}
    for dist in ("trt-latency", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _signature_record(sig: Any) -> dict[str, Any]:
    """What calibration.yaml keeps of a user model's signature (how it was bound, and where dims came from)."""
    d = sig.describe()
    return {k: d[k] for k in ("token_input", "attention_mask", "position_ids", "kv_layout", "blocks", "kv_heads",
                              "head_dim", "kv_dtype", "max_past_len", "share_buffer", "sources")}


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


def _plot_batch(samples: Any, cal: Any, path: Path, runner_info: dict[str, str]) -> Path | None:
    try:
        from trt_latency.plots import plot_batch

        title = f"trt-latency batched decode: {runner_info.get('backend', '')} on {runner_info.get('device', '')}"
        return Path(written) if (written := plot_batch(samples, cal, path, title=title)) else None
    except ImportError:  # matplotlib missing
        return None


def borrow_primary_loop(loops: dict[Any, Any], primary: Any, keys: list[Any]) -> dict[Any, Any]:
    """`loops` with every config of `keys` that has no replay-fitted terms given the primary's (when
    the primary has them), flagged source "borrowed:<primary>". Conformal factors are never borrowed."""
    import dataclasses

    from trt_latency.estimator.calibration import borrowed_source

    donor = loops.get(tuple(primary))
    if donor is None or donor.source != "replay":
        return dict(loops)
    out = dict(loops)
    for key in keys:
        key = tuple(key)
        if key != tuple(primary) and (key not in out or out[key].source != "replay"):
            out[key] = dataclasses.replace(donor, source=borrowed_source(tuple(primary)))  # c(P)'s slope too
    return out


def _in_plan_order(cal: Any, keys: list[Any]) -> list[Any]:
    """The calibration's configs in the plan's order (primary first)."""
    by_key = {c.key: c for c in cal.configs}
    return [by_key[tuple(int(x) for x in k)] for k in keys if tuple(int(x) for x in k) in by_key]


def serving_loop_and_conformal(cal_path: Path, requests_path: Path, keys: list[Any]) -> tuple[list[str], str]:
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
        cal = load(cal_path)
        log = read_requests(requests_path)
        if len(log) == 0:
            return no_log_lines(), ""
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
    lines = [LOOP_HEADER, *loop_rows(configs, reports), *holdout_lines(configs, reports)]
    names = ("vision_tokens", "text_tokens", "output_tokens", "tier_idx", "top_k", "num_active_blocks", "total_ms")
    held = {name: np.asarray(getattr(log, name))[holdout & mine] for name in names}
    try:
        fits = fit_conformal(Estimator(cal), held)
        if fits:
            cal = attach_conformal(cal, fits)
            save_calibration(cal, cal_path)
    except TrtLatencyError as exc:
        return lines, f"; conformal factors not stored ({exc})"
    lines += conformal_lines(configs, fits)
    n_loop = sum(1 for c in cal.configs if c.serving_loop is not None and c.serving_loop.source == "replay")
    n_borrowed = sum(1 for c in cal.configs if c.serving_loop is not None
                     and c.serving_loop.source.startswith("borrowed:"))
    note = f"; loop terms fitted for {n_loop} config(s)"
    if n_borrowed:
        note += f", borrowed by {n_borrowed}"
    return lines, note + f", conformal factors for {len(fits)} config(s)"


# ------------------------------------------------------------------------------------------ run


def with_adaptive_flags(plan: Any, args: CalibrateOptions) -> Any:
    """The plan with --precision / --time-budget / --threads / --huge-pages / --replay-processes applied."""
    from trt_latency.engines.config import AdaptiveSpec

    # (flag, the option's name, its runtime field, the least value or None for a boolean, why), each over the
    # plan's runtime.<field>
    for flag, option, key, least, why in (
            ("--threads", "threads", "intra_op_threads", 1, "ONNX Runtime intra-op threads"),
            ("--huge-pages", "huge_pages", "huge_pages", None, ""),
            ("--replay-processes", "replay_processes", "replay_processes", 0, "0: replay in this process")):
        value = getattr(args, option, None)
        if value is None:
            continue
        if least is not None and value < least:
            raise ConfigError(field=flag, expected=f"an integer >= {least} ({why})", got=value)
        plan = replace(plan, runtime=replace(plan.runtime, **{key: bool(value) if least is None else int(value)}))
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


def time_budget(plan: Any) -> float | None:
    spec = plan.sweep.adaptive
    return spec.time_budget_s if spec is not None and spec.time_budget_s else None


def measure_plans(args: CalibrateOptions, plan: Any, targets: list[Target], backend: str) -> list[MeasurePlan]:
    """Per target (plan order): which phases ``measure`` runs there. The batch sweep on the primary (every
    config with batch.all_configs), the encoder sweep on the primary, the replay on each config under its
    own request_id range."""
    from trt_latency.engines.replay import REPLAY_ID_STRIDE

    n = plan.replay.requests if args.requests is None else args.requests
    if n > REPLAY_ID_STRIDE:
        raise ConfigError(field="--requests", expected=f"at most {REPLAY_ID_STRIDE} requests per config", got=n)
    options = {"kv_mode": args.kv_mode, "io": args.io, "dims": args.dims}
    batch_all = plan.batch is not None and plan.batch.all_configs
    return [MeasurePlan(plan=plan, backend=backend, options=options, batch=plan.batch is not None and (i == 0 or batch_all),
                        requests=0 if args.no_replay else n, exact_requests=args.requests is not None,
                        id_offset=i * REPLAY_ID_STRIDE, vision=args if args.vision_onnx else None,
                        vision_sweep=bool(args.vision_onnx) and i == 0, progress=not args.no_progress,
                        runtime=args.runtime)
            for i, _ in enumerate(targets)]


def larger_budget_lines(measured: list[Measured], plan: Any) -> list[str]:
    """What more seconds would buy, one line per config: the sweep's precision where the deadline cut it,
    the replay's rest, and the plan's own sizes where the budget trimmed them."""
    from trt_latency.engines.adaptive import STOP_TIME, time_to_target

    lines = []
    for m in measured:
        parts = []
        if m.sweep is not None:
            short = [s for s in m.sweep.states if s.stop == STOP_TIME]
            need = sum(time_to_target([s for s in short if s.phase == ph], m.plan.sweep.warmups()[ph])
                       for ph in ("decode", "prefill")) if short else 0.0
            if short and np.isfinite(need):
                parts.append(f"about +{fmt_time(need)} for every position at its precision target "
                             f"({len(short)} stopped by the deadline)")
        if m.replay is not None and m.replay.out_of_time:
            left = m.replay.rows_planned - m.replay.rows_written - m.replay.rows_skipped
            parts.append(f"the replay's other {left} requests (a rerun into the same --out adds them)")
        if m.notes:
            parts.append("the plan's own sizes, trimmed here: " + "; ".join(m.notes))
        if parts:
            lines.append(f"{key_name(m.key)}: " + "; ".join(parts))
    return lines


def calibrate(args: CalibrateOptions, say: Callable[[str], None] | None = None) -> CalibrateResult:
    """Run the whole calibration into ``args.out``; ``say`` gets the report lines (default: print)."""
    from trt_latency.budget import MIN_PASS_S, Ledger, target_end
    from trt_latency.engines.config import load_plan
    from trt_latency.engines.replay import FileRequestSink
    from trt_latency.engines.sweep import FileSink

    started = time.perf_counter()
    if args.requests is not None and args.requests < 0:
        raise ConfigError(field="--requests", expected="an integer >= 0", got=args.requests)
    plan = with_adaptive_flags(load_plan(args.config, quick=args.quick), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = "tensorrt" if args.engine and args.backend == "auto" else args.backend
    if args.engine and backend != "tensorrt":
        raise ConfigError(field="--backend", expected="tensorrt (or auto) with --engine", got=backend)
    plan, targets = targets_for(args, plan, out)
    plan, sized = sized_budget(args, plan, targets)
    budget = time_budget(plan)
    if args.vision_onnx:  # a vision model the adapters cannot feed fails now, not after the decoder sweep
        from trt_latency.pipeline_vision import vision_signature

        vision_signature(args)
    works = measure_plans(args, plan, targets, backend)
    say = say or _Say()
    ledger = Ledger()

    say(f"trt-latency calibrate: plan {plan.source}{' (--quick)' if plan.quick else ''}, "
        f"{len(targets)} config(s), output {out}/"
        + (f", --time-budget {fmt_time(budget)}" if budget else "")
        + f", {plan.runtime.intra_op_threads} intra-op thread(s)")
    if sized:
        say(f"  time budget {sized}; --time-budget sets another")
    if not (args.onnx or args.engine):
        with ledger.phase("export"):
            for t in targets:
                t.exported = export_if_needed(t.tier, t.key, t.path, plan.sweep.seed)
                say(f"  model {t.path.name}: {'exported' if t.exported else 'reused (same content hash)'}")
    sinks = Sinks(samples=FileSink(out / "samples.csv"), requests=FileRequestSink(out / "requests.csv"),
                  vision=out / "vision_samples.csv")
    measured: list[Measured] = []
    for i, (t, work) in enumerate(zip(targets, works, strict=True)):
        end = target_end(started, budget, len(targets) - i)
        deadline = None if end is None else time.time() + (end - time.perf_counter())
        measured.append(measure(t, work, sinks, deadline, say))
    # Configs that finished early left budget behind: one more sweep pass over those the deadline cut short.
    pending = [(i, m) for i, m in enumerate(measured) if m.sweep is not None and m.sweep.out_of_time]
    for j, (i, m) in enumerate(pending):
        end = target_end(started, budget, len(pending) - j)
        if end is None or end - time.perf_counter() < MIN_PASS_S:
            continue
        again = replace(works[i], plan=m.plan, batch=False, requests=0, vision_sweep=False, pilot=False)
        second = measure(targets[i], again, replace(sinks, requests=None), time.time() + end - time.perf_counter(),
                         say)
        m.sweep = second.sweep
        m.ledger.merge(second.ledger)
    for m in measured:
        ledger.merge(m.ledger)

    done = finish(out, plan, targets, measured, args, ledger)
    say("")
    say("Decode step latency per KV position: measured (median, p90 over repetitions) vs the fitted model")
    say(position_table(done.samples, load(done.calibration)))
    if plan.batch is not None:
        from trt_latency.estimator.batch_fit import format_batch_table

        say(format_batch_table(load(done.calibration), done.samples))
    info = measured[0].runner if measured else {}
    wall = time.perf_counter() - started
    say("Summary")
    for line in summary_lines(info, backend, targets, out, done, len(done.samples), args):
        say(line)
    for line in extrapolation_lines({key_name(m.key): {"decode_max": 0, "prefill_max": 0, "prompt_max": 0,
                                                        "kv_max": 0, **m.reach} for m in measured if m.replay}):
        say(line)
    say(f"  wall time    {fmt_time(wall)}")
    if any(m.replay is not None for m in measured):
        say(f"Next: trt-latency analyze {out / 'requests.csv'} -c {done.calibration}")
    for line in time_lines(budget, wall, ledger.seconds, ledger.overruns, larger_budget_lines(measured, plan)):
        say(line)
    requests_path = out / "requests.csv"
    return CalibrateResult(out=out, models=tuple(t.path for t in targets), samples=out / "samples.csv",
                           calibration=done.calibration, plot=done.plot,
                           requests=requests_path if requests_path.is_file() else None,
                           kv_mode=info.get("kv_mode", "concat"), seconds=wall, batch_plot=done.batch_plot)


def summary_lines(info: dict[str, str], backend: str, targets: list[Target], out: Path, done: Finished,
                  n_samples: int, args: CalibrateOptions) -> list[str]:
    lines = [f"  backend      {info.get('backend', backend)} on {info.get('device', '?')}",
             f"  kv_mode      {info.get('kv_mode', 'concat')}"
             + (f" (token input {info['token_input']})" if info.get("token_input") else ""),
             f"  threads      {info.get('threads', '?')} intra-op, {info.get('inter_threads', '?')} inter-op"
             + (f" (ONNX Runtime {o['version']}, {o.get('package', '?')}: {', '.join(o.get('providers', []))})"
                if (o := onnxruntime_build()) else "")]
    if info.get("memory"):
        lines.append(f"  memory       {info['memory']}")
    if o and o.get("warning"):
        lines.append(f"  warning      {o['warning']}")
    lines += [f"  model        {t.path}" for t in targets]
    lines.append(f"  samples      {out / 'samples.csv'} ({n_samples} timed repetitions)")
    lines.append(f"  calibration  {done.calibration}")
    no_plot = "not written (--no-plot)" if args.no_plot else "not written (matplotlib missing)"
    lines.append(f"  plot         {done.plot if done.plot is not None else no_plot}")
    if done.batch_plot is not None:
        lines.append(f"  batch plot   {done.batch_plot}")
    requests_path = out / "requests.csv"
    lines.append(f"  requests     {requests_path if requests_path.is_file() else '-'}: {done.replay_note}")
    return lines + done.loop_lines + done.vision_lines


class _Say:
    def __call__(self, text: str) -> None:
        print(text, flush=True)
