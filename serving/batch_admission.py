"""Batch-aware admission: BatchEstimator (predict / admit / max_new_tokens given the running batch) and
BatchAdmissionController (tracks one engine's batch through events; thread-safe; online correction).

Why a BatchEstimator built from an Estimator rather than new Estimator methods: the Estimator is a pure
function of the calibration over immutable single-request tables (estimator/ never imports serving/);
the batch kernel (serving/_batch.pyx, reference serving/batch_reference.py) is serving-side, and a batch
question needs the running state, which the Estimator does not hold. ``BatchEstimator.from_estimator``
picks one config, builds its batch tables from the calibration's ``batch`` section (or, without one, from
the single-request decode model as B = 1, larger batches flagged extrapolated) and the config's prefill
coefficients, and answers with the compiled kernel when built (pure-Python reference otherwise, or with
TRT_LATENCY_PUREPYTHON=1).

Safety factor for ``alpha``: the batch section's ``conformal: {alphas, factors}`` (fitted by ``loadtest
--max-batch`` on a replay of batched traffic, see serving/batchload.py) when present, else 1.0 (and the
decision says so through ``factor_source``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from trt_latency.estimator.batch_model import section_from_decode
from trt_latency.ext.layout import TOKEN_MAX
from trt_latency.serving import batch_reference as ref
from trt_latency.serving.batch_reference import BAD_REQUEST, BATCH_POLICIES, BatchDecision, BatchTables

try:  # the compiled batch kernel; without it the pure-Python reference decides
    from trt_latency.serving import _batch
except ImportError:  # pragma: no cover - depends on the build
    _batch = None  # type: ignore[assignment]

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
    return os.environ.get("TRT_LATENCY_PUREPYTHON") == "1" or _batch is None


class BatchEstimator:
    """Predict / admit / max_new_tokens for one config given the running batch."""

    def __init__(self, section: Mapping[str, Any], prefill_coeffs: Sequence[float],
                 pure_python: bool | None = None) -> None:
        self.section = dict(section)
        self.tables: BatchTables = ref.build_batch_tables(section, prefill_coeffs)
        self.pure_python = _pure() if pure_python is None else pure_python
        self._kernel = None if self.pure_python else _batch.BatchKernel(self.tables)
        conf = self.section.get("conformal") or {}
        self._conformal = sorted(zip(conf.get("alphas", []), conf.get("factors", []), strict=False))

    @classmethod
    def from_estimator(cls, estimator: Any, tier_idx: int = 0, top_k: int = 1,
                       num_active_blocks: int | None = None, pure_python: bool | None = None) -> BatchEstimator:
        key = estimator.config_key(tier_idx, top_k, num_active_blocks)
        cfg = estimator.calibration.config(*key)
        return cls(batch_section_of(cfg), cfg.prefill_coeffs, pure_python)

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
        return ref.prefill_ms(self.tables, float(prompt))

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
                      budget: float, factor: float = 1.0, protect: bool = True, want_fit: bool = True) -> BatchDecision:
        """The kernel call on a state already sorted by tokens left (float64 arrays)."""
        if self._kernel is not None:
            return self._kernel.decide(kv, left, deadline, now, float(prompt), int(max_new), budget, factor, protect,  # type: ignore[no-any-return]
                                       want_fit)
        return ref.decide(self.tables, kv, left, deadline, now, float(prompt), int(max_new), budget, factor, protect,
                          want_fit)

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
        return {"ttft_ms": stall, "total_ms": stall + with_all[-1],
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
    (KV lengths, tokens left, absolute deadlines) is kept sorted by tokens left in float64 arrays, so a
    decision is one kernel call over views (the order by tokens left never changes with a step).
    Online correction per (config, batch-size bucket): the median of actual / predicted of finished
    requests, by the batch size they were admitted into (window ``window``, at least ``min_observations``),
    clamped to ``clamp``, multiplies the alpha factor. One lock guards the state; decide holds it for the
    one kernel call."""

    def __init__(self, estimator: BatchEstimator, alpha: float | None = 0.05, policy: str = "protect",
                 max_batch: int = 64, window: int = 32, min_observations: int = 8,
                 clamp: tuple[float, float] = (0.5, 4.0), clock: Any = None) -> None:
        if policy not in BATCH_POLICIES:
            raise ValueError(f"policy must be one of {BATCH_POLICIES}, got {policy!r}")
        self.estimator = estimator
        self.alpha = alpha
        self.policy = policy
        self.protect = policy == "protect"
        self.max_batch = int(max_batch)
        self.base_factor, self.factor_source = estimator.factor(alpha)
        self._clock = clock or (lambda: time.perf_counter() * 1e3)
        self._lock = threading.Lock()
        cap = max(1, self.max_batch) + 1
        self._kv = np.zeros(cap, dtype=np.float64)
        self._left = np.zeros(cap, dtype=np.float64)
        self._dl = np.zeros(cap, dtype=np.float64)
        # its own compiled kernel (bound to this controller's buffers), when the estimator has one
        self._kernel = None if estimator._kernel is None else _batch.BatchKernel(estimator.tables)
        self._bind()
        self._ids: list[Any] = []
        self._m = 0
        self._dirty = False
        self._admitted_batch: dict[Any, int] = {}
        self._windows: dict[int, deque[float]] = {}
        self._correction: dict[int, float] = {}
        self._window = window
        self._min_obs = min_observations
        self._clamp = clamp
        self._counts = [0, 0, 0]  # decisions, admits, rejects

    @classmethod
    def from_section(cls, section: Mapping[str, Any], prefill_coeffs: Sequence[float], **kw: Any) -> BatchAdmissionController:
        return cls(BatchEstimator(section, prefill_coeffs), **kw)

    # ----------------------------------------------------------------- events
    def _bind(self) -> None:
        if self._kernel is not None:  # the compiled kernel reads the state buffers in place
            self._kernel.bind(self._kv, self._left, self._dl)

    def _grow(self) -> None:
        for name in ("_kv", "_left", "_dl"):
            old = getattr(self, name)
            new = np.zeros(old.size * 2, dtype=np.float64)
            new[:old.size] = old
            setattr(self, name, new)
        self._bind()

    def started(self, rid: Any, prompt: int, max_new_tokens: int, budget_ms: float, now: float | None = None) -> None:
        """The request's prefill is done (first token out): it joins the batch with max_new_tokens - 1 steps left."""
        t = self._clock() if now is None else now
        with self._lock:
            if self._m + 1 >= self._kv.size:
                self._grow()
            left = float(max_new_tokens - 1)
            m = self._m
            pos = int(np.searchsorted(self._left[:m], left, side="right")) if not self._dirty else m
            for arr, v in ((self._kv, float(prompt)), (self._left, left), (self._dl, t + float(budget_ms))):
                arr[pos + 1:m + 1] = arr[pos:m].copy()
                arr[pos] = v
            self._ids.insert(pos, rid)
            self._m = m + 1
            self._admitted_batch.setdefault(rid, m + 1)

    def _index(self, rid: Any) -> int:
        try:
            return self._ids.index(rid)
        except ValueError:
            return -1

    def token(self, rid: Any) -> None:
        """One token of ``rid`` emitted (one decode step it took)."""
        with self._lock:
            i = self._index(rid)
            if i < 0:
                return
            self._kv[i] += 1.0
            self._left[i] -= 1.0
            self._dirty = True

    def step(self) -> None:
        """Every running request emitted one token (one batched decode step): the order is unchanged."""
        with self._lock:
            m = self._m
            self._kv[:m] += 1.0
            self._left[:m] -= 1.0

    def finished(self, rid: Any, actual_ms: float | None = None, predicted_ms: float | None = None) -> None:
        """The request left the batch; with actual and predicted totals it feeds the correction."""
        with self._lock:
            i = self._index(rid)
            if i >= 0:
                m = self._m
                for arr in (self._kv, self._left, self._dl):
                    arr[i:m - 1] = arr[i + 1:m].copy()
                del self._ids[i]
                self._m = m - 1
            batch = self._admitted_batch.pop(rid, None)
            if batch is None or actual_ms is None or not predicted_ms or not math.isfinite(actual_ms):
                return
            b = batch_bucket(batch)
            w = self._windows.get(b)
            if w is None:
                w = self._windows[b] = deque(maxlen=self._window)
            w.append(float(actual_ms) / float(predicted_ms))
            if len(w) >= self._min_obs:
                med = float(np.median(w))
                self._correction[b] = min(max(med, self._clamp[0]), self._clamp[1])

    def _resort(self) -> None:
        m = self._m
        order = np.argsort(self._left[:m], kind="stable")
        for arr in (self._kv, self._left, self._dl):
            arr[:m] = arr[:m][order]
        self._ids = [self._ids[i] for i in order]
        self._dirty = False

    # ----------------------------------------------------------------- decisions
    def correction(self, batch: int) -> float:
        return self._correction.get(batch_bucket(batch), 1.0)

    def running(self) -> int:
        return self._m

    def decide(self, rid: Any, prompt: int, max_new_tokens: int, budget_ms: float, now: float | None = None,
               want_fit: bool = False) -> BatchDecision:
        """Admit request ``rid`` (prompt tokens, max_new_tokens, budget in ms from now) into the batch now?
        A full batch (max_batch running) rejects. Never raises for bad fields."""
        if (type(prompt) is not int or type(max_new_tokens) is not int or not 1 <= prompt <= TOKEN_MAX
                or not 1 <= max_new_tokens <= TOKEN_MAX or not isinstance(budget_ms, float | int)
                or not budget_ms >= 0):
            with self._lock:
                self._counts[0] += 1
                self._counts[2] += 1
            return BatchDecision(False, 0, math.nan, BAD_REQUEST, 0,
                                 "bad request: prompt and max_new_tokens integers >= 1, budget_ms a number >= 0")
        t = self._clock() if now is None else now
        with self._lock:
            if self._dirty:
                self._resort()
            m = self._m
            self._counts[0] += 1
            if m >= self.max_batch:
                self._counts[2] += 1
                return BatchDecision(False, 0, math.nan, ref.BST_NONE * 2, 0, "batch full (max_batch running)")
            factor = self.base_factor * self._correction.get(batch_bucket(m + 1), 1.0)
            if self._kernel is not None:
                d = self._kernel.decide_bound(m, t, prompt, max_new_tokens, budget_ms, factor, self.protect, want_fit)
            else:
                d = self.estimator.decide_sorted(self._kv[:m], self._left[:m], self._dl[:m], t, prompt,
                                                 max_new_tokens, float(budget_ms), factor, self.protect, want_fit)
            self._counts[1 if d.admit else 2] += 1
        return d

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {"decisions": self._counts[0], "admits": self._counts[1], "rejects": self._counts[2],
                    "running": self._m, "factor": self.base_factor, "factor_source": self.factor_source,
                    "correction_by_batch_bucket": {f"<={1 << b}": v for b, v in sorted(self._correction.items())}}
