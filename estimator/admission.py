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

Thread safety and cost: one lock guards the windows and the slow-path counters. After each
observation the config's state is published whole (under the lock) as a new immutable gate:
per length bucket the (prefill, decode) scales (m_p * r_p, m_d * r_d, each clamped), the safety
factor (the threshold g, or the stored conformal factor during warm-up) and references to the
config's kernels.Tally and kernels.Traffic ring. ``decide`` reads the gate with one dict lookup
(no lock) and makes ONE compiled call, ``Gate.decide(request)``: field checks, bucket,
``admit_scaled`` on the scaled model (max_new_tokens exact under it), the traffic push and the
count (C increments under the GIL: atomic for Python threads). Anything the gate does not take
(non-int fields, garbage, extrapolated lengths, unknown configs, ``reset_after`` set) goes through
the Python path, which applies the same model with ``Kernel.admit_tallied`` and reads the
Decision's explicit ``code`` / ``extrapolated`` flags (no reason-text parsing). ``observe``
recomputes the threshold (O(residual_window + budget_window log)) and belongs after the request,
off the hot path.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from trt_latency.estimator import _reference as ref
from trt_latency.estimator import kernels
from trt_latency.estimator.conformal import conformal_factor, min_requests_for
from trt_latency.estimator.model import Decision, Estimator

POLICIES = ("reject", "admit", "cap")
_CODE_BAD = ref.CODE_BAD  # decision codes >= this: a field the kernel refused (or unknown config)
_CODE_UNKNOWN = ref.CODE_UNKNOWN_CONFIG
_EXTRAPOLATED = ref.EXTRAPOLATED_BIT
MAX_TOKENS = 1 << 24  # far beyond any KV cache; larger counts are garbage, not requests
NAN = math.nan


class Request(NamedTuple):
    """One request as the serving loop sees it (a Mapping with these keys works too)."""

    vision_tokens: int
    text_tokens: int
    max_new_tokens: int
    tier_idx: int = 0
    top_k: int = 1
    num_active_blocks: int | None = None
    budget_ms: float | None = None


_FIELDS = Request._fields
_DEFAULTS = Request._field_defaults


class _Invalid(Exception):
    """A malformed request field (internal: becomes a rejecting Decision)."""


def _count(name: str, value: object) -> int:
    if type(value) is int:  # the fast path: plain ints
        if 0 <= value <= MAX_TOKENS:
            return value
        raise _Invalid(f"{name} must be an integer in [0, {MAX_TOKENS}], got {value!r}")
    if isinstance(value, np.integer) and not isinstance(value, bool):
        return _count(name, int(value))
    raise _Invalid(f"{name} must be an integer, got {type(value).__name__} {_short(value)}")


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not escape
        text = "<unprintable>"
    return text if len(text) <= 40 else text[:37] + "..."


def _budget(value: object) -> float:
    if type(value) is float or (isinstance(value, int | np.integer | np.floating) and not isinstance(value, bool)):
        budget = float(value)  # type: ignore[arg-type]
        if math.isfinite(budget) and budget > 0:
            return budget
    raise _Invalid(f"budget_ms must be a finite number > 0, got {_short(value)}")


def _fields(request: object) -> tuple[int, int, int, int, int, int | None, object]:
    """(vision, text, max_new, tier, top_k, blocks, raw budget); raises _Invalid."""
    if type(request) is Request:
        v, t, n, tier, k, blocks, budget = request  # type: ignore[misc]
    elif isinstance(request, Mapping):
        try:
            v, t, n = request["vision_tokens"], request["text_tokens"], request["max_new_tokens"]
        except KeyError as exc:
            raise _Invalid(f"missing field {exc.args[0]!r}") from None
        except Exception as exc:  # noqa: BLE001 - hostile mappings
            raise _Invalid(f"unreadable request ({type(exc).__name__})") from None
        try:
            tier = request.get("tier_idx", 0)
            k = request.get("top_k", 1)
            blocks = request.get("num_active_blocks")
            budget = request.get("budget_ms")
        except Exception as exc:  # noqa: BLE001
            raise _Invalid(f"unreadable request ({type(exc).__name__})") from None
    elif isinstance(request, tuple) and len(request) == len(_FIELDS):
        v, t, n, tier, k, blocks, budget = request
    else:
        raise _Invalid(f"expected a Request or a mapping, got {type(request).__name__}")
    vision = _count("vision_tokens", v)
    text = _count("text_tokens", t)
    new = _count("max_new_tokens", n)
    if new < 1:
        raise _Invalid("max_new_tokens must be >= 1")
    tier_i = _count("tier_idx", tier)
    top_k = _count("top_k", k)
    blocks_i = None if blocks is None or (type(blocks) is int and blocks == 0) else _count("num_active_blocks", blocks)
    return vision, text, new, tier_i, top_k, blocks_i, budget


