"""Load test: a real serving loop over a calibrated engine, judged against an oracle.

Every request of the stream is decided by an AdmissionController and then really executed
(``runner.generate``: prefill + decode loop feeding the present KV back), the rejected ones in
shadow mode. So the true latency of every request is known, and with it the oracle's decision
(true total <= budget). The controller observes only the requests it admitted, as in production.

Budgets (``StreamSpec.budget_mode``):
- ``classes`` (default, what a serving deployment has): a few SLO classes, each a fixed budget in
  ms, set from quantiles of the predicted totals of the request mix (times the typical
  actual/predicted, the conformal median); every request gets one class at random. Request lengths
  vary widely (prompt from the plan's replay spec, output tokens log-uniform), so some requests fit
  their class by far, some miss it by far, and some sit near the boundary;
- ``relative`` (the old stress mode): budget = the request's own predicted total * center * U(lo, hi),
  i.e. every request sits near its own boundary, where measurement noise alone makes any
  alpha-bounded controller reject much of what the oracle admits;
- ``fixed``: one budget for every request.

Reported: violation_rate (violations / admitted), admitted_vs_oracle (admitted / oracle-admitted),
decisions per second and ns per decision, and with a slowdown injected at request K (a sleep per
decode step inside the loop) the violation rate in windows after the change and how many requests
the online correction needed to bring it back under the target.

The slowdown is a stall of the serving loop's decode steps, added after each request's engine
run and timed with the wall clock, so the request's true total (what the oracle and the controller
see) includes exactly the time the loop stalled; TTFT is unchanged. Either a fixed stall per decode
step (``(output_tokens - 1)`` sleeps of X ms), or a decode factor F: one sleep of (F - 1) times the
request's measured decode time, i.e. every decode step F times slower (a clear step, e.g. F = 1.4,
not lost in the noise).

Heavy imports (onnxruntime) happen inside the runner; this module imports only numpy at the top.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.schema import ConfigKey

TARGET_VIOLATION_RATE = 0.07


@dataclass(frozen=True)
class StreamSpec:
    """How requests are drawn: prompt and output lengths (the replay's distribution) and budgets."""

    vision_tokens: tuple[int, ...] = (0, 64, 256)
    text_tokens: tuple[int, int] = (8, 256)  # uniform, inclusive
    output_tokens: tuple[int, int] = (2, 48)  # log-uniform, inclusive
    budget_mode: str = "classes"  # "classes" (SLO classes), "relative" (old stress mode) or "fixed"
    budget_classes: tuple[float, ...] = ()  # ms, one per SLO class (mode "classes")
    budget_spread: tuple[float, float] = (0.6, 1.6)  # mode "relative": predicted total * center * U(lo, hi)
    budget_center: float = 1.0  # typical actual / predicted (the conformal median)
    budget_ms: float | None = None  # mode "fixed"
    min_prompt: int | None = None  # clip to the calibration's measured prefill range
    max_prompt: int | None = None
    max_kv: int | None = None  # clip prompt + output to the measured KV range
    images: tuple[int, ...] = (1,)  # images per request with vision tokens (the replay's choices)


@dataclass
class Executed:
    """One request as the loop saw it."""

    index: int
    vision_tokens: int
    text_tokens: int
    output_tokens: int
    budget_ms: float
    admitted: bool
    reason: str
    decide_ns: int
    ttft_ms: float
    total_ms: float
    slowed: bool
    predicted_ms: float = math.nan  # the Estimator's raw predicted total (no correction, no factor)
    images: int = 1

    @property
    def oracle_admit(self) -> bool:
        return self.total_ms <= self.budget_ms

    @property
    def violation(self) -> bool:
        return self.admitted and self.total_ms > self.budget_ms


@dataclass
class LoadtestResult:
    rows: list[Executed] = field(default_factory=list)
    wall_s: float = 0.0


def draw_lengths(spec: StreamSpec, n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(vision, text, output) per request: vision from the choices, text uniform, output log-uniform."""
    out: list[tuple[int, int, int]] = []
    lo_o, hi_o = spec.output_tokens
    for _ in range(n):
        vision = int(rng.choice(spec.vision_tokens))
        text = int(rng.integers(spec.text_tokens[0], spec.text_tokens[1] + 1))
        output = int(round(math.exp(rng.uniform(math.log(lo_o - 0.5 if lo_o > 1 else 1.0), math.log(hi_o + 0.5)))))
        output = min(max(output, lo_o), hi_o)
        if spec.max_prompt is not None and vision + text > spec.max_prompt:
            vision = min(vision, spec.max_prompt - 1)
            text = max(1, spec.max_prompt - vision)
        if spec.min_prompt is not None and vision + text < spec.min_prompt:
            text = spec.min_prompt - vision
        if spec.max_kv is not None and vision + text + output > spec.max_kv:
            output = max(1, spec.max_kv - vision - text)
        out.append((vision, text, output))
    return out


def draw_images(spec: StreamSpec, lengths: Sequence[tuple[int, int, int]], seed: int) -> list[int]:
    """Images per request: one of ``spec.images`` for a request with vision tokens (the replay's draw,
    engines.replay.image_count), 1 otherwise."""
    from trt_latency.engines.replay import image_count

    return [image_count(spec.images or (1,), seed, i) if v > 0 else 1 for i, (v, _, _) in enumerate(lengths)]


def execute(runner: Any, vision: int, text: int, output: int, hidden: int, rng: np.random.Generator,
            stall_ms_per_step: float = 0.0, decode_factor: float = 1.0, chain: Any = None,
            images: int = 1) -> tuple[float, float]:
    """Run one request for real; returns (ttft_ms, total_ms) including any injected stall: a fixed
    stall per decode step, or the decode part stretched by ``decode_factor``. With a VLM ``chain``
    (engines.vision.VisionChain) a request with vision tokens runs encoder -> embedding -> decoder, and
    its TTFT includes the encoder and embedding time (as the replay's does)."""
    before = 0.0
    if chain is not None and vision > 0:
        embeds, timing = chain.prompt(runner, vision, text, images, rng)
        before = timing.before_prefill_ms
    else:
        embeds = rng.standard_normal((1, vision + text, hidden)).astype(np.float32)
    result = runner.generate(embeds, output)
    ttft, total = float(result.ttft_ms) + before, float(result.total_ms) + before
    if output > 1 and (stall_ms_per_step > 0 or decode_factor > 1.0):
        start = time.perf_counter()
        if stall_ms_per_step > 0:
            for _ in range(output - 1):
                time.sleep(stall_ms_per_step / 1e3)
        if decode_factor > 1.0:
            time.sleep(max(0.0, total - ttft) * (decode_factor - 1.0) / 1e3)
        total += (time.perf_counter() - start) * 1e3
    return ttft, total


def slo_classes(estimator: Any, key: ConfigKey, spec: StreamSpec,
                quantiles: Sequence[float] = (0.2, 0.4, 0.6, 0.8), sample: int = 4000,
                seed: int = 4242) -> tuple[float, ...]:
    """SLO class budgets (ms): quantiles of the predicted totals of the request mix (a sample of
    the stream's own length distribution), times the typical actual/predicted (spec.budget_center).
    With classes spread over the mix, requests of each class range from far under to far over."""
    drawn = draw_lengths(spec, sample, np.random.default_rng(seed))
    lengths = np.asarray(drawn, dtype=np.int64)
    images = np.asarray(draw_images(spec, drawn, seed), dtype=np.int64)  # a VLM mix: each request's images
    _, _, total, _ = estimator.predict_batch(lengths[:, 0], lengths[:, 1], lengths[:, 2], *key, images=images)
    total = total[np.isfinite(total)]
    if total.size == 0:
        raise ValueError("no predictable request in the stream's length distribution")
    return tuple(round(float(q) * spec.budget_center, 1) for q in np.quantile(total, quantiles))


def run_stream(
    runner: Any,
    controller: Any,
    estimator: Any,
    key: ConfigKey,
    spec: StreamSpec,
    n: int,
    seed: int = 0,
    slowdown_at: int | None = None,
    slowdown_ms_per_step: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    slowdown_factor: float = 1.0,
    chain: Any = None,
) -> LoadtestResult:
    """The serving loop: decide, execute (shadow if rejected), observe admitted ones. ``chain``: a VLM's
    encoder chain (requests with vision tokens run through it; each draws its images from spec.images)."""
    from trt_latency.serving.admission import Request

    rng = np.random.default_rng(seed)
    exec_rng = np.random.default_rng(seed + 1)
    lengths = draw_lengths(spec, n, rng)
    images = draw_images(spec, lengths, seed)
    tier, top_k, blocks = key
    hidden = int(runner.hidden)
    result = LoadtestResult()
    start = time.perf_counter()
    mode = "fixed" if spec.budget_ms is not None else spec.budget_mode
    if mode == "classes" and not spec.budget_classes:
        raise ValueError("budget mode 'classes' needs StreamSpec.budget_classes (see slo_classes)")
    for i, (vision, text, output) in enumerate(lengths):
        k = images[i]
        predicted = float(estimator.predict(vision, text, output, tier_idx=tier, top_k=top_k,
                                            num_active_blocks=blocks, images=k).total_ms)
        if mode == "fixed":
            budget = float(spec.budget_ms)  # type: ignore[arg-type]
        elif mode == "classes":
            budget = float(spec.budget_classes[int(rng.integers(len(spec.budget_classes)))])
        else:
            budget = predicted * spec.budget_center * float(rng.uniform(*spec.budget_spread))
        request = Request(vision, text, output, tier, top_k, blocks, budget, k)
        t0 = time.perf_counter_ns()
        decision = controller.decide(request)
        decide_ns = time.perf_counter_ns() - t0
        slowed = slowdown_at is not None and i >= slowdown_at
        ttft, total = execute(runner, vision, text, output, hidden, exec_rng,
                              slowdown_ms_per_step if slowed else 0.0, slowdown_factor if slowed else 1.0,
                              chain=chain, images=k)
        if decision.admit:
            controller.observe(request, ttft, total)
        result.rows.append(Executed(i, vision, text, output, budget, bool(decision.admit), str(decision.reason),
                                    decide_ns, ttft, total, slowed, predicted, k))
        if progress is not None:
            progress(i + 1, n)
    result.wall_s = time.perf_counter() - start
    return result


def dump_rows(result: LoadtestResult, path: str | os.PathLike[str]) -> None:
    """Every executed request as CSV (index, lengths, budget, decision, true latencies)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "vision_tokens", "text_tokens", "output_tokens", "budget_ms", "admitted", "oracle_admit",
                    "violation", "ttft_ms", "total_ms", "predicted_ms", "slowed", "decide_ns", "reason", "images"])
        for r in result.rows:
            w.writerow([r.index, r.vision_tokens, r.text_tokens, r.output_tokens, repr(r.budget_ms), int(r.admitted),
                        int(r.oracle_admit), int(r.violation), repr(r.ttft_ms), repr(r.total_ms), repr(r.predicted_ms), int(r.slowed),
                        r.decide_ns, r.reason, r.images])


def _rates(rows: Sequence[Executed]) -> dict[str, Any]:
    admitted = sum(r.admitted for r in rows)
    oracle = sum(r.oracle_admit for r in rows)
    violations = sum(r.violation for r in rows)
    both = sum(r.admitted and r.oracle_admit for r in rows)
    return {
        "requests": len(rows),
        "admitted": admitted,
        "oracle_admitted": oracle,
        "admitted_and_oracle": both,
        "violations": violations,
        "violation_rate": violations / admitted if admitted else None,
        "admitted_vs_oracle": admitted / oracle if oracle else None,
        # how far the machine is from the calibration: median true total / raw predicted total
        "median_actual_over_predicted": _median_ratio(rows),
    }


def _median_ratio(rows: Sequence[Executed]) -> float | None:
    ratios = [r.total_ms / r.predicted_ms for r in rows if r.predicted_ms > 0]
    return float(np.median(ratios)) if ratios else None


def summarize(result: LoadtestResult, slowdown_at: int | None = None, window: int = 50,
              target: float = TARGET_VIOLATION_RATE) -> dict[str, Any]:
    """The JSON report of one stream (without the timing of the controller, see decide_benchmark)."""
    rows = result.rows
    out: dict[str, Any] = _rates(rows)
    decide = np.asarray([r.decide_ns for r in rows], dtype=np.float64)
    out["decide_ns_in_loop_median"] = float(np.median(decide)) if decide.size else None
    out["serving_requests_per_s"] = len(rows) / result.wall_s if result.wall_s > 0 else None
    out["wall_s"] = result.wall_s
    if slowdown_at is not None and 0 <= slowdown_at < len(rows):
        before, after = rows[:slowdown_at], rows[slowdown_at:]
        out["before_slowdown"] = _rates(before)
        out["after_slowdown"] = _rates(after)
        windows = []
        for lo in range(0, len(after), window):
            part = _rates(after[lo:lo + window])
            windows.append({"from": lo, "to": lo + len(after[lo:lo + window]), "admitted": part["admitted"],
                            "violations": part["violations"], "violation_rate": part["violation_rate"]})
        out["windows_after_change"] = windows
        recovered = None
        for lo in range(0, len(after), window):
            rate = _rates(after[lo:])["violation_rate"]
            if rate is not None and rate <= target:
                recovered = lo
                break
        # The smallest offset (a multiple of the window) after which the violation rate of all later
        # requests stays at or under the target.
        out["recovered_within_requests"] = recovered
        tail = after[200:]
        out["violation_rate_after_200"] = _rates(tail)["violation_rate"] if tail else None
    return out


def decide_benchmark(controller: Any, requests: Sequence[Any], passes: int = 7) -> dict[str, float]:
    """ns per decide() over the stream's requests, median of passes (a tight loop, no engine), side by
    side with the bare Estimator.admit on the same requests and a bare Python call with the same
    arguments (the machine's speed in the same run)."""
    est = controller.estimator
    alpha = controller.alpha
    args = [(r.budget_ms, r.vision_tokens, r.text_tokens, r.max_new_tokens, r.tier_idx, r.top_k,
             r.num_active_blocks, alpha) for r in requests]

    def bare(*_: Any) -> None:
        return None

    def per_call(fn: Callable[[], None]) -> float:
        runs = []
        for _ in range(passes):
            t0 = time.perf_counter_ns()
            fn()
            runs.append((time.perf_counter_ns() - t0) / max(1, len(requests)))
        return float(np.median(runs))

    decide = controller.decide
    admit = est.admit

    def run_decide() -> None:
        for r in requests:
            decide(r)

    def run_admit() -> None:
        for a in args:
            admit(*a)

    def run_bare() -> None:
        for a in args:
            bare(*a)

    ns = per_call(run_decide)
    return {"controller_ns_per_decision": ns, "decisions_per_s": 1e9 / ns if ns > 0 else math.inf,
            "estimator_admit_ns": per_call(run_admit), "bare_python_call_ns": per_call(run_bare)}


def find_model(calibration_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str] | None) -> Path:
    """The engine to serve: --onnx, else model.onnx next to the calibration."""
    from trt_latency.errors import InputError

    candidate = Path(onnx_path) if onnx_path is not None else Path(calibration_path).parent / "model.onnx"
    if not candidate.is_file():
        raise InputError("model not found", path=str(candidate),
                         expected="the model.onnx `calibrate` wrote next to the calibration, or --onnx FILE")
    return candidate


def calibrate_conformal_live(runner: Any, estimator: Any, key: ConfigKey, spec: StreamSpec, n: int,
                             seed: int, hidden: int, chain: Any = None) -> dict[str, np.ndarray]:
    """Run n requests of the stream's distribution for real (through ``chain`` for a VLM); returns a
    request log as columns (with each request's images)."""
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(spec, n, rng)
    images = draw_images(spec, lengths, seed)
    cols: dict[str, list[float]] = {k: [] for k in ("vision_tokens", "text_tokens", "output_tokens", "tier_idx",
                                                     "top_k", "num_active_blocks", "ttft_ms", "total_ms", "images")}
    for (vision, text, output), k in zip(lengths, images, strict=True):
        ttft, total = execute(runner, vision, text, output, hidden, rng, chain=chain, images=k)
        for name, value in zip(cols, (vision, text, output, key[0], key[1], key[2], ttft, total, k), strict=True):
            cols[name].append(value)
    return {k: np.asarray(v) for k, v in cols.items()}


def open_model(path: str | os.PathLike[str], backend: str = "ort-cpu", threads: int | None = None,
               **options: Any) -> Any:
    """A Runner for the model (engines.backends.open_runner; ``options``: kv_mode, io, dims, max_past_len)."""
    from trt_latency.engines.backends import open_runner

    return open_runner(path, backend, threads=0 if threads is None else threads, **options)


def served_key(model_path: str | os.PathLike[str], cal: Any) -> ConfigKey:
    """The config the model was exported as (its metadata), else the calibration's first config."""
    try:
        from trt_latency.engines.export import model_metadata

        meta = model_metadata(model_path)
        key = ConfigKey(int(meta["tier_idx"]), int(meta["top_k"]), int(meta["num_active_blocks"]))
        cal.config(*key)
        return key
    except Exception:  # noqa: BLE001 - a foreign model: serve it as the primary config
        first = cal.configs[0]
        return ConfigKey(int(first.tier_idx), int(first.top_k), int(first.num_active_blocks))


def plan_of(cal: Any, plan_path: str | os.PathLike[str] | None = None) -> Any:
    """The plan the calibration was made with (its provenance names it), else ``plan_path`` / the default."""
    from trt_latency.engines.config import load_plan

    if plan_path is None:
        source = (cal.provenance.get("plan") or {}).get("source") if isinstance(cal.provenance, dict) else None
        if isinstance(source, str) and Path(source).is_file():
            plan_path = source
    return load_plan(plan_path)


def stream_spec(cfg: Any, plan: Any, budget_ms: float | None = None) -> StreamSpec:
    """The plan's replay length distribution (and images per request), clipped to what the calibration
    measured (so every request is one the Estimator can judge; the policy for the others is tested
    separately)."""
    replay = plan.replay
    return StreamSpec(
        images=tuple(int(k) for k in getattr(replay, "images", (1,)) or (1,)),
        vision_tokens=tuple(int(v) for v in replay.vision_tokens),
        text_tokens=(int(replay.text_tokens[0]), int(replay.text_tokens[1])),
        output_tokens=(int(replay.output_tokens[0]), int(replay.output_tokens[1])),
        budget_ms=budget_ms,
        min_prompt=max(1, math.ceil(cfg.valid_prefill_len[0])),
        max_prompt=int(cfg.valid_prefill_len[1]),
        max_kv=int(cfg.valid_past_len[1]) + 1,
    )


def warm_up(runner: Any, spec: StreamSpec, requests: int = 5, chain: Any = None) -> None:
    """A few untimed requests: first runs allocate and page in."""
    rng = np.random.default_rng(12345)
    lengths = draw_lengths(spec, requests, rng)
    for (vision, text, output), k in zip(lengths, draw_images(spec, lengths, 12345), strict=True):
        execute(runner, vision, text, output, int(runner.hidden), rng, chain=chain, images=k)
