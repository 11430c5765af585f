"""Batch-aware admission: BatchEstimator (predict / admit / max_new_tokens given the running batch) and
BatchAdmissionController (tracks one engine's batch through events; thread-safe; online correction).

Why a BatchEstimator built from an Estimator rather than new Estimator methods: the Estimator is a pure
function of the calibration over immutable single-request tables (estimator/ never imports serving/);
the batch kernel (serving/_batch.pyx, reference serving/batch_reference.py) is serving-side, and a batch
question needs the running state, which the Estimator does not hold. ``BatchEstimator.from_estimator``
picks one config, builds its batch tables from the calibration's ``batch`` section (or, without one, from
the single-request decode model as B = 1, larger batches flagged extrapolated) and the config's prefill
coefficients, and answers with the compiled kernel when built (pure-Python reference otherwise, or with
TRT_LATENCY_PUREPYTHON=1). ``serving=True`` also prices the serving loop around the engine call (the
config's fitted ``serving_loop`` terms o per decode step, c(P) after a prefill, o_p on the prefill), folded
into the tables by ``build_batch_tables`` (no extra work per decision); the default (False) is the engine
alone, what ``loadtest --max-batch`` replays on its virtual clock of engine milliseconds.

Safety factor for ``alpha``: the batch section's ``conformal: {alphas, factors}`` (fitted by ``loadtest
--max-batch`` on a replay of batched traffic, see serving/batchload.py) when present, else 1.0 (and the
decision says so through ``factor_source``).
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from trt_latency import _native
from trt_latency.estimator.batch_model import section_from_decode
from trt_latency.ext.layout import TOKEN_MAX
from trt_latency.serving import batch_reference as ref
from trt_latency.serving.batch_reference import BAD_REQUEST, BATCH_POLICIES, BatchDecision, BatchTables
from trt_latency.serving.conformal import backed_level, conformal_rank

# The compiled batch kernel (serving/_batch.pyx), or None: trt_latency._native decides for every compiled
# module at once (TRT_LATENCY_PUREPYTHON, a missing build); without it the reference decides.
_batch: Any = _native.batch

__all__ = ["BatchAdmissionController", "BatchEstimator", "Running", "batch_section_of", "parse_running"]


class Running(NamedTuple):
    """One running request: its current KV length (past length of its next decode step), decode steps
    it may still take (max_new_tokens left) and its deadline in ms from now (inf: none)."""

    kv_len: int
    tokens_left: int
    deadline_ms: float = math.inf


def parse_running(text: str) -> list[Running]:
    """``L[:left[:deadline_ms]],...`` (the CLI's --running): left defaults to 1 (one more step),
    deadline to none."""
    out: list[Running] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3:
            raise ValueError(f"running request {item!r}: expected L[:tokens_left[:deadline_ms]]")
        try:
            kv = int(parts[0])
            left = int(parts[1]) if len(parts) > 1 and parts[1] else 1
            dl = float(parts[2]) if len(parts) > 2 and parts[2] else math.inf
        except ValueError:
            raise ValueError(f"running request {item!r}: expected integers L and tokens_left, a number "
                             "deadline_ms") from None
        if kv < 1 or left < 0 or math.isnan(dl):
            raise ValueError(f"running request {item!r}: expected L >= 1, tokens_left >= 0, deadline_ms a number")
        out.append(Running(kv, left, dl))
    return out


def batch_section_of(cfg: Any) -> dict[str, Any]:
    """A config's ``batch`` section (ConfigCalibration.batch, the engine side's field), else B = 1 from its
    single-request decode model."""
    section = getattr(cfg, "batch", None)
    if isinstance(section, Mapping) and section.get("sizes"):
        return dict(section)
    return section_from_decode(cfg.decode_knots, cfg.decode_values_ms, cfg.valid_past_len)


def _pure() -> bool:
    return _batch is None


class BatchEstimator:
    """Predict / admit / max_new_tokens for one config given the running batch."""

    def __init__(self, section: Mapping[str, Any], prefill_coeffs: Sequence[float],
                 pure_python: bool | None = None, loop: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.0)) -> None:
        self.section = dict(section)
        self.tables: BatchTables = ref.build_batch_tables(section, prefill_coeffs, loop=loop)
        self.pure_python = _pure() if pure_python is None else pure_python
        self._kernel = None if self.pure_python else _batch.BatchKernel(self.tables)
        conf = self.section.get("conformal") or {}
        self._conformal = sorted(zip(conf.get("alphas", []), conf.get("factors", []), strict=False))

    @classmethod
    def from_estimator(cls, estimator: Any, tier_idx: int = 0, top_k: int = 1,
                       num_active_blocks: int | None = None, pure_python: bool | None = None,
                       serving: bool = False) -> BatchEstimator:
        """``serving``: with the config's serving-loop terms (zeros when it has none), as a server pays them."""
        key = estimator.config_key(tier_idx, top_k, num_active_blocks)
        cfg = estimator.calibration.config(*key)
        loop = (0.0, 0.0, 0.0, 0.0, 0.0)
        if serving:
            sl = estimator.serving_loop(*key)
            loop = (sl.decode_step_ms, sl.first_step_ms, sl.first_step_per_token_ms, sl.prefill_ms,
                    sl.prefill_per_token_ms)
        return cls(batch_section_of(cfg), cfg.prefill_coeffs, pure_python, loop)

    @property
    def loop(self) -> tuple[float, float, float, float, float]:
        """The serving-loop terms (o, c0, c1, o_p, o_p1) priced in (zeros: the engine alone)."""
        return self.tables.loop

    @property
    def has_batch_section(self) -> bool:
        return len(self.tables.sizes) > 1 or self.section.get("kv_read") != "packed" or "fit_error" in self.section

    def factor(self, alpha: float | None) -> tuple[float, str]:
        """(safety factor, source) for alpha: the largest stored alpha <= the asked one."""
        if alpha is None:
            return 1.0, "none"
        best = None
        for a, f in self._conformal:
            if a <= alpha + 1e-12:
                best = f
        return (float(best), "conformal (batched replay)") if best is not None else (1.0, "none stored")

    def step_ms(self, kv_lens: Sequence[int]) -> float:
        """T(B, X) of one decode step of a batch with these KV lengths (the contract's batch_step_ms)."""
        from trt_latency.estimator.batch_model import batch_step_ms

        return batch_step_ms(self.section, [float(v) for v in kv_lens])

    def total_with(self, running: Sequence[Running], prompt: int, output_tokens: int) -> float:
        """The newcomer's predicted total (prefill + decode) joining this batch now."""
        return float(self.predict(prompt, 0, output_tokens, running)["total_ms"])

    def prefill_ms(self, prompt: int) -> float:
        """The stall a newcomer's admission puts on the batch: prefill (+ o_p + c(P) with the loop terms)."""
        return ref.prefill_ms(self.tables, float(prompt))

    def ttft_ms(self, prompt: int) -> float:
        """The newcomer's own first token: prefill (+ o_p with the loop terms)."""
        return ref.ttft_ms(self.tables, float(prompt))

    def finish_times(self, running: Iterable[Running]) -> list[float]:
        """Each running request's predicted finish (ms from now), in the given order."""
        rs = list(running)
        order = sorted(range(len(rs)), key=lambda i: rs[i].tokens_left)
        times, _ = ref.finish_times(self.tables, [float(rs[i].kv_len) for i in order],
                                    [float(rs[i].tokens_left) for i in order])
        out = [0.0] * len(rs)
        for k, i in enumerate(order):
            out[i] = times[k]
        return out

    def decide_sorted(self, kv: Any, left: Any, deadline: Any, now: float, prompt: int, max_new: int,
                      budget: float, factor: float = 1.0, protect: bool = True, want_fit: bool = True,
                      center: float = 1.0) -> BatchDecision:
        """The kernel call on a state already sorted by tokens left (float64 arrays); ``center``: the give-up
        test's bias (batch_reference's module docstring)."""
        if self._kernel is not None:
            return self._kernel.decide(kv, left, deadline, now, float(prompt), int(max_new), budget, factor, protect,  # type: ignore[no-any-return]
                                       want_fit, center)
        return ref.decide(self.tables, kv, left, deadline, now, float(prompt), int(max_new), budget, factor, protect,
                          want_fit, center)

    def _state(self, running: Iterable[Running]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kv, left, dl = ref.sort_running(*zip(*[(r.kv_len, r.tokens_left, r.deadline_ms) for r in running], strict=True)) \
            if running else ([], [], [])
        return (np.asarray(kv, dtype=np.float64), np.asarray(left, dtype=np.float64), np.asarray(dl, dtype=np.float64))

    def admit(self, budget_ms: float, vision_tokens: int, text_tokens: int, max_new_tokens: int | None = None,
              running: Sequence[Running] = (), alpha: float | None = None, policy: str = "protect") -> BatchDecision:
        """Admit a newcomer into the running batch? Never raises for bad fields: a BAD_REQUEST decision."""
        bad = _check(budget_ms, vision_tokens, text_tokens, max_new_tokens, running, policy)
        if bad:
            return BatchDecision(False, 0, math.nan, BAD_REQUEST, 0, bad)
        kv, left, dl = self._state(running)
        factor, _ = self.factor(alpha)
        n = TOKEN_MAX if max_new_tokens is None else int(max_new_tokens)
        return self.decide_sorted(kv, left, dl, 0.0, int(vision_tokens) + int(text_tokens), n, float(budget_ms),
                                  factor, policy == "protect")

    def max_new_tokens(self, budget_ms: float, vision_tokens: int, text_tokens: int, running: Sequence[Running] = (),
                       alpha: float | None = None, policy: str = "protect") -> int:
        return self.admit(budget_ms, vision_tokens, text_tokens, None, running, alpha, policy).max_new_tokens

    def predict(self, vision_tokens: int, text_tokens: int, output_tokens: int,
                running: Sequence[Running] = ()) -> dict[str, Any]:
        """The newcomer's TTFT (its prefill) and total, and each running request's finish with and without it."""
        rs = list(running)
        prompt = int(vision_tokens) + int(text_tokens)
        stall = self.prefill_ms(prompt)
        without = self.finish_times(rs)
        with_all = self.finish_times([*rs, Running(prompt, int(output_tokens) - 1)])
        return {"ttft_ms": self.ttft_ms(prompt), "total_ms": stall + with_all[-1],
                "running_finish_ms_without": without,
                "running_finish_ms_with": [stall + t for t in with_all[:-1]],
                "batch": len(rs) + 1}


def _check(budget: Any, vision: Any, text: Any, max_new: Any, running: Any, policy: str) -> str:
    if policy not in BATCH_POLICIES:
        return f"bad field 'policy': expected one of {BATCH_POLICIES}"
    if not isinstance(budget, int | float) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 0:
        return "bad field 'budget_ms': expected a finite number >= 0"
    for name, v in (("vision_tokens", vision), ("text_tokens", text)):
        if type(v) is not int or not 0 <= v <= TOKEN_MAX:
            return f"bad field '{name}': expected an integer in [0, {TOKEN_MAX}]"
    if vision + text == 0:
        return "bad request: vision_tokens + text_tokens is 0 (empty prompt)"
    if max_new is not None and (type(max_new) is not int or not 1 <= max_new <= TOKEN_MAX):
        return f"bad field 'max_new_tokens': expected None or an integer in [1, {TOKEN_MAX}]"
    for r in running:
        if not isinstance(r, Running) or r.kv_len < 1 or r.tokens_left < 0 or math.isnan(r.deadline_ms):
            return "bad field 'running': expected Running(kv_len >= 1, tokens_left >= 0, deadline_ms)"
    return ""


def batch_bucket(batch: int) -> int:
    """Batch-size bucket: 1, 2, 3-4, 5-8, 9-16, ... (bit length of B - 1, plus one)."""
    return (batch - 1).bit_length() if batch > 0 else 0


class BatchAdmissionController:
    """One engine's running batch, tracked through events, and the batch-aware decision on it.

    Events: ``started(rid, prompt, max_new_tokens, budget_ms)`` when a request's prefill is done and it
    joins the batch (its first token emitted), ``token(rid)`` per token emitted (or ``step()`` when every
    running request emitted one: one decode step), ``finished(rid, actual_ms, predicted_ms)``. The state
    (KV lengths, tokens left, absolute deadlines on the controller's clock, ms) is kept sorted by tokens
    left (the order never changes with a step), with the batch's own finish times cached until the next
    event, so a decision is one pass over the batch plus the segments the newcomer is part of.

    Online correction per (config, batch-size bucket): each finished request's score actual / predicted
    (durations from its decision; predicted = the model's total at the decision, so a bucket's scale also
    holds the slowdown from requests admitted later, priced at the server's pace: scoring against the latest
    predicted finish, each later admission's push added in model ms, was tried and let 2x overload through,
    because the server's per-request step cost grows with the batch faster than the engine model's, so a push
    in model ms understates it; benchmarks/serve_goodput.md run U) goes into a pooled window of
    ``residual_window`` scores and into its batch-size bucket's window (the batch it was admitted into:
    1, 2, 3-4, 5-8, ...; ``window`` long). A bucket's scale is its window's median once it holds
    ``min_observations`` scores (else the pooled median). Once the pooled window holds enough scores for
    alpha, the factor for bucket b is scale(b) x the split-conformal quantile of the scores each divided by
    its own bucket's scale (a locally scaled conformal quantile): the model's bias by batch size (a server's
    per-step cost grows with the batch more than the engine's) is taken out before the quantile, so it does
    not widen it; the quantile of the raw pooled scores times a relative bucket correction counted that
    bias twice and made a 1x load reject requests that met their SLO. Before that: the calibration's stored
    factor (or ``seed_scores`` from a batched replay) times the bucket's median over the pooled median.
    Everything clamped to ``clamp``. A controller serves one engine, so one config: the buckets are that
    config's.

    Recovery from a factor that rejects everything (the scores learn only from admitted requests, so a
    controller that starts far off, e.g. scores near the clamp after a cold start, would observe nothing and
    stay there): two parts, both needed.
    - Probes (``probe_interval_ms``, default 1000): a request the factor rejects is re-decided at factor 1
      and admitted when the unscaled model says it fits, the batch is empty and nothing has been admitted
      for the probe interval (batch_reference.probe_due; in the compiled decide too). A controller that
      keeps admitting never probes; an empty batch means no running request can be pushed, so the cost is
      at most one request per interval that the factor doubted and the model did not. Probes alone would
      be too slow: one score per interval into a window of ``residual_window`` stale ones.
    - A time horizon on the scores (``horizon_ms``, default 30 s on the controller's clock): at each refit
      (every finished request) scores older than that expire. When fewer than the alpha's minimum remain,
      the factor is the start-up one (the calibration's stored factor, or one set on ``base_factor``) times
      the remaining buckets' relative medians, the regime a fresh controller runs in. So a controller stuck
      on stale scores returns, one horizon after its last regular admission, to what it started from and
      learns again from the probes' and then the admitted requests' scores. Why time and not a count: the
      scores go stale with the machine's minute (load, clocks), not with their number. The price: a server
      finishing fewer requests per horizon than the alpha needs (20 for 0.05) always runs on the stored
      factor. ``None`` turns either part off (then the controller behaves as before it had them).

    Adaptive level (``level_step``, off by default; ``serve --alpha-step``): the target is the share of late
    requests among those admitted, while the quantile at alpha bounds each request's own chance of missing.
    Most admitted requests have slack, so a fixed per-request alpha leaves that share far below alpha and
    rejects requests that would have made it (a 1x load: 91 of 400 rejected, 0 of 309 late). The level is
    the lower of two trackers, each moved by level_step and kept within ``level_bounds`` (default alpha / 2
    .. 0.5: never admit what the model expects late; the predicted one stays >= alpha):
    - predicted: each regular admission (``started(..., model_ms=)``) has a predicted chance of missing its
      budget, p = the share of the bucket-normalised scores above budget / (model_ms x its bucket's scale);
      the tracker moves by step x (alpha - p), so it settles where the admitted requests' mean predicted miss
      is alpha. No lag, but blind to what an admission does to the running requests and to a model that is
      off.
    - observed (adaptive conformal inference, Gibbs & Candes 2021): each finished request's outcome
      (``finished(..., late=)``, or ``outcome(late)`` when it is known only after the request left the batch:
      `serve` judges it as delivered) moves it by step x (alpha - late): the late share itself, known a request's
      duration after the decisions that caused it.
    At a light load both climb; in an overload either one holds the level down: alone, the observed one
    climbed on a run's first on-time second and overshot when the overload came (2x: 18% late at the
    client), the predicted one climbed while the protect check, not the newcomer's own budget, was binding
    (2x: 8.9% late).

    Thread safety: with the compiled module the state is a ``_batch.BatchState`` whose methods run under
    the GIL without releasing it (each one atomic for Python threads) and ``decide`` IS its compiled
    method (no Python frame, no lock); the correction windows are updated under a lock in ``finished``.
    Without it (or TRT_LATENCY_PUREPYTHON=1) a lock guards a Python state and the reference decides."""

    def __init__(self, estimator: BatchEstimator, alpha: float | None = 0.05, policy: str = "protect",
                 max_batch: int = 64, window: int = 32, min_observations: int = 8,
                 clamp: tuple[float, float] = (0.5, 4.0), clock: Any = None, residual_window: int = 300,
                 horizon_ms: float | None = 30_000.0, probe_interval_ms: float | None = 1_000.0,
                 level_step: float | None = None, level_bounds: tuple[float, float] | None = None) -> None:
        if policy not in BATCH_POLICIES:
            raise ValueError(f"policy must be one of {BATCH_POLICIES}, got {policy!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.estimator = estimator
        self.alpha = alpha
        self.policy = policy
        self.protect = policy == "protect"
        self.max_batch = int(max_batch)
        factor, self.factor_source = estimator.factor(alpha)
        self._clock = clock or (lambda: time.perf_counter() * 1e3)
        self._lock = threading.Lock()
        self._admitted_batch: dict[Any, int] = {}
        self._windows: dict[int, deque[float]] = {}
        self._correction: dict[int, float] = {}
        self._window = window
        # (bucket, score, clock ms when observed): the time is for the horizon
        self._scores: deque[tuple[int, float, float]] = deque(maxlen=max(1, residual_window))
        self._wtimes: dict[int, deque[float]] = {}  # observation times of each bucket window's scores
        self.horizon_ms = math.inf if horizon_ms is None else float(horizon_ms)
        self.probe_interval_ms = math.inf if probe_interval_ms is None else float(probe_interval_ms)
        self.expired = 0  # scores dropped by the horizon
        self._start = (factor, self.factor_source)  # what the factor falls back to (see the docstring)
        self._min_obs = min_observations
        self.clamp = clamp  # (lo, hi) of every factor: serve --factor-max sets hi
        # Adaptive conformal inference on the quantile's level (see the docstring): None or 0 keeps it at alpha
        self.level_step = float(level_step or 0.0)
        self.level = alpha
        self._level_predicted = self._level_observed = float(alpha or 0.0)  # the two trackers (the docstring)
        if alpha is not None:
            self.level_bounds = level_bounds or (alpha / 2.0, max(alpha, 0.5))
            if not 0.0 < self.level_bounds[0] <= alpha <= self.level_bounds[1] < 1.0:
                raise ValueError(f"level_bounds must hold alpha within (0, 1), got {self.level_bounds}")
        self.late = 0  # admitted requests reported late (finished(..., late=True)); counted, for /stats
        self.on_time = 0
        # sorted scores over their bucket's scale (online regime); a list: bisect on it is ~10x a numpy call's cost
        self._normalized: list[float] | None = None
        self._state: Any = None
        if estimator._kernel is not None:
            self._state = _batch.BatchState(estimator._kernel, self.max_batch, self.protect, factor, self._clock,
                                            self.probe_interval_ms)
            self.decide = self._state.decide  # type: ignore[method-assign]  # the compiled body, no Python frame
        else:
            self._base = factor
            self._ids: list[Any] = []
            self._kv: list[float] = []
            self._left: list[float] = []
            self._dl: list[float] = []
            self._prep: ref.Prepared | None = None
            self._counts = [0, 0, 0, 0]  # decisions, admits, rejects, probes
            self._last_admit = -math.inf
            self._last_factor = 1.0

    @classmethod
    def from_section(cls, section: Mapping[str, Any], prefill_coeffs: Sequence[float],
                     **kw: Any) -> BatchAdmissionController:
        return cls(BatchEstimator(section, prefill_coeffs), **kw)

    @property
    def base_factor(self) -> float:
        return float(self._state.base_factor) if self._state is not None else self._base

    @base_factor.setter
    def base_factor(self, value: float) -> None:
        """Set from outside (a replay's fitted factor): also the factor a refit falls back to."""
        self._start = (float(value), self.factor_source)
        self._set_base(value)

    def _set_base(self, value: float) -> None:
        if self._state is not None:
            self._state.base_factor = float(value)
        else:
            self._base = float(value)

    # ----------------------------------------------------------------- events
    def started(self, rid: Any, prompt: int, max_new_tokens: int, budget_ms: float, now: float | None = None,
                model_ms: float | None = None) -> None:
        """The request's prefill is done (first token out): it joins the batch with max_new_tokens - 1
        steps left and its deadline ``budget_ms`` after ``now`` (its decision time; default: the clock).
        ``model_ms``: the model's own predicted total at the decision (predicted_ms / last_factor) of a regular
        admission (not a probe); with ``level_step`` its predicted chance of missing moves the level."""
        t = self._clock() if now is None else now
        with self._lock:
            batch = self._admitted_batch.setdefault(rid, self.running() + 1)
            if model_ms is not None:
                self._spend_risk(float(model_ms), float(budget_ms), batch)
            if self._state is not None:
                self._state.started(rid, float(prompt), float(max_new_tokens - 1), t + float(budget_ms))
                return
            left = float(max_new_tokens - 1)
            pos = bisect_right(self._left, left)
            self._ids.insert(pos, rid)
            self._kv.insert(pos, float(prompt))
            self._left.insert(pos, left)
            self._dl.insert(pos, t + float(budget_ms))
            self._prep = None

    def token(self, rid: Any) -> None:
        """One token of ``rid`` emitted (one decode step it took)."""
        if self._state is not None:
            self._state.token(rid)
            return
        with self._lock:
            if rid in self._ids:
                i = self._ids.index(rid)
                self._kv[i] += 1.0
                self._left[i] -= 1.0
                order = sorted(range(len(self._left)), key=lambda k: self._left[k])
                for name in ("_ids", "_kv", "_left", "_dl"):
                    old = getattr(self, name)
                    setattr(self, name, [old[k] for k in order])
                self._prep = None

    def step(self) -> None:
        """Every running request emitted one token (one batched decode step): the order is unchanged."""
        if self._state is not None:
            self._state.step()
            return
        with self._lock:
            self._kv = [v + 1.0 for v in self._kv]
            self._left = [v - 1.0 for v in self._left]
            self._prep = None

    def finished(self, rid: Any, actual_ms: float | None = None, predicted_ms: float | None = None,
                 late: bool | None = None) -> None:
        """The request left the batch. With its actual duration and the predicted one (both ms from its
        decision; predicted = the model's total at the decision, see the class docstring) the
        score actual / predicted feeds the online factor and the batch-bucket correction. ``late``: whether
        it missed its SLO (None: unknown, e.g. cancelled): counted (``counters``), beside the level."""
        with self._lock:
            if late is not None:
                self._outcome(late)
            if self._state is not None:
                self._state.finished(rid)
            elif rid in self._ids:
                i = self._ids.index(rid)
                for name in ("_ids", "_kv", "_left", "_dl"):
                    del getattr(self, name)[i]
                self._prep = None
            batch = self._admitted_batch.pop(rid, None)
            if batch is None or actual_ms is None or not predicted_ms or not math.isfinite(actual_ms):
                return
            score = float(actual_ms) / float(predicted_ms)
            if not math.isfinite(score) or score <= 0:
                return
            now = self._clock()
            b = batch_bucket(batch)
            w = self._windows.get(b)
            if w is None:
                w = self._windows[b] = deque(maxlen=self._window)
                self._wtimes[b] = deque(maxlen=self._window)
            w.append(score)
            self._wtimes[b].append(now)
            self._scores.append((b, score, now))
            self._refit(now)

    def outcome(self, late: bool) -> None:
        """A request's outcome as its client saw it, when that is known only after it left the batch (`serve`
        judges it when the response is delivered): counted, and it moves the observed level."""
        with self._lock:
            self._outcome(late)

    def _outcome(self, late: bool) -> None:
        if late:
            self.late += 1
        else:
            self.on_time += 1
        if self.alpha is not None and self.level_step:
            self._level_observed = self._bounded(
                self._level_observed + self.level_step * (self.alpha - float(late)), self.level_bounds[0])
            self._set_level()

    def miss_chance(self, model_ms: float, budget_ms: float, batch: int) -> float | None:
        """The predicted chance that a request whose model total is ``model_ms`` joining ``batch`` misses
        ``budget_ms``: the share of the bucket-normalised scores above budget / (model_ms x the bucket's scale).
        None before the online regime (too few scores)."""
        with self._lock:
            return self._miss_chance(model_ms, budget_ms, batch)

    def _miss_chance(self, model_ms: float, budget_ms: float, batch: int) -> float | None:
        s = self._normalized
        if not s or not model_ms > 0:
            return None
        r = budget_ms / (model_ms * self._correction.get(batch_bucket(batch), 1.0))
        return (len(s) - bisect_right(s, r)) / len(s)

    def _spend_risk(self, model_ms: float, budget_ms: float, batch: int) -> None:
        """Under the lock: one regular admission's predicted miss chance p moves the level by step x (alpha - p),
        within level_bounds (see the class docstring)."""
        if self.alpha is None or not self.level_step:
            return
        p = self._miss_chance(model_ms, budget_ms, batch)
        if p is None:
            return
        # floor alpha: a predicted miss above the level comes from admissions the factor did not decide (a
        # factor changed since); only observed outcomes make the level stricter than alpha
        self._level_predicted = self._bounded(self._level_predicted + self.level_step * (self.alpha - p), self.alpha)
        self._set_level()

    def _bounded(self, level: float, lo: float) -> float:
        return min(max(level, lo), self.level_bounds[1])

    def _set_level(self) -> None:
        """Under the lock: the level = the lower tracker; the factor follows it at once, not at the next refit."""
        self.level = min(self._level_predicted, self._level_observed)
        self._set_online_base()

    def _set_online_base(self) -> None:
        """Under the lock, in the online regime: the base factor = the split-conformal quantile at the level of
        the sorted bucket-normalised scores (one index), clamped. The one place the online factor is read."""
        s = self._normalized
        if not s:
            return
        rank = conformal_rank(len(s), backed_level(len(s), self.level))  # type: ignore[arg-type]
        self._set_base(min(max(float(s[rank - 1]), self.clamp[0]), self.clamp[1]))

    def seed_scores(self, scores: Iterable[float]) -> None:
        """Warm start the online factor with scores of a batched replay (actual / predicted, as in finished)."""
        with self._lock:
            now = self._clock()
            self._scores.extend((-1, float(v), now) for v in scores if math.isfinite(v) and v > 0)  # -1: no bucket
            self._refit(now)

    def _expire(self, now: float) -> None:
        """Under the lock: drop the scores observed more than horizon_ms before ``now`` (each deque is in
        observation order, so from the left)."""
        cut = now - self.horizon_ms
        while self._scores and self._scores[0][2] < cut:
            self._scores.popleft()
            self.expired += 1
        for b, times in self._wtimes.items():
            w = self._windows[b]
            while times and times[0] < cut:
                times.popleft()
                w.popleft()

    def _refit(self, now: float) -> None:
        """Under the lock: expire the scores past the horizon; then per batch bucket its scale (median score;
        the pooled median until it has min_observations) and, once there are enough scores for alpha, the
        online factor: the split-conformal quantile of the scores divided by their bucket's scale (each
        bucket's factor = that x its scale). Before that, the start-up factor x each bucket's median relative
        to the pooled median (1 for a bucket without enough scores). All clamped."""
        from trt_latency.serving.conformal import min_requests_for

        self._expire(now)
        stale = {b: 1.0 for b in self._correction}  # a bucket whose scores expired: back to no correction
        if not self._scores:
            self._normalized = None
            self._set_base(self._start[0])
            self.factor_source = self._start[1]
            self._apply(stale)
            return
        lo, hi = self.clamp
        pooled = float(np.median([v for _, v, _ in self._scores]))
        scale = {b: float(np.median(w)) for b, w in self._windows.items() if len(w) >= self._min_obs}
        if self.alpha is not None and len(self._scores) >= min_requests_for(self.alpha):
            # every bucket up to the largest batch: the ones without enough scores take the pooled median;
            # the scores are divided by the clamped scale they will be multiplied by again, so the
            # quantile's coverage holds whatever the clamp cut
            clamped = {b: min(max(scale.get(b, pooled), lo), hi) for b in range(-1, batch_bucket(self.max_batch) + 1)}
            self._normalized = sorted(v / clamped.get(b, clamped[-1]) for b, v, _ in self._scores)
            self._set_online_base()  # at the level: alpha, or where the adaptive step moved it (counters' "level")
            self.factor_source = (f"online: conformal quantile at the controller's level of the last "
                                  f"{len(self._scores)} scores, each over its batch bucket's median")
            updates = {b: v for b, v in clamped.items() if b >= 0}
        else:  # the start-up regime (a fresh controller, or every score but a few expired)
            self._normalized = None
            self._set_base(self._start[0])
            self.factor_source = self._start[1]
            updates = {**stale, **{b: min(max(v / pooled, lo), hi) for b, v in scale.items()}}
        self._apply(updates)

    def _apply(self, updates: Mapping[int, float]) -> None:
        for b, value in updates.items():
            self._correction[b] = value
            if self._state is not None:
                self._state.set_correction(b, value)

    # ----------------------------------------------------------------- decisions
    @property
    def last_factor(self) -> float:
        """The factor the last decision's prediction was scaled by (1 for a probe): predicted_ms / last_factor
        is the model's own prediction, what ``finished`` scores against. Exact when read on the deciding
        thread right after decide (the events and refits, on other threads, do not change it)."""
        return float(self._state.last_factor) if self._state is not None else self._last_factor

    def correction(self, batch: int) -> float:
        return self._correction.get(batch_bucket(batch), 1.0)

    def running(self) -> int:
        return int(self._state.running) if self._state is not None else len(self._ids)

    def decide(self, rid: Any, prompt: int, max_new_tokens: int, budget_ms: float, now: float | None = None,
               want_fit: bool = False) -> BatchDecision:
        """Admit request ``rid`` (prompt tokens, max_new_tokens, budget in ms from now) into the batch now?
        A full batch (max_batch running) rejects. Never raises for bad fields. (With the compiled module
        this method is replaced by ``BatchState.decide``, the same steps.)"""
        if (type(prompt) is not int or type(max_new_tokens) is not int or not 1 <= prompt <= TOKEN_MAX
                or not 1 <= max_new_tokens <= TOKEN_MAX or type(budget_ms) not in (float, int)
                or not budget_ms >= 0):
            with self._lock:
                self._counts[0] += 1
                self._counts[2] += 1
            return BatchDecision(False, 0, math.nan, BAD_REQUEST, 0,
                                 "bad request: prompt and max_new_tokens integers >= 1, budget_ms a number >= 0")
        t = self._clock() if now is None else now
        with self._lock:
            m = len(self._ids)
            self._counts[0] += 1
            if m >= self.max_batch:
                self._counts[2] += 1
                return BatchDecision(False, 0, math.nan, ref.BST_NONE * 2, 0, "batch full (max_batch running)")
            if self._prep is None:
                self._prep = ref.prepare(self.estimator.tables, self._kv, self._left)
            center = self._correction.get(batch_bucket(m + 1), 1.0)  # the bucket's median bias: the give-up test's
            factor = self._last_factor = self._base * center
            d = ref.decide_prepared(self.estimator.tables, self._left, self._dl, self._prep, t, float(prompt),
                                    max_new_tokens, float(budget_ms), factor, self.protect, want_fit, center)
            if not d.admit and ref.probe_due(m, factor, t, self._last_admit, self.probe_interval_ms):
                p = ref.decide_prepared(self.estimator.tables, self._left, self._dl, self._prep, t, float(prompt),
                                        max_new_tokens, float(budget_ms), 1.0, self.protect, False)
                if p.admit:
                    self._counts[3] += 1
                    self._last_factor = 1.0
                    d = p._replace(reason=ref.PROBE_REASON)
            if d.admit:
                self._last_admit = t
            self._counts[1 if d.admit else 2] += 1
        return d

    def counters(self) -> dict[str, Any]:
        if self._state is not None:
            s = self._state
            counts = (int(s.decisions), int(s.admits), int(s.rejects), int(s.probes))
        else:
            counts = tuple(self._counts)  # type: ignore[assignment]
        with self._lock:
            live = len(self._scores)
        return {"decisions": counts[0], "admits": counts[1], "rejects": counts[2], "probes": counts[3],
                "running": self.running(), "scores": live, "expired_scores": self.expired,
                "level": self.level, "level_predicted": self._level_predicted,
                "level_observed": self._level_observed, "late": self.late, "on_time": self.on_time,
                "factor": self.base_factor, "factor_source": self.factor_source,
                "correction_by_batch_bucket": {f"<={1 << b}": v for b, v in sorted(self._correction.items())}}
