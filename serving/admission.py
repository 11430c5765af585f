"""AdmissionController: the Estimator inside a serving loop.

``decide(request)`` admits a request iff its budget covers its predicted total, corrected online
for machine drift and scaled by a threshold that keeps the promise of ``alpha``: of the admitted
requests, at most a fraction alpha miss their budget. ``observe(request, ttft_ms, total_ms)``
feeds what admitted requests really cost. Drift (clocks, co-tenants, a new driver) is followed
without a recalibration.

The correction, per (config, length bucket):
- per config, two windows (bounded deques) of ratios: TTFT / predicted prefill and
  (total - TTFT) / predicted decode. A per-step slowdown moves only the decode ratio and a CPU hog
  moves both; keeping them apart lets one correction serve short and long requests alike;
- the median of each window (one outlier cannot swing it); a window, not an all-time median, so a
  step change is followed after about window/2 observations of that config;
- per length bucket (KV length prompt + max_new_tokens), the median of the same ratios relative to
  the config's medians (a longer, slower window): the shape of the error over lengths. A global
  step change is thus followed at the speed of all the config's traffic, not of a bucket's share;
- nothing until ``min_observations`` ratios are in a window; then, for a request with predicted
  prefill p and decode d, the corrected prediction is ``m_p * r_p * p + m_d * r_d * d``, each
  scale (m_p * r_p, m_d * r_d) clamped to ``clamp``, so the whole stays within ``clamp`` times the
  raw prediction; the kernel evaluates exactly this scaled model (``admit_scaled``).

The threshold (what keeps the promise), per config: the last ``residual_window`` observations
(actual total and raw prefill / decode prediction) are scored against the current medians,
r = actual / corrected prediction; the last ``budget_window`` decisions give the traffic's budget
ratios u = budget / corrected prediction. A request is admitted iff u >= g, where g is the
smallest threshold whose expected violation rate among admitted requests, mean over {u >= g} of
the conservative survival (#{r > u} + 1) / (n + 1), stays <= alpha; g never exceeds the
split-conformal quantile of r, which bounds P(r > g) by alpha whatever the budgets. Until the
residual window holds ``conformal.min_requests_for(alpha)`` observations (warm-up), the
Estimator's stored conformal factor is applied to the raw prediction: ``admit(budget, alpha)``.
Residuals judged with a correction that has moved by more than ``regime_tolerance`` since are
dropped (the newest half of the window is always kept), so after a step change the window
describes today's noise, not the jump. Budget ratios are re-taken against the current correction.
``warm_start(log)`` seeds the windows from a replay; ``reset_after`` (off by default) lets a
controller that has rejected everything for a while fall back to the calibration.

Requests the Estimator cannot judge (config not in the calibration, lengths outside the measured
range) follow ``policy``: 'reject' (default), 'admit', or 'cap' (admit with max_new_tokens capped to
``cap_tokens``). Malformed requests (missing fields, None, NaN, negative, wrong types) are always
rejected with a reason: no policy should hand an engine a NaN length. ``decide`` and ``observe``
never raise. In a Request, num_active_blocks None or 0 means the tier's largest measured config
(as in the request log).

State: one ConfigState per config (its windows, medians, residuals, threshold, traffic ring,
counts and published gate), in one dict keyed by ConfigKey.

Thread safety and cost: one lock guards the windows and the slow-path counters. After each
observation the config's state is published whole (under the lock) as a new immutable
``published`` tuple: per length bucket the (prefill, decode) scales (m_p * r_p, m_d * r_d, each
clamped), the safety factor (the threshold g, or the stored conformal factor during warm-up) and
whether the threshold is online; with the compiled kernels also as a compiled Gate
(serving/_gate.pyx). ``decide`` reads the gate with one dict lookup (no lock) and makes ONE compiled
call, ``Gate.decide(request)``: field checks, bucket, the scaled model (max_new_tokens exact under
it), the traffic push and the count (C increments under the GIL: atomic for Python threads).
Anything the gate does not take (non-int fields, garbage, extrapolated lengths, unknown configs,
``reset_after`` set, the pure-Python kernels) goes through the Python path, which applies the same
model with ``Kernel.admit_scaled`` and reads the Decision's explicit ``code`` / ``extrapolated``
flags (no reason-text parsing). Request fields are checked by serving/validation.py, against the
kernels' own limit. ``observe`` recomputes the threshold (O(residual_window + budget_window log))
and belongs after the request, off the hot path.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from trt_latency import _native
from trt_latency.estimator.model import Decision, Estimator
from trt_latency.ext.layout import CODE_BAD, CODE_UNKNOWN_CONFIG, EXTRAPOLATED_BIT
from trt_latency.schema import ConfigKey
from trt_latency.serving import validation
from trt_latency.serving.conformal import conformal_factor, min_requests_for
from trt_latency.serving.validation import Invalid, Request

# The compiled gate (serving/_gate.pyx), or None: trt_latency._native decides for every compiled module at
# once (TRT_LATENCY_PUREPYTHON, a missing build); without it every decision takes the Python path.
_gate: Any = _native.gate

__all__ = ["POLICIES", "AdmissionController", "ConfigState", "Request"]

POLICIES = ("reject", "admit", "cap")
NAN = math.nan
_NEVER = 1 << 62  # probe_after / reset_after "off"


class _Windows:
    """Bounded windows of ratios (prefill, decode) of one config or (config, length bucket)."""

    __slots__ = ("prefill", "decode")

    def __init__(self, window: int) -> None:
        self.prefill: deque[float] = deque(maxlen=window)
        self.decode: deque[float] = deque(maxlen=window)

    def medians(self, min_observations: int) -> tuple[float, float] | None:
        """(prefill, decode) medians once the prefill window holds min_observations; None before."""
        if len(self.prefill) < min_observations:
            return None
        mp = _median(self.prefill)
        # Requests with one output token carry no decode information: reuse the prefill median.
        md = _median(self.decode) if len(self.decode) >= min_observations else mp
        return (mp, md)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class ConfigState:
    """Everything the controller knows about one config. Written under the controller's lock;
    ``published`` and ``gate`` are replaced whole, so decide reads them without it.

    - ``row``: the config's row in the Estimator's tables (-1: unknown config);
    - ``pooled``: the config's ratio windows (None until observed, or after a reset), ``medians``;
    - ``buckets``: per length bucket, windows of ratios relative to the config's medians, and
      ``relative``: their published medians;
    - ``residuals`` (actual total, raw prefill, raw decode, bucket, correction then) and ``threshold``;
    - ``traffic``: recent decisions (budget, prompt, max_new_tokens, bucket, vision tokens, images),
      for the threshold;
    - counts of decisions: in ``tally`` (compiled, shared with the gate) or in ``counts`` (Python);
    - ``published``: (per-bucket scales, factor, online) and ``gate``: the same, compiled.
    """

    __slots__ = ("key", "row", "pooled", "medians", "buckets", "relative", "residuals", "threshold", "traffic",
                 "tally", "counts", "published", "gate")  # fmt: skip

    def __init__(self, key: ConfigKey, row: int, compiled: bool) -> None:
        self.key = key
        self.row = row
        self.tally: Any = _gate.Tally() if compiled else None
        self.counts = [0, 0, 0, 0, 0]  # decisions, admits, rejects, probes, streak (without a tally)
        self.forget()

    def forget(self) -> None:
        """Drop what was learnt (windows, threshold, traffic, gate); the counts stay."""
        self.pooled: _Windows | None = None
        self.medians: tuple[float, float] | None = None
        self.buckets: dict[int, _Windows] = {}
        self.relative: dict[int, tuple[float, float]] = {}
        self.residuals: deque[tuple[float, float, float, int, float]] | None = None
        self.threshold: float | None = None
        self.traffic: Any = None
        self.published: tuple[tuple[tuple[float, float], ...], float, bool] | None = None
        self.gate: Any = None
        if self.tally is not None:
            self.tally.reset_streak()
        self.counts[4] = 0

    def new_traffic(self, capacity: int) -> Any:
        if self.traffic is None:
            self.traffic = _gate.Traffic(capacity) if self.tally is not None else deque(maxlen=capacity)
        return self.traffic

    def push(self, budget: float, prompt: int, n: int, bucket: int, vision: int, images: int) -> None:
        """Record a judged decision's budget in the traffic ring (atomic: no lock needed)."""
        if self.tally is not None:
            self.traffic.push(budget, prompt, n, bucket, vision, images)
        else:
            self.traffic.append((budget, prompt, n, bucket, vision, images))

    def recent(self) -> list[tuple[float, int, int, int, int, int]]:
        if self.traffic is None:
            return []
        return self.traffic.snapshot() if self.tally is not None else list(self.traffic)

    @property
    def streak(self) -> int:
        """Rejections since the last admit."""
        return int(self.tally.streak) if self.tally is not None else self.counts[4]

    def count(self, admitted: bool, probe: bool) -> None:
        """Count a decision of the Python path (the compiled gate counts its own into the tally)."""
        if self.tally is not None:
            self.tally.count(admitted, probe)
            return
        c = self.counts  # pure-Python kernels: counted under the controller's lock
        c[0] += 1
        c[1 if admitted else 2] += 1
        c[3] += 1 if admitted and probe else 0
        c[4] = 0 if admitted else c[4] + 1

    def totals(self) -> tuple[int, int, int, int]:
        """(decisions, admits, rejects, probes) counted for this config."""
        t = self.tally
        if t is not None:
            return t.decisions, t.admits, t.rejects, t.probes
        return self.counts[0], self.counts[1], self.counts[2], self.counts[3]


