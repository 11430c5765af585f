"""Batch-aware admission, pure Python: the readable statement of what serving/_batch.pyx computes.

State (one config): the running requests' current KV lengths L_i (the past length of their next decode
step), decode steps still allowed r_i (max_new_tokens left) and deadlines (ms, on the caller's clock);
a newcomer with prompt P, max new tokens n and a budget (ms from now).

Timeline from now (the engine separates prefill and decode, ``prefill_with_batch: separate``): admitting
the newcomer first runs its prefill, prefill(P) = max(a + b P + c P^2, 0) from the config's prefill
coefficients, which stalls every running request by that long and gives the newcomer its first token;
then it joins the batch with L = P and r = n - 1. Every decode step emits one token per running request
and grows each L by one; a request leaves when its r reaches 0. Sorted by r, the batch is constant between
two completions, and during such a segment (steps j0 .. j1-1 from now) a step reads X(j) = X0 + B j KV
tokens: padded X0 = B max L, packed X0 = sum L over the segment's requests. Each measured T_b(X) is linear
between knots, so its sum over the segment is closed form per piece the progression crosses:
count * (v + slope (X0 - start)) + slope * B * sum(j); T(B, X) interpolates those sums in B (the
contract's semantics, estimator/batch_model.py). O(B log B) to sort (the controller keeps the batch
sorted: the order by r never changes as tokens are emitted, so a decision is O(B)), plus a bisect over a
curve's knots per segment and the pieces it crosses.

Decision (factor f = the conformal factor for alpha, applied to every predicted duration): admit iff the
newcomer's f * (prefill + decode sum until its r steps are done) <= budget, and (policy ``protect``) no
running request is pushed: f * finish_with > deadline while c * finish_without <= deadline, where c (``center``,
default 1: the raw model) is the model's expected bias, the controller's median score of the batch-size bucket.
A running request is given up only when, at its expected pace, it is late anyway; one the quantile factor
sees at risk is still protected. Why c and not 1: a server whose per-step cost is 4-5x the engine model's
(Python loop, streaming, the GIL) had every request that ran late protected by the raw model, so each one
blocked every newcomer until it finished. ``max_new_tokens``
is the largest n (<= the requested one) for which that holds (binary search: every finish time is
non-decreasing in n). The compiled module is property-tested equal to this one (tests/test_serving_batch.py).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from trt_latency.ext.layout import P_SLOPE, P_START, P_VALUE, PCOL, TOKEN_MAX

__all__ = ["BATCH_POLICIES", "BATCH_REASONS", "BatchDecision", "BatchTables", "PROBE_REASON", "Prepared", "build_batch_tables", "decide", "decide_prepared", "judge", "prepare",
           "finish_times", "probe_due", "segment_sum", "sort_running"]

BATCH_POLICIES = ("protect", "ignore-running")
# Batch decision codes: status * 2 + extrapolated
BST_FITS, BST_FEWER, BST_NONE, BST_PUSHES = 0, 1, 2, 3
BATCH_REASONS = (
    "fits the budget with the running batch",
    "over budget for the requested tokens with the running batch; max_new_tokens is what fits",
    "over budget even for one token with the running batch (prefill + wait)",
    "would push a running request past its deadline; max_new_tokens is what keeps everyone on time",
)
BAD_REQUEST = 8  # code: a malformed newcomer or running state (reason in the decision)
PROBE_REASON = ("admitted as a probe: the batch is empty, nothing was admitted for the probe interval, and it fits "
                "the unscaled prediction (factor 1): only the online factor rejected it")


def probe_due(running: int, factor: float, now: float, last_admit: float, interval: float) -> bool:
    """Whether a request the factor rejected is re-decided at factor 1 as a probe (BatchAdmissionController:
    an online factor learns only from admitted requests, so one that rejects everything would never move).
    Only into an empty batch (no running request can be pushed), only when the factor is above 1 (else the
    probe is no more permissive), and at most one admission per ``interval`` ms (the time since the last
    admission of any kind, so a controller that keeps admitting never probes)."""
    return running == 0 and factor > 1.0 and interval < math.inf and now - last_admit >= interval


class BatchDecision(NamedTuple):
    admit: bool
    max_new_tokens: int
    predicted_ms: float  # the newcomer's predicted total (times the factor)
    code: int  # status * 2 + extrapolated, or BAD_REQUEST
    pushed: int  # running requests the requested tokens would push past their deadline
    reason: str

    @property
    def extrapolated(self) -> bool:
        return self.code != BAD_REQUEST and bool(self.code & 1)


class BatchTables(NamedTuple):
    """Flat tables of one config's batch model (the compiled module takes the same arrays)."""

    sizes: list[float]  # measured batch sizes, ascending
    curve_off: list[int]  # [n_sizes + n_blend + 1] offsets into pieces: the measured curves, then blended ones
    pieces: list[float]  # [n_pieces * PCOL]: start, value at start, slope, unused (ext/layout's piece layout)
    packed: bool  # X = sum L (else B * max L)
    valid_lo: float
    valid_hi: float
    prefill: tuple[float, float, float]  # a, b, c of the prefill model (ms), serving-loop terms folded in
    n_blend: int = 0  # curves n_sizes + B - 1 (B = 1 .. n_blend): T(B, X) for that integer B, precomputed
    loop: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)  # (o, c0, c1, o_p, o_p1) folded in