class _Bucket:
    """Bounded windows of one (config, length bucket). Guarded by the controller's lock."""

    __slots__ = ("prefill", "decode")

    def __init__(self, window: int) -> None:
        self.prefill: deque[float] = deque(maxlen=window)
        self.decode: deque[float] = deque(maxlen=window)


def _medians(windows: _Bucket, min_observations: int) -> tuple[float, float] | None:
    """(prefill, decode) medians once the prefill window holds min_observations; None before."""
    if len(windows.prefill) < min_observations:
        return None
    mp = _median(windows.prefill)
    # Requests with one output token carry no decode information: reuse the prefill median.
    md = _median(windows.decode) if len(windows.decode) >= min_observations else mp
    return (mp, md)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


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
        self.reset_after = reset_after if reset_after is not None else 1 << 62
        self.probe_after = probe_after if probe_after is not None else 1 << 62
        # Residuals needed before the online threshold replaces the stored factors.
        self.min_residuals = min_requests_for(alpha) if alpha is not None else 1
        self.bucket_edges = tuple(sorted(int(e) for e in bucket_edges))
        self.bucket_window = max(int(bucket_window), self.min_observations)
        self.max_buckets = int(max_buckets)
        # The kernel's own lookup/predict (compiled when the extension is built): no validation frame.
        self._kernel: Any = getattr(estimator, "_kernel", None)
        # One compiled call per decision: admit on the scaled model (corrections + safety factor).
        self._admit_scaled = estimator._kernel.admit_scaled
        # Published per config (replaced whole under the lock, read by decide without it):
        # (per-bucket (prefill, decode) scales, safety factor, traffic deque, threshold online?).
        self._gate: dict[tuple[int, int, int], tuple[tuple[tuple[float, float], ...], float,
                                                     Any, bool, Any]] = {}
        self._lock = threading.Lock()
        self._configs: dict[tuple[int, int, int], _Bucket] = {}
        self._buckets: dict[tuple[tuple[int, int, int], int], _Bucket] = {}
        self._residuals: dict[tuple[int, int, int], deque[tuple[float, float, float, int, float]]] = {}
        # Published, read lock-free by decide: (median prefill ratio, median decode ratio) per config,
        # the bucket's median of those ratios relative to its config's, and the threshold per config.
        self._config_medians: dict[tuple[int, int, int], tuple[float, float]] = {}
        self._published: dict[tuple[tuple[int, int, int], int], tuple[float, float]] = {}
        self._threshold: dict[tuple[int, int, int], float] = {}
        self._budgets: dict[tuple[int, int, int], Any] = {}  # kernels.Traffic rings
        # Per config decision counts (kernels.Tally: counted inside the kernel call, no lock).
        self._tallies: dict[tuple[int, int, int], Any] = {}
        self._admit_tallied = estimator._kernel.admit_tallied
        # The implementation of the Estimator's kernel (compiled or reference) for Tally/Traffic/Gate.
        self._impl: Any = ref if isinstance(estimator._kernel, ref.Kernel) else kernels.impl
        # Compiled gates by the Request's own (tier_idx, top_k, num_active_blocks) (None and 0 alike).
        self._fast: dict[tuple[Any, Any, Any], Any] = {}
        self._resets = 0
        self._probes = 0
        self._decisions = 0
        self._admits = 0
        self._rejects = 0
        self._invalid = 0
        self._unjudged = 0
        self._policy_admits = 0
        self._observations = 0
        self._ignored_observations = 0
        self._violations = 0
        self._untracked = 0

    # --- deciding -------------------------------------------------------------------------------

    def _bucket_of(self, kv_len: int) -> int:
        return bisect.bisect_right(self.bucket_edges, kv_len)

    def _split(self, v: int, t: int, n: int, tier: int, k: int, blocks: int | None) -> tuple[float, float]:
        """Raw predicted (prefill, decode) ms."""
        kernel = self._kernel
        if kernel is not None:
            row = kernel.lookup(tier, k, -1 if blocks is None else blocks)
            if row < 0:
                return NAN, NAN
            pre, dec, _ = kernel.predict(row, float(v + t), float(n), 1.0)
            return pre, dec
        pred = self.estimator.predict(v, t, n, tier_idx=tier, top_k=k, num_active_blocks=blocks)
        return float(pred.prefill_ms), float(pred.decode_ms)

    def _scales(self, key: tuple[int, int, int], bucket: int) -> tuple[float, float]:
        """(prefill scale, decode scale) on the raw prediction for this config and length bucket, each
        clamped (so any mix of the two stays within the clamp too); (1, 1) before the data."""
        medians = self._config_medians.get(key)
        if medians is None:
            return (1.0, 1.0)
        rel = self._published.get((key, bucket))
        ps, ds = medians if rel is None else (medians[0] * rel[0], medians[1] * rel[1])
        lo, hi = self.clamp
        return (lo if ps < lo else hi if ps > hi else ps, lo if ds < lo else hi if ds > hi else ds)

    def _corrected(self, key: tuple[int, int, int], bucket: int, p: float, d: float) -> float:
        """Corrected / raw prediction for a request with raw prefill p and decode d."""
        raw = p + d
        if not raw > 0:
            return 1.0
        ps, ds = self._scales(key, bucket)
        return (ps * p + ds * d) / raw

    def _publish(self, key: tuple[int, int, int]) -> None:
        """Rebuild the immutable gate decide reads for this config (under the lock): per length
        bucket the (prefill, decode) scales, the safety factor, and the traffic deque to append to."""
        budgets = self._budgets.get(key)
        if budgets is None:
            budgets = self._budgets[key] = self._impl.Traffic(self.budget_window)
        scales = tuple(self._scales(key, b) for b in range(len(self.bucket_edges) + 1))
        g = self._threshold.get(key)
        if self.alpha is None:
            factor = 1.0
        elif g is not None:
            factor = g
        else:  # warm-up: the calibration's conformal factor on the raw prediction (no correction yet)
            scales = ((1.0, 1.0),) * len(scales)
            factor = self._stored_factor(key)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = self._impl.Tally()
        online = g is not None
        self._gate[key] = (scales, factor, budgets, online, tally)
        row = self._kernel.lookup(key[0], key[1], key[2] or -1)
        if row < 0 or self.reset_after < 1 << 62:  # reset_after (off by default) is handled in Python
            return
        fast = self._impl.Gate(self._kernel, row, self.bucket_edges, scales, factor, online,
                               min(self.probe_after, 1 << 62), MAX_TOKENS, tally, budgets)
        for alias in ((key[0], key[1], None), key) if key[2] == 0 else (key,):
            self._fast[alias] = fast

    def _stored_factor(self, key: tuple[int, int, int]) -> float:
        kernel = self._kernel
        if kernel is None or self.alpha is None:
            return 1.0
        row = kernel.lookup(key[0], key[1], key[2] or -1)
        return float(kernel.alpha_factor(row, self.alpha)[0]) if row >= 0 else 1.0

    def correction(self, request: object) -> float:
        """The factor on this request's raw prediction that ``decide`` compares with the budget now:
        drift correction times the online threshold (1.0 while the controller has no data)."""
        try:
            v, t, n, tier, k, blocks, _ = _fields(request)
            key = (tier, k, blocks or 0)
            p, d = self._split(v, t, n, tier, k, blocks)
            c = self._corrected(key, self._bucket_of(v + t + n), p, d)
            if self.alpha is None:
                return c
            g = self._threshold.get(key)
            return 1.0 if g is None else c * g
        except Exception:  # noqa: BLE001
            return 1.0

    def decide(self, request: object, _validated: bool = False) -> Decision:
        """Admit or reject one request; never raises.

        The hot path: a Request of plain ints and a float budget -> the config's published gate (a
        plain dict read, no lock) -> one kernel call, ``admit_scaled`` with the per-bucket
        (prefill, decode) corrections and the safety factor -> one locked counter update."""
        if type(request) is not Request:
            return self._decide_checked(request)
        # The compiled gate: field checks, bucket, scaled decision, traffic and count in one call.
        # None = anything it does not handle (garbage, extrapolated, ...): the path below does.
        try:
            gate = self._fast.get(request[3:6])
        except TypeError:  # an unhashable field
            gate = None
        if gate is not None:
            dec = gate.decide(request)
            if dec is not None:
                return dec
        v, t, n, tier, k, blocks, budget = request
        probe = False
        try:
            if blocks is None:
                b0 = 0
            elif type(blocks) is int:
                b0 = blocks
                if b0 == 0:
                    blocks = None  # 0 = the tier's largest measured, as in the request log
            else:
                return self._decide_checked(request)
            if not (type(v) is int and type(t) is int and type(n) is int and type(tier) is int and type(k) is int):
                return self._decide_checked(request)  # numpy scalars and garbage: validated first
            prompt = v + t
            # The kernel checks types and signs; what is left: a budget > 0 and the controller's
            # stricter MAX_TOKENS (non-negative fields summing under it are each under it).
            if not (_validated or type(budget) is float and budget > 0.0
                    and prompt + n + tier + k + b0 <= MAX_TOKENS):
                return self._decide_checked(request)
            key = (tier, k, b0)
            gate = self._gate.get(key)
            if gate is None:  # never observed: the Estimator's own decision, with the stored factor
                dec = self.estimator.admit(budget, v, t, n, tier, k, blocks, self.alpha)
            else:
                scales, factor, budgets, online, tally = gate
                bucket = bisect.bisect_right(self.bucket_edges, prompt + n)
                if online and tally.streak >= self.probe_after:
                    # Starving: a controller that admits nothing learns nothing, and a threshold
                    # learnt in a burst long gone would reject for ever. Once per probe_after
                    # rejections, admit what the corrected median says fits.
                    factor, probe = 1.0, True
                ps, ds = scales[bucket]
                # One compiled call: scaled model, exact max_new_tokens, and the count (in C, atomic
                # under the GIL) when the request was judged inside the measured range.
                dec = self._admit_tallied(tally, probe, budget, v, t, n, tier, k, blocks, ps, ds, factor)
                code = dec.code
                if code < _CODE_BAD:
                    budgets.push(budget, prompt, n, bucket)  # atomic: no lock here
                    if not code & _EXTRAPOLATED:
                        if tally.streak >= self.reset_after:
                            with self._lock:
                                self._forget(key)
                        return dec
        except Exception as exc:  # noqa: BLE001 - garbage fields: the checked path says which
            if _validated:
                return self._tally(Decision(False, 0, NAN, f"estimator error: {type(exc).__name__}"), invalid=True)
            return self._decide_checked(request)
        code = dec.code
        if code >= _CODE_BAD or code & _EXTRAPOLATED:
            if code >= _CODE_BAD and code != _CODE_UNKNOWN:
                return self._tally(Decision(False, 0, NAN, f"invalid request: {dec.reason}"), invalid=True)
            return self._tally(self._apply_policy(dec, n), unjudged=True)
        return self._tally(dec)

    def _decide_checked(self, request: object) -> Decision:
        try:
            v, t, n, tier, k, blocks, raw_budget = _fields(request)
            budget = _budget(raw_budget)
        except _Invalid as exc:
            return self._tally(Decision(False, 0, NAN, f"invalid request: {exc}"), invalid=True)
        except Exception as exc:  # noqa: BLE001 - never take the serving loop down
            return self._tally(Decision(False, 0, NAN, f"invalid request: {type(exc).__name__}"), invalid=True)
        if n < 1:
            return self._tally(Decision(False, 0, NAN, "invalid request: max_new_tokens must be >= 1"), invalid=True)
        if blocks is not None and blocks > MAX_TOKENS:
            return self._tally(Decision(False, 0, NAN, "invalid request: num_active_blocks too large"), invalid=True)
        return self.decide(Request(v, t, n, tier, k, blocks, budget), True)

    def _forget(self, key: tuple[int, int, int]) -> None:
        """Starving: a controller that admits nothing learns nothing, and its drift estimate is as
        old as its last admit. Drop the config's windows (under the lock): back to the warm-up,
        the calibration's own conformal factors, until fresh observations come in."""
        self._configs.pop(key, None)
        self._config_medians.pop(key, None)
        self._threshold.pop(key, None)
        self._residuals.pop(key, None)
        self._budgets.pop(key, None)
        self._gate.pop(key, None)
        for alias in ((key[0], key[1], None), key) if key[2] == 0 else (key,):
            self._fast.pop(alias, None)
        for bkey in [b for b in self._buckets if b[0] == key]:
            del self._buckets[bkey]
            self._published.pop(bkey, None)
        tally = self._tallies.get(key)
        if tally is not None:
            tally.reset_streak()
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
        ttft_ms, total_ms), e.g. the replay `calibrate` ran. Not counted as observations or
        violations. Returns the rows used. Without it the controller starts from the stored
        conformal factors alone and, if they are far too conservative, may admit nothing to learn from."""
        names = ("vision_tokens", "text_tokens", "output_tokens", "tier_idx", "top_k", "num_active_blocks",
                 "ttft_ms", "total_ms")
        cols = [log[n] if isinstance(log, Mapping) else getattr(log, n) for n in names]
        used = 0
        for v, t, n, tier, k, blocks, ttft, total in zip(*cols, strict=True):
            request = Request(int(v), int(t), int(n), int(tier), int(k), int(blocks) or None, None)
            try:
                self._observe(request, float(ttft), float(total), None, counted=False)
                used += 1
            except Exception:  # noqa: BLE001 - a bad row is skipped
                continue
        return used

    def _observe(self, request: object, ttft_ms: float, total_ms: float, output_tokens: int | None,
                 counted: bool = True) -> None:
        v, t, n, tier, k, blocks, raw_budget = _fields(request)
        if output_tokens is not None:
            n = _count("output_tokens", output_tokens)
            if n < 1:
                raise _Invalid("output_tokens must be >= 1")
        ttft, total = float(ttft_ms), float(total_ms)
        if not (math.isfinite(ttft) and math.isfinite(total) and 0 < ttft <= total):
            raise _Invalid("need finite 0 < ttft_ms <= total_ms")
        try:
            budget = _budget(raw_budget)
        except _Invalid:
            budget = math.inf
        p, d = self._split(v, t, n, tier, k, blocks)
        if not (math.isfinite(p) and p > 0 and math.isfinite(d) and d >= 0):
            raise _Invalid("no usable prediction")
        prefill_ratio = ttft / p
        decode_ratio = (total - ttft) / d if n >= 2 and d > 0 else None
        key = (tier, k, blocks or 0)
        bkey = (key, self._bucket_of(v + t + n))
        with self._lock:
            if counted:
                self._observations += 1
                if total > budget:
                    self._violations += 1
            pooled = self._configs.get(key)
            if pooled is None:
                if len(self._configs) + len(self._buckets) >= self.max_buckets:
                    self._untracked += 1
                    return
                pooled = self._configs[key] = _Bucket(self.window)
            before = self._config_medians.get(key)
            c_then = self._corrected(key, bkey[1], p, d)  # the correction this request was judged with
            pooled.prefill.append(prefill_ratio)
            if decode_ratio is not None:
                pooled.decode.append(decode_ratio)
            medians = _medians(pooled, self.min_observations)
            if medians is not None:
                self._config_medians[key] = medians
            # Length buckets learn only the shape: ratios relative to the config's medians as they
            # stood, so a global step change is followed at the speed of all traffic, not of the
            # bucket's share of it.
            if before is not None:
                bucket = self._buckets.get(bkey)
                if bucket is None and len(self._configs) + len(self._buckets) < self.max_buckets:
                    bucket = self._buckets[bkey] = _Bucket(self.bucket_window)
                if bucket is not None:
                    bucket.prefill.append(prefill_ratio / before[0])
                    if decode_ratio is not None:
                        bucket.decode.append(decode_ratio / before[1])
                    rel = _medians(bucket, self.min_observations)
                    if rel is not None:
                        self._published[bkey] = rel
            if self.residual_window and self.alpha is not None:
                history = self._residuals.get(key)
                if history is None:
                    history = self._residuals[key] = deque(maxlen=self.residual_window)
                    if key not in self._budgets:
                        self._budgets[key] = self._impl.Traffic(self.budget_window)
                history.append((total, p, d, bkey[1], c_then))
                if len(history) >= self.min_residuals:
                    self._threshold[key] = self._threshold_of(key, history, self.alpha)
            if key in self._configs:
                self._publish(key)

    def _threshold_of(self, key: tuple[int, int, int], history: deque[tuple[float, float, float, int, float]],
                      alpha: float) -> float:
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
        entries = tuple(history)
        recent = len(entries) - max(self.min_residuals, len(entries) // 2)
        scores = []
        for i, (total, p, d, b, c_then) in enumerate(entries):
            c_now = self._corrected(key, b, p, d)
            # An observation made under another regime (the correction has moved since by more than
            # regime_tolerance) says nothing about today's noise: drop it, but always keep the
            # most recent half (the window restarts after a step change, it never empties).
            if i >= recent or abs(c_now / c_then - 1.0) <= self.regime_tolerance:
                scores.append(total / ((p + d) * c_now))
        scores.sort()
        g_conformal = conformal_factor(scores, alpha)
        # tuple() copies in one C call under the GIL, so decide's lock-free appends cannot interleave.
        # Budget ratios are taken against the current correction too: a ratio stored with the
        # correction of its time would be stale right after a step change, when it matters most.
        ring = self._budgets.get(key)
        traffic = ring.snapshot() if ring is not None else []
        kernel = self._kernel
        row = kernel.lookup(key[0], key[1], key[2] or -1)
        budgets = []
        for b, prompt, n, k in traffic:
            p, d, raw = kernel.predict(row, float(prompt), float(n), 1.0)
            budgets.append(b / (raw * self._corrected(key, k, p, d)))
        budgets.sort(reverse=True)
        g = g_conformal
        if len(budgets) >= self.min_budgets:
            n = len(scores)
            total_s, count = 0.0, 0
            for u in budgets:
                total_s += (n - bisect.bisect_right(scores, u) + 1) / (n + 1)
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
            tallies = list(self._tallies.values())
            corrections: dict[str, Any] = {}
            for key, m in sorted(self._config_medians.items()):
                name = f"{key[0]},{key[1]},{key[2]}"
                corrections[name] = {"prefill": m[0], "decode": m[1], "n": len(self._configs[key].prefill)}
                for (k2, b), rel in sorted(self._published.items()):
                    if k2 == key:
                        corrections[f"{name}|{self._bucket_label(b)}"] = {
                            "prefill": m[0] * rel[0], "decode": m[1] * rel[1], "n": len(self._buckets[(k2, b)].prefill)}
            thresholds = {f"{k[0]},{k[1]},{k[2]}": {"threshold": g, "residuals": len(self._residuals[k]),
                                                     "budgets": len(self._budgets[k])}
                          for k, g in sorted(self._threshold.items())}
            return {
                "decisions": self._decisions + sum(t.decisions for t in tallies),
                "admits": self._admits + sum(t.admits for t in tallies),
                "rejects": self._rejects + sum(t.rejects for t in tallies),
                "invalid": self._invalid,
                "unjudged": self._unjudged,
                "policy_admits": self._policy_admits,
                "resets": self._resets,
                "probes": self._probes + sum(t.probes for t in tallies),
                "observations": self._observations,
                "ignored_observations": self._ignored_observations,
                "violations": self._violations,
                "untracked_observations": self._untracked,
                "buckets": len(self._configs) + len(self._buckets),
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
            self._buckets.clear()
            self._configs.clear()
            self._config_medians.clear()
            self._residuals.clear()
            self._published.clear()
            self._threshold.clear()
            self._budgets.clear()
            self._gate.clear()
            self._fast.clear()
            self._tallies.clear()
            self._resets = 0
            self._probes = 0
            for name in ("_decisions", "_admits", "_rejects", "_invalid", "_unjudged", "_policy_admits",
                         "_observations", "_ignored_observations", "_violations", "_untracked"):
                setattr(self, name, 0)
