"""Batched decode step cost T(B, X): the calibration's ``batch`` section as a function (pure Python).

Semantics (BATCH_CONTRACT.md, shared with the engine side): X = the KV tokens the engine reads in one
step, B * max(L) for a padded dense cache (``kv_read: padded``) or sum(L) for a packed one. Each measured
batch size b has a piecewise-linear curve T_b(X), linear between its knots and continuing its first / last
segment outside them. T(B, X) for B between two measured sizes is the linear interpolation in B of their
curves; above the largest size it extrapolates linearly from the last two sizes (flagged extrapolated).
Without a ``batch`` section T(1, X) is the single-request decode model T(L) with X = L (``section_from_decode``).

Written first by the serving side (it builds its tables from this); the engine side's version of the
same function wins at merge.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["batch_step_ms", "curve_ms", "kv_read_of", "section_from_decode", "step_with_flag"]


def curve_ms(knots_x: Sequence[float], values_ms: Sequence[float], x: float) -> float:
    """T_b(x): linear between knots, the first / last segment continued outside them (one knot: constant)."""
    if len(knots_x) == 1:
        return float(values_ms[0])
    i = bisect.bisect_right(knots_x, x) - 1
    i = min(max(i, 0), len(knots_x) - 2)
    x0, x1 = float(knots_x[i]), float(knots_x[i + 1])
    v0, v1 = float(values_ms[i]), float(values_ms[i + 1])
    return v0 + (v1 - v0) / (x1 - x0) * (x - x0)


def kv_read_of(section: Mapping[str, Any], kv_lens: Sequence[float]) -> float:
    """X: the KV tokens one step of this batch reads (padded: B * max L; packed: sum L)."""
    if not kv_lens:
        return 0.0
    if section.get("kv_read", "padded") == "packed":
        return float(sum(kv_lens))
    return float(len(kv_lens) * max(kv_lens))


def _bracket(sizes: Sequence[int], batch: int) -> tuple[int, int, float, bool]:
    """(index lo, index hi, weight of hi, extrapolated) of batch size ``batch`` among the measured sizes."""
    if len(sizes) == 1:
        return 0, 0, 0.0, batch != sizes[0]
    if batch >= sizes[-1]:
        lo = len(sizes) - 2
    else:
        lo = max(0, bisect.bisect_right(sizes, batch) - 1)
        lo = min(lo, len(sizes) - 2)
    hi = lo + 1
    w = (batch - sizes[lo]) / (sizes[hi] - sizes[lo])
    return lo, hi, w, batch > sizes[-1] or batch < sizes[0]


def step_with_flag(section: Mapping[str, Any], kv_lens: Sequence[float]) -> tuple[float, bool]:
    """(T(B, X) in ms, extrapolated) for one decode step of a batch with these KV lengths."""
    sizes = [int(s) for s in section["sizes"]]
    curves = section["curves"]
    b = len(kv_lens)
    x = kv_read_of(section, kv_lens)
    lo, hi, w, extrapolated = _bracket(sizes, b)
    t_lo = curve_ms(curves[lo]["knots_x"], curves[lo]["values_ms"], x)
    t = t_lo if hi == lo else t_lo + w * (curve_ms(curves[hi]["knots_x"], curves[hi]["values_ms"], x) - t_lo)
    valid = section.get("valid_x")
    if valid is not None and not (float(valid[0]) <= x <= float(valid[1])):
        extrapolated = True
    return t, extrapolated


def batch_step_ms(section: Mapping[str, Any], kv_lens: Sequence[float]) -> float:
    """T(B, X) in ms for one decode step of B = len(kv_lens) requests with these past KV lengths."""
    return step_with_flag(section, kv_lens)[0]


def section_from_decode(knots: Sequence[float], values_ms: Sequence[float],
                        valid_past_len: Sequence[float] | None = None) -> dict[str, Any]:
    """A ``batch`` section holding only B = 1: the single-request decode model T(L) as T_1(X), X = L.

    The decode model is constant below its first knot (the kernels' piece 0): a knot at 0 with the first
    value keeps that; above the last knot both continue the last segment. Larger batches are then
    extrapolated (T(B, X) = T_1(X), flagged); kv_read is packed (X = sum L)."""
    xs = [float(k) for k in knots]
    vs = [float(v) for v in values_ms]
    if xs[0] > 0.0:
        xs.insert(0, 0.0)
        vs.insert(0, vs[0])
    if len(xs) == 1:
        xs.append(xs[0] + 1.0)
        vs.append(vs[0])
    out: dict[str, Any] = {"kv_read": "packed", "prefill_with_batch": "separate", "sizes": [1],
                           "curves": [{"batch": 1, "knots_x": xs, "values_ms": vs}]}
    if valid_past_len is not None:
        out["valid_x"] = [float(valid_past_len[0]), float(valid_past_len[1])]
    return out