class AdmissionController:
    """Admit / reject requests against their budget with a stated violation rate and online drift correction.

    Parameters:
    - ``alpha``: the promised violation rate among admitted requests (None: no threshold, admit
      on the corrected prediction alone);
    - ``policy`` for requests the Estimator cannot judge, ``cap_tokens`` the max_new_tokens cap
      of policy 'cap';
    - ``window``: ratios kept per config and component (the drift medians; short, because
      co-tenant noise comes in bursts a short median can follow);
      ``min_observations`` before a median acts; ``bucket_edges``: KV-length edges
      (prompt + max_new_tokens) of the length buckets, ``bucket_window`` relative ratios kept
      per bucket; ``clamp``: bounds of the correction and of the threshold;
    - ``residual_window``: observations kept per config for the threshold (0: the stored
      conformal factors are used throughout); ``budget_window`` recent decisions kept per config
      and ``min_budgets`` before they may lower the threshold below the conformal quantile;
      ``regime_tolerance``: residuals judged with a correction that has moved by more than this
      since are dropped (the newest half of the window is always kept);
    - ``probe_after``: after that many rejections in a row for a config, admit one request that
      the corrected median prediction says fits (a controller that admits nothing learns nothing:
      a threshold learnt in a burst long gone would otherwise reject for ever); None: never;
    - ``reset_after``: after that many rejections in a row for a config, forget its windows and
      go back to the calibration's conformal factors (a controller that admits nothing learns
      nothing: a drift estimate from a burst long gone would otherwise reject for ever). Off by
      default: the fallback admits on the calibration's belief, which costs violations when the
      machine really did slow down;
    - ``max_buckets``: hard cap on tracked configs + buckets (bounded memory whatever the stream).
    """

    def __init__(
        self,
        estimator: Estimator,
        alpha: float | None = 0.05,
        policy: str = "reject",
        cap_tokens: int = 16,
        window: int = 8,
        min_observations: int = 4,
        clamp: tuple[float, float] = (0.25, 8.0),
        residual_window: int = 200,
        budget_window: int = 256,
        min_budgets: int = 50,
        regime_tolerance: float = 0.1,
        probe_after: int | None = 50,
        reset_after: int | None = None,
        bucket_edges: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
        bucket_window: int = 128,
        max_buckets: int = 256,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if alpha is not None and not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) or None, got {alpha!r}")
        if window < 1 or min_observations < 1 or min_observations > window:
            raise ValueError("need 1 <= min_observations <= window")
        lo, hi = clamp
        if not 0.0 < lo <= 1.0 <= hi:
            raise ValueError(f"clamp must satisfy 0 < lo <= 1 <= hi, got {clamp!r}")
        if cap_tokens < 1:
            raise ValueError("cap_tokens must be >= 1")
        if residual_window < 0:
            raise ValueError("residual_window must be >= 0")
        self.estimator = estimator
        self.alpha = alpha
        self.policy = policy
        self.cap_tokens = int(cap_tokens)
        self.window = int(window)
        self.min_observations = int(min_observations)
        self.clamp = (float(lo), float(hi))
        self.residual_window = int(residual_window)
        self.budget_window = int(budget_window)
        self.min_budgets = int(min_budgets)
        self.regime_tolerance = float(regime_tolerance)
        self.reset_after = reset_after if reset_after is not None else _NEVER
        self.probe_after = probe_after if probe_after is not None else _NEVER
        # Residuals needed before the online threshold replaces the stored factors.
        self.min_residuals = min_requests_for(alpha) if alpha is not None else 1
        self.bucket_edges = tuple(sorted(int(e) for e in bucket_edges))
        self.bucket_window = max(int(bucket_window), self.min_observations)
        self.max_buckets = int(max_buckets)
        self._kernel: Any = estimator._kernel
        # The compiled gate needs the compiled kernels (it reads their tables through a capsule).
        self._compiled = _gate is not None and estimator.implementation == "cython"
        self._lock = threading.Lock()
        self._states: dict[ConfigKey, ConfigState] = {}
        # Compiled gates by the Request's own (tier_idx, top_k, num_active_blocks) (None and 0
        # alike): decide's one lock-free lookup. An index into the states, rebuilt by _publish.
        self._gates: dict[tuple[Any, ...], Any] = {}
        self._tracked = 0  # configs + buckets with windows (max_buckets caps it)
        self._zero_counts()

    def _zero_counts(self) -> None:
        # Decisions the configs' states do not count (invalid, unjudged, never observed), observations.
        self._resets = self._decisions = self._admits = self._rejects = self._invalid = self._unjudged = 0
        self._policy_admits = self._observations = self._ignored_observations = self._violations = 0
        self._untracked = 0

    # --- deciding -------------------------------------------------------------------------------

    def _bucket_of(self, kv_len: int) -> int:
        return bisect.bisect_right(self.bucket_edges, kv_len)

    def _state(self, key: ConfigKey) -> ConfigState:
        """The config's state, created on first use (under the lock)."""
        state = self._states.get(key)
        if state is None:
            row = int(self._kernel.lookup(key[0], key[1], key[2] or -1))
            state = self._states[key] = ConfigState(key, row, self._compiled)
        return state

    def _split(self, v: int, t: int, n: int, tier: int, k: int, blocks: int | None,
               images: int = 1) -> tuple[float, float]:
        """Raw predicted (prefill, decode) ms; the prefill part includes a VLM request's encoder and
        embedding step (the TTFT it is compared with does, and the gate scales them with the prefill)."""
        row = self._kernel.lookup(tier, k, -1 if blocks is None else blocks)
        if row < 0:
            return NAN, NAN
        return self._raw(row, v + t, n, v, images)

    def _raw(self, row: int, prompt: int, n: int, vision: int, images: int) -> tuple[float, float]:
        pre, dec, _ = self._kernel.predict(row, float(prompt), float(n), 1.0)
        if vision > 0:
            pre += self._kernel.vision(row, float(vision), float(prompt), float(images))
        return pre, dec

    def _scales(self, state: ConfigState | None, bucket: int) -> tuple[float, float]:
        """(prefill scale, decode scale) on the raw prediction for this config and length bucket, each
        clamped (so any mix of the two stays within the clamp too); (1, 1) before the data."""
        medians = None if state is None else state.medians
        if medians is None:
            return (1.0, 1.0)
        rel = state.relative.get(bucket)  # type: ignore[union-attr]
        ps, ds = medians if rel is None else (medians[0] * rel[0], medians[1] * rel[1])
        lo, hi = self.clamp
        return (lo if ps < lo else hi if ps > hi else ps, lo if ds < lo else hi if ds > hi else ds)

    def _corrected(self, state: ConfigState | None, bucket: int, p: float, d: float) -> float:
        """Corrected / raw prediction for a request with raw prefill p and decode d."""
        raw = p + d
        if not raw > 0:
            return 1.0
        ps, ds = self._scales(state, bucket)
        return (ps * p + ds * d) / raw

    def _publish(self, state: ConfigState) -> None:
        """Rebuild what decide reads for this config (under the lock): per length bucket the
        (prefill, decode) scales, the safety factor, and, compiled, the gate."""
        traffic = state.new_traffic(self.budget_window)
        scales = tuple(self._scales(state, b) for b in range(len(self.bucket_edges) + 1))
        g = state.threshold
        if self.alpha is None:
            factor = 1.0
        elif g is not None:
            factor = g
        else:  # warm-up: the calibration's conformal factor on the raw prediction (no correction yet)
            scales = ((1.0, 1.0),) * len(scales)
            factor = self._stored_factor(state)
        online = g is not None
        state.published = (scales, factor, online)
        if not self._compiled or state.row < 0 or self.reset_after < _NEVER:  # reset_after: Python path
            return
        state.gate = _gate.Gate(self._kernel, state.row, self.bucket_edges, scales, factor, online,
                                min(self.probe_after, _NEVER), state.tally, traffic)
        key = state.key
        for alias in ((key[0], key[1], None), tuple(key)) if key[2] == 0 else (tuple(key),):
            self._gates[alias] = state.gate

    def _stored_factor(self, state: ConfigState) -> float:
        if self.alpha is None or state.row < 0:
            return 1.0
        return float(self._kernel.alpha_factor(state.row, self.alpha)[0])

    def correction(self, request: object) -> float:
        """The factor on this request's raw prediction that ``decide`` compares with the budget now:
        drift correction times the online threshold (1.0 while the controller has no data)."""
        try:
            v, t, n, tier, k, blocks, _, images = validation.parse(request)
            state = self._states.get(ConfigKey(tier, k, blocks or 0))
            p, d = self._split(v, t, n, tier, k, blocks, images)
            c = self._corrected(state, self._bucket_of(v + t + n), p, d)
            if self.alpha is None:
                return c
            g = None if state is None else state.threshold
            return 1.0 if g is None else c * g
        except Exception:  # noqa: BLE001
            return 1.0

    def decide(self, request: object, _validated: bool = False) -> Decision:
        """Admit or reject one request; never raises.

        The hot path: a Request of plain ints and a float budget -> the config's compiled gate (a
        plain dict read, no lock) -> one compiled call. Everything else: the Python path below."""
        if type(request) is not Request:
            return self._decide_checked(request)
        r: Request = request  # type: ignore[assignment]  # checked just above (no cast(): a call per decision)
        try:
            gate = self._gates.get(r[3:6])
        except TypeError:  # an unhashable field
            gate = None
        if gate is not None:
            dec = gate.decide(r)
            if dec is not None:
                return dec
        v, t, n, tier, k, blocks, budget, images = r
        if not (type(v) is int and type(t) is int and type(n) is int and type(tier) is int and type(k) is int
                and (blocks is None or type(blocks) is int) and type(images) is int):
            return self._decide_checked(request)  # numpy scalars and garbage: validated first
        if not (_validated or type(budget) is float and budget > 0.0):
            return self._decide_checked(request)
        if blocks == 0:
            blocks = None  # 0 = the tier's largest measured, as in the request log
        probe = False
        try:
            state = self._states.get((tier, k, blocks or 0))  # type: ignore[call-overload]  # a tuple hashes as ConfigKey
            published = None if state is None else state.published
            if published is None:  # never observed: the Estimator's own decision, with the stored factor
                dec = self.estimator.admit(budget, v, t, n, tier, k, blocks, self.alpha, images)
            else:
                scales, factor, online = published
                prompt = v + t
                bucket = bisect.bisect_right(self.bucket_edges, prompt + n)
                if online and state.streak >= self.probe_after:  # type: ignore[union-attr]
                    # Starving: a controller that admits nothing learns nothing, and a threshold
                    # learnt in a burst long gone would reject for ever. Once per probe_after
                    # rejections, admit what the corrected median says fits.
                    factor, probe = 1.0, True
                ps, ds = scales[bucket]
                dec = self._kernel.admit_scaled(budget, v, t, n, tier, k, blocks, ps, ds, factor, images)
                code = dec.code
                if code < CODE_BAD:
                    state.push(budget, prompt, n, bucket, v, images)  # type: ignore[union-attr]
                    if not code & EXTRAPOLATED_BIT:
                        with self._lock:
                            state.count(dec.admit, probe)  # type: ignore[union-attr]
                            if state.streak >= self.reset_after:  # type: ignore[union-attr]
                                self._forget(state)  # type: ignore[arg-type]
                        return dec
        except Exception as exc:  # noqa: BLE001 - garbage fields: the checked path says which
            if _validated:
                return self._tally(Decision(False, 0, NAN, f"estimator error: {type(exc).__name__}"), invalid=True)
            return self._decide_checked(request)
        code = dec.code
        if code >= CODE_BAD or code & EXTRAPOLATED_BIT:
            if code >= CODE_BAD and code != CODE_UNKNOWN_CONFIG:
                return self._tally(Decision(False, 0, NAN, f"invalid request: {dec.reason}"), invalid=True)
            return self._tally(self._apply_policy(dec, n), unjudged=True)
        return self._tally(dec)

    def _decide_checked(self, request: object) -> Decision:
        try:
            v, t, n, tier, k, blocks, raw_budget, images = validation.parse(request)
            budget = validation.budget(raw_budget)
        except Invalid as exc:
            return self._tally(Decision(False, 0, NAN, f"invalid request: {exc}"), invalid=True)
        except Exception as exc:  # noqa: BLE001 - never take the serving loop down
            return self._tally(Decision(False, 0, NAN, f"invalid request: {type(exc).__name__}"), invalid=True)
        return self.decide(Request(v, t, n, tier, k, blocks, budget, images), True)

    def _forget(self, state: ConfigState) -> None:
        """Starving: a controller that admits nothing learns nothing, and its drift estimate is as
        old as its last admit. Drop the config's windows (under the lock): back to the warm-up,
        the calibration's own conformal factors, until fresh observations come in."""
        if state.pooled is not None:
            self._tracked -= 1 + len(state.buckets)
        key = state.key
        for alias in ((key[0], key[1], None), tuple(key)) if key[2] == 0 else (tuple(key),):
            self._gates.pop(alias, None)
        state.forget()
        self._resets += 1

    def _apply_policy(self, d: Decision, n: int) -> Decision:
        if self.policy == "admit":
            return Decision(True, n, NAN, f"cannot judge ({d.reason}); admitted by policy")
        if self.policy == "cap":
            return Decision(True, min(n, self.cap_tokens), NAN,
                            f"cannot judge ({d.reason}); admitted by policy with max_new_tokens <= {self.cap_tokens}")
        return Decision(False, 0, NAN, f"cannot judge ({d.reason}); rejected by policy")

    def _tally(self, d: Decision, invalid: bool = False, unjudged: bool = False) -> Decision:
        with self._lock:
            self._decisions += 1
            if d.admit:
                self._admits += 1
                if unjudged:
                    self._policy_admits += 1
            else:
                self._rejects += 1
            if invalid:
                self._invalid += 1
            elif unjudged:
                self._unjudged += 1
        return d

    # --- observing ------------------------------------------------------------------------------

    def observe(self, request: object, ttft_ms: float, total_ms: float, output_tokens: int | None = None) -> None:
        """Feed what an admitted request really cost (``output_tokens`` defaults to its max_new_tokens)."""
        try:
            self._observe(request, ttft_ms, total_ms, output_tokens)
        except Exception:  # noqa: BLE001 - a bad observation is dropped, never raised into the loop
            with self._lock:
                self._ignored_observations += 1

    def warm_start(self, log: Any) -> int:
        """Seed the windows from a request log (estimator.requests.RequestLog or a mapping of its
        columns: vision_tokens, text_tokens, output_tokens, tier_idx, top_k, num_active_blocks,
        ttft_ms, total_ms; images where the log has it, else 1 per request), e.g. the replay `calibrate`
        ran. Not counted as observations or violations. Returns the rows used. Without it the controller
        starts from the stored conformal factors alone and, if they are far too conservative, may admit
        nothing to learn from."""
        names = ("vision_tokens", "text_tokens", "output_tokens", "tier_idx", "top_k", "num_active_blocks",
                 "ttft_ms", "total_ms")
        cols = [log[n] if isinstance(log, Mapping) else getattr(log, n) for n in names]
        images = log.get("images") if isinstance(log, Mapping) else getattr(log, "images", None)
        if images is None:
            images = [1] * len(cols[0])
        used = 0
        for v, t, n, tier, k, blocks, ttft, total, im in zip(*cols, images, strict=True):
            request = Request(int(v), int(t), int(n), int(tier), int(k), int(blocks) or None, None, max(int(im), 1))
            try:
                self._observe(request, float(ttft), float(total), None, counted=False)
                used += 1
            except Exception:  # noqa: BLE001 - a bad row is skipped
                continue
        return used

    def _observe(self, request: object, ttft_ms: float, total_ms: float, output_tokens: int | None,
                 counted: bool = True) -> None:
        v, t, n, tier, k, blocks, raw_budget, images = validation.parse(request)
        if output_tokens is not None:
            n = validation.count("output_tokens", output_tokens, lo=1)
        ttft, total = float(ttft_ms), float(total_ms)
        if not (math.isfinite(ttft) and math.isfinite(total) and 0 < ttft <= total):
            raise Invalid("need finite 0 < ttft_ms <= total_ms")
        try:
            budget = validation.budget(raw_budget)
        except Invalid:
            budget = math.inf
        p, d = self._split(v, t, n, tier, k, blocks, images)
        if not (math.isfinite(p) and p > 0 and math.isfinite(d) and d >= 0):
            raise Invalid("no usable prediction")
        prefill_ratio = ttft / p
        decode_ratio = (total - ttft) / d if n >= 2 and d > 0 else None
        key = ConfigKey(tier, k, blocks or 0)
        bucket = self._bucket_of(v + t + n)
        with self._lock:
            if counted:
                self._observations += 1
                if total > budget:
                    self._violations += 1
            state = self._states.get(key)
            if state is None or state.pooled is None:
                if self._tracked >= self.max_buckets:  # bounded memory: states only for tracked configs
                    self._untracked += 1
                    return
                state = state or self._state(key)
                state.pooled = _Windows(self.window)
                self._tracked += 1
            before = state.medians
            c_then = self._corrected(state, bucket, p, d)  # the correction this request was judged with
            state.pooled.prefill.append(prefill_ratio)
            if decode_ratio is not None:
                state.pooled.decode.append(decode_ratio)
            medians = state.pooled.medians(self.min_observations)
            if medians is not None:
                state.medians = medians
            # Length buckets learn only the shape: ratios relative to the config's medians as they
            # stood, so a global step change is followed at the speed of all traffic, not of the
            # bucket's share of it.
            if before is not None:
                windows = state.buckets.get(bucket)
                if windows is None and self._tracked < self.max_buckets:
                    windows = state.buckets[bucket] = _Windows(self.bucket_window)
                    self._tracked += 1
                if windows is not None:
                    windows.prefill.append(prefill_ratio / before[0])
                    if decode_ratio is not None:
                        windows.decode.append(decode_ratio / before[1])
                    rel = windows.medians(self.min_observations)
                    if rel is not None:
                        state.relative[bucket] = rel
            if self.residual_window and self.alpha is not None:
                if state.residuals is None:
                    state.residuals = deque(maxlen=self.residual_window)
                    state.new_traffic(self.budget_window)
                state.residuals.append((total, p, d, bucket, c_then))
                if len(state.residuals) >= self.min_residuals:
                    state.threshold = self._threshold_of(state, self.alpha)
            self._publish(state)

    def _threshold_of(self, state: ConfigState, alpha: float) -> float:
        """The smallest g such that admitting requests whose budget >= g * corrected prediction keeps
        the expected violation rate among admitted requests <= alpha.

        Residuals r = actual / corrected prediction come from the window, scored against the
        current medians (so after the medians follow a step change, residuals from before it stop
        inflating g; otherwise the controller could reject everything and never learn again).
        Budget ratios u = budget / corrected prediction come from recent decisions, admitted or
        not (the traffic). Admitting {u >= g} violates where r > u; with the conservative
        survival estimate S(u) = (#{r > u} + 1) / (n + 1), the expected violation rate is the mean
        of S(u) over the admitted u, which grows as g falls: take the smallest g that keeps it
        <= alpha. Never above the split-conformal quantile of r (which bounds P(r > g) itself).
        """
        entries = tuple(state.residuals or ())
        recent = len(entries) - max(self.min_residuals, len(entries) // 2)
        scores = []
        for i, (total, p, d, b, c_then) in enumerate(entries):
            c_now = self._corrected(state, b, p, d)
            # An observation made under another regime (the correction has moved since by more than
            # regime_tolerance) says nothing about today's noise: drop it, but always keep the
            # most recent half (the window restarts after a step change, it never empties).
            if i >= recent or abs(c_now / c_then - 1.0) <= self.regime_tolerance:
                scores.append(total / ((p + d) * c_now))
        scores.sort()
        g_conformal = conformal_factor(scores, alpha)
        # The ring is copied in one C call under the GIL, so decide's lock-free pushes cannot interleave.
        # Budget ratios are taken against the current correction too: a ratio stored with the
        # correction of its time would be stale right after a step change, when it matters most.
        budgets = []
        for budget, prompt, n, bucket, vision, images in state.recent():
            p_raw, d_raw = self._raw(state.row, prompt, n, vision, images)
            budgets.append(budget / ((p_raw + d_raw) * self._corrected(state, bucket, p_raw, d_raw)))
        budgets.sort(reverse=True)
        g = g_conformal
        if len(budgets) >= self.min_budgets:
            n_scores = len(scores)
            total_s, count = 0.0, 0
            for u in budgets:
                total_s += (n_scores - bisect.bisect_right(scores, u) + 1) / (n_scores + 1)
                count += 1
                if total_s > alpha * count:
                    break
                if u < g:
                    g = u
        lo, hi = self.clamp
        return lo if g < lo else hi if g > hi else g

    # --- reading --------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """A consistent snapshot: decision and observation counts and the current corrections."""
        with self._lock:
            states = sorted(self._states.values(), key=lambda s: s.key)
            totals = [s.totals() for s in states]
            corrections: dict[str, Any] = {}
            thresholds: dict[str, Any] = {}
            for s in states:
                name = f"{s.key[0]},{s.key[1]},{s.key[2]}"
                m = s.medians
                if m is not None and s.pooled is not None:
                    corrections[name] = {"prefill": m[0], "decode": m[1], "n": len(s.pooled.prefill)}
                    for b, rel in sorted(s.relative.items()):
                        corrections[f"{name}|{self._bucket_label(b)}"] = {
                            "prefill": m[0] * rel[0], "decode": m[1] * rel[1], "n": len(s.buckets[b].prefill)}
                if s.threshold is not None:
                    thresholds[name] = {"threshold": s.threshold, "residuals": len(s.residuals or ()),
                                        "budgets": len(s.recent())}
            return {
                "decisions": self._decisions + sum(t[0] for t in totals),
                "admits": self._admits + sum(t[1] for t in totals),
                "rejects": self._rejects + sum(t[2] for t in totals),
                "invalid": self._invalid,
                "unjudged": self._unjudged,
                "policy_admits": self._policy_admits,
                "resets": self._resets,
                "probes": sum(t[3] for t in totals),
                "observations": self._observations,
                "ignored_observations": self._ignored_observations,
                "violations": self._violations,
                "untracked_observations": self._untracked,
                "buckets": self._tracked,
                "corrections": corrections,
                "thresholds": thresholds,
            }

    def _bucket_label(self, b: int) -> str:
        edges = self.bucket_edges
        lo = 0 if b == 0 else edges[b - 1] + 1
        return f"kv{lo}+" if b == len(edges) else f"kv{lo}-{edges[b]}"

    def reset(self) -> None:
        """Forget every observation and count (e.g. after a recalibration)."""
        with self._lock:
            self._states.clear()
            self._gates.clear()
            self._tracked = 0
            self._zero_counts()