def _curve_at(xs: Sequence[float], vs: Sequence[float], x: float) -> float:
    if len(xs) == 1:
        return vs[0]
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    return vs[i] + (vs[i + 1] - vs[i]) / (xs[i + 1] - xs[i]) * (x - xs[i])


def _blend(curves: Sequence[tuple[list[float], list[float]]], sizes: Sequence[float],
           batch: float) -> tuple[list[float], list[float]]:
    """T(batch, X) as one piecewise-linear curve: both bracketing curves are linear between the union
    of their knots, so their interpolation in B is exactly linear there too (and outside, continued)."""
    if len(sizes) == 1:
        return curves[0]
    lo = 0
    while lo + 2 < len(sizes) and sizes[lo + 1] <= batch:
        lo += 1
    w = (batch - sizes[lo]) / (sizes[lo + 1] - sizes[lo])
    (xa, va), (xb, vb) = curves[lo], curves[lo + 1]
    xs = sorted(set(xa) | set(xb))
    if len(xs) == 1:
        xs = [xs[0], xs[0] + 1.0]
    vals = []
    for x in xs:
        ta = _curve_at(xa, va, x)
        vals.append(ta + w * (_curve_at(xb, vb, x) - ta))
    return xs, vals


def build_batch_tables(section: Mapping[str, Any], prefill_coeffs: Sequence[float],
                       blend_up_to: int = 256, loop: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.0)) -> BatchTables:
    """Tables from a calibration ``batch`` section (see estimator/batch_model.py) and the prefill
    coefficients; T(B, X) precomputed as one curve per integer B up to ``blend_up_to`` (one closed-form
    sum per segment instead of two, the same values up to rounding).

    ``loop`` = (o, c0, c1, o_p, o_p1), the serving loop's own cost around the engine call (the calibration's
    ``serving_loop``, estimator/calibration.py; zeros: the engine alone). Folded into the tables at build
    time, so the decision's arithmetic (and the compiled kernel) is unchanged and costs nothing more:
    o shifts every piece's value (each decode step of the batch costs T(B, X) + o); o_p + c(P), with
    c(P) = c0 + c1 P the first decode step's transient after a prefill and o_p(P) = o_p + o_p1 P the TTFT
    side's, shift the prefill coefficients (a += o_p + c0, b += c1 + o_p1): like the prefill itself they
    stall every running request once, and the newcomer's first token waits for o_p(P) only (``ttft_ms``; c
    comes after it). A newcomer with n = 1 never
    takes that first step, so its c is over-counted (conservative, ~1 ms)."""
    sizes = [float(s) for s in section["sizes"]]
    measured = [([float(x) for x in c["knots_x"]], [float(v) for v in c["values_ms"]]) for c in section["curves"]]
    if len(measured) != len(sizes):
        raise ValueError("batch section: one curve per size")
    n_blend = max(0, int(blend_up_to))
    o, c0, c1, o_p, o_p1 = (float(v) for v in loop)
    if not all(math.isfinite(v) and v >= 0.0 for v in (o, c0, c1, o_p, o_p1)):
        raise ValueError("serving-loop terms (o, c0, c1, o_p, o_p1): expected finite numbers >= 0, got "
                         f"{tuple(loop)}")
    offs = [0]
    pieces: list[float] = []
    for xs, vs in measured + [_blend(measured, sizes, float(b)) for b in range(1, n_blend + 1)]:
        if len(xs) == 1:
            pieces += [xs[0], vs[0] + o, 0.0, 0.0]
        for i in range(len(xs) - 1):
            slope = (vs[i + 1] - vs[i]) / (xs[i + 1] - xs[i])
            # piece 0 also covers X below the first knot (the first segment continued): its value is
            # still taken at the first knot, so the arithmetic is v + slope (X - start) everywhere.
            pieces += [xs[i], vs[i] + o, slope, 0.0]
        offs.append(len(pieces) // PCOL)
    valid = section.get("valid_x") or [-math.inf, math.inf]
    a, b, c = (float(v) for v in prefill_coeffs)
    return BatchTables(sizes, offs, pieces, section.get("kv_read", "padded") == "packed",
                       float(valid[0]), float(valid[1]), (a + o_p + c0, b + c1 + o_p1, c), n_blend,
                       (o, c0, c1, o_p, o_p1))


def _bisect(pieces: Sequence[float], off: int, cnt: int, x: float) -> int:
    """Last piece (index from off) whose start <= x, at least 0 (the math core's _bisect, clamped)."""
    i = -1
    for j in range(cnt):
        if pieces[(off + j) * PCOL + P_START] <= x:
            i = j
    return i if i > 0 else 0


def segment_sum(t: BatchTables, curve: int, x0: float, s: float, j0: float, j1: float) -> float:
    """sum_{j=j0}^{j1-1} T_curve(x0 + s j): closed form per piece the progression crosses."""
    off = t.curve_off[curve]
    cnt = t.curve_off[curve + 1] - off
    p = t.pieces
    total = 0.0
    j = j0
    i = _bisect(p, off, cnt, x0 + s * j0)
    if i + 1 >= cnt or x0 + s * (j1 - 1.0) < p[(off + i + 1) * PCOL + P_START]:  # one piece: no crossing
        row = (off + i) * PCOL
        slope = p[row + P_SLOPE]
        k = j1 - j0
        return k * (p[row + P_VALUE] + slope * (x0 - p[row + P_START])) + slope * s * ((j0 + j1 - 1.0) * k * 0.5)
    while j < j1:
        if i + 1 < cnt:
            je = float(math.ceil((p[(off + i + 1) * PCOL + P_START] - x0) / s))
            if je > j1:
                je = j1
            if je < j:
                je = j
        else:
            je = j1
        k = je - j
        if k > 0.0:
            row = (off + i) * PCOL
            slope = p[row + P_SLOPE]
            total += k * (p[row + P_VALUE] + slope * (x0 - p[row + P_START])) + slope * s * ((j + je - 1.0) * k * 0.5)
        j = je
        i += 1
    return total


def _batch_sum(t: BatchTables, batch: float, x0: float, j0: float, j1: float) -> float:
    """sum over steps j0 .. j1-1 of T(batch, x0 + batch j): the per-size sums interpolated in B."""
    sizes = t.sizes
    n = len(sizes)
    if batch <= t.n_blend:
        return segment_sum(t, n + int(batch) - 1, x0, batch, j0, j1)
    if n == 1:
        return segment_sum(t, 0, x0, batch, j0, j1)
    lo = 0
    while lo + 2 < n and sizes[lo + 1] <= batch:
        lo += 1
    w = (batch - sizes[lo]) / (sizes[lo + 1] - sizes[lo])
    s_lo = segment_sum(t, lo, x0, batch, j0, j1)
    return s_lo + w * (segment_sum(t, lo + 1, x0, batch, j0, j1) - s_lo)


class Prepared(NamedTuple):
    """What a decision needs of the running batch alone (cached by the controller until its next event):
    per sorted index k the suffix aggregate of L over k.. (max: padded, sum: packed) and the finish time
    without a newcomer."""

    agg: list[float]
    without: list[float]
    extrapolated: bool


def prepare(t: BatchTables, kv: Sequence[float], left: Sequence[float]) -> Prepared:
    """Finish times of a batch sorted by ``left`` ascending (ms from the first decode step), with the
    suffix aggregates of L, and whether any step left the measured range (batch size or X)."""
    m = len(kv)
    agg = [0.0] * m
    a = 0.0
    for k in range(m - 1, -1, -1):
        if t.packed:
            a = a + kv[k]
        else:
            a = kv[k] if kv[k] > a else a
        agg[k] = a
    out = [0.0] * m
    now = 0.0
    jprev = 0.0
    extrapolated = False
    top = t.sizes[-1]
    for k in range(m):
        if left[k] > jprev:
            batch = float(m - k)
            x0 = agg[k] if t.packed else batch * agg[k]
            now += _batch_sum(t, batch, x0, jprev, left[k])
            if batch > top or x0 + batch * jprev < t.valid_lo or x0 + batch * (left[k] - 1.0) > t.valid_hi:
                extrapolated = True
            jprev = left[k]
        out[k] = now
    return Prepared(agg, out, extrapolated)


def finish_times(t: BatchTables, kv: Sequence[float], left: Sequence[float]) -> tuple[list[float], bool]:
    p = prepare(t, kv, left)
    return p.without, p.extrapolated


def prefill_ms(t: BatchTables, prompt: float) -> float:
    a, b, c = t.prefill
    x = a + prompt * (b + c * prompt)
    return x if x > 0.0 else 0.0


def ttft_ms(t: BatchTables, prompt: float) -> float:
    """The newcomer's first token: its prefill plus o_p, without the first step's c(P) that the stall holds."""
    c0, c1 = t.loop[1], t.loop[2]
    x = prefill_ms(t, prompt) - (c0 + c1 * prompt)
    return x if x > 0.0 else 0.0


def judge(t: BatchTables, left: Sequence[float], slack: Sequence[float], prep: Prepared, prompt: float,
          n: float, factor: float, protect: bool, center: float = 1.0) -> tuple[float, int, bool]:
    """(newcomer's predicted total * factor, running requests pushed past their deadline, extrapolated).

    The newcomer (L = prompt, r = n - 1 steps after its prefill) sits at pos = bisect_right(left, r). Up to
    its completion the batch holds it too: pos + 1 segments with B + 1 requests and X0 including its L.
    After it, the batch and every segment are the ones without it, so a running request k >= pos finishes
    at without[k] + (stall + newcomer's finish - W), W = the without-batch's time at step r: no second
    simulation."""
    agg, without, _ = prep
    m = len(left)
    r = n - 1.0
    stall = prefill_ms(t, prompt)
    pos = bisect_right(left, r)
    top = t.sizes[-1]
    now = 0.0
    jprev = 0.0
    ext = False
    pushed = 0
    for k in range(pos + 1):
        end = left[k] if k < pos else r
        if end > jprev:
            batch = float(m - k + 1)
            a = agg[k] if k < m else 0.0
            if t.packed:
                x0 = a + prompt
            else:
                x0 = batch * (a if a > prompt else prompt)
            now += _batch_sum(t, batch, x0, jprev, end)
            if batch > top or x0 + batch * jprev < t.valid_lo or x0 + batch * (end - 1.0) > t.valid_hi:
                ext = True
            jprev = end
        if k < pos and protect:
            w = (stall + now) * factor
            if w > slack[k] and without[k] * center <= slack[k]:
                pushed += 1
    pred = (stall + now) * factor
    if protect and pos < m:
        j0 = left[pos - 1] if pos > 0 else 0.0
        base = without[pos - 1] if pos > 0 else 0.0
        if r > j0:
            batch = float(m - pos)
            x0 = agg[pos] if t.packed else batch * agg[pos]
            base = base + _batch_sum(t, batch, x0, j0, r)
        shift = stall + now - base
        for k in range(pos, m):
            w = (without[k] + shift) * factor
            if w > slack[k] and without[k] * center <= slack[k]:
                pushed += 1
    return pred, pushed, ext


def sort_running(kv: Sequence[float], left: Sequence[float],
                 deadline: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
    """The running state sorted by tokens left (stable), as decide needs it."""
    order = sorted(range(len(left)), key=lambda i: left[i])
    return [float(kv[i]) for i in order], [float(left[i]) for i in order], [float(deadline[i]) for i in order]


def _fits(pred: float, pushed: int, budget: float) -> bool:
    return pred <= budget and pushed == 0


def decide_prepared(t: BatchTables, left: Sequence[float], deadline: Sequence[float], prep: Prepared, now: float,
                    prompt: float, max_new: int, budget: float, factor: float = 1.0, protect: bool = True,
                    want_fit: bool = True, center: float = 1.0) -> BatchDecision:
    """decide, given the batch's Prepared (the controller caches it between events)."""
    m = len(left)
    slack = [deadline[k] - now for k in range(m)]
    pred, pushed, ext = judge(t, left, slack, prep, prompt, float(max_new), factor, protect, center)
    ext = ext or prep.extrapolated or m + 1 > t.sizes[-1]
    if _fits(pred, pushed, budget):
        return BatchDecision(True, max_new, pred, BST_FITS * 2 + ext, 0, BATCH_REASONS[BST_FITS])
    nfit = _nfit(t, left, slack, prep, prompt, max_new, budget, factor, protect, center) if want_fit else 0
    if pred > budget:
        status = BST_FEWER if nfit >= 1 else BST_NONE
    else:
        status = BST_PUSHES
    return BatchDecision(False, nfit, pred, status * 2 + ext, pushed, BATCH_REASONS[status])


def decide(t: BatchTables, kv: Sequence[float], left: Sequence[float], deadline: Sequence[float], now: float,
           prompt: float, max_new: int, budget: float, factor: float = 1.0, protect: bool = True,
           want_fit: bool = True, center: float = 1.0) -> BatchDecision:
    """Admit the newcomer into the running batch? ``kv``, ``left``, ``deadline`` sorted by ``left``
    ascending (``sort_running``); deadlines on the clock of ``now`` (slack = deadline - now)."""
    return decide_prepared(t, left, deadline, prepare(t, kv, left), now, prompt, max_new, budget, factor, protect,
                           want_fit, center)


def _nfit(t: BatchTables, left: Sequence[float], slack: Sequence[float], prep: Prepared, prompt: float, hi: int,
          budget: float, factor: float, protect: bool, center: float = 1.0) -> int:
    """Largest n in [1, hi) that fits (hi is known not to), else 0: bisection."""
    pred, pushed, _ = judge(t, left, slack, prep, prompt, 1.0, factor, protect, center)
    if not _fits(pred, pushed, budget):
        return 0
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        pred, pushed, _ = judge(t, left, slack, prep, prompt, float(mid), factor, protect, center)
        if _fits(pred, pushed, budget):
            lo = mid
        else:
            hi = mid
    return lo


def max_new_tokens(t: BatchTables, kv: Sequence[float], left: Sequence[float], deadline: Sequence[float],
                   now: float, prompt: float, budget: float, factor: float = 1.0, protect: bool = True,
                   cap: int = TOKEN_MAX) -> int:
    """The largest max_new_tokens (<= cap) the newcomer may ask for and still be admitted."""
    return decide(t, kv, left, deadline, now, prompt, cap, budget, factor, protect).max_new_tokens
