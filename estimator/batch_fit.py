"""Batched decode rows of samples.csv -> a config's ``batch`` section (calibration.yaml schema 2).

Per measured batch size B > 1: a monotone piecewise-linear T_B(X) over the uniform batches' per-X
medians, X = the KV the engine reads (B * max L "padded", sum L "packed"), knots chosen by
leave-one-position-out CV exactly like the single-request decode fit (estimator/fit.fit_decode).
B = 1 is the config's own decode model T(L) (X = L), so single-request predictions are unchanged.

Held-out errors stored in ``fit_error`` (relative, |predicted / measured median - 1|):

- lopo: leave one position out inside each size's curve;
- lobo: leave one batch size out, predict its uniform medians from the remaining sizes by the contract's
  interpolation rule (the largest size: extrapolated from the two below it; lobo_interpolated: only the
  sizes between two others);
- ragged: the ragged batches (never used by the fit) against T(B, X) of their own X.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from trt_latency.estimator.batch_model import batch_step_ms, section_from_decode
from trt_latency.stats import drift_adjusted


def _medians(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq.astype(np.float64), np.array([float(np.median(values[inverse == i])) for i in range(uniq.size)])


def _curve(x: np.ndarray, y: np.ndarray, max_knots: int = 6) -> tuple[list[float], list[float], np.ndarray]:
    """Monotone piecewise-linear fit whose knot count minimises the leave-one-position-out error.

    Unlike the single-request fit (fit_decode keeps the fewest knots within one standard error of the
    best), the batched curves take the best CV score outright: their step where the KV read leaves the
    CPU cache is sharp, and the one-SE rule on a handful of noisy positions flattens it to one line."""
    from trt_latency.estimator.fit import fit_monotone_pwl, greedy_knots, loo_knot_errors

    n = x.size
    if n == 1:
        return [float(x[0])], [float(y[0])], np.full(1, np.nan)
    if n <= 3:
        knots = x.astype(np.float64)
        return [float(v) for v in knots], [float(v) for v in fit_monotone_pwl(x, y, knots)], np.full(n, np.nan)
    errs, scores = loo_knot_errors(x, y, min(max_knots, n - 1))
    best = min(scores, key=lambda k: scores[k])
    knots = greedy_knots(x, y, best)[-1]
    return [float(v) for v in knots], [float(v) for v in fit_monotone_pwl(x, y, knots)], errs[best]


def _predict(section: Mapping[str, Any], batch: int, x: float) -> float:
    # Rows of equal length with the same X: T(B, X) depends on the batch only through B and X.
    return batch_step_ms(section, [x / batch] * batch)


def _stats(errs: list[float], prefix: str) -> dict[str, float | None]:
    a = np.abs(np.asarray([e for e in errs if np.isfinite(e)], dtype=np.float64))
    return {f"{prefix}_median_rel": float(np.median(a)) if a.size else None,
            f"{prefix}_max_rel": float(np.max(a)) if a.size else None}


def batch_rows(samples: Any, key: tuple[int, int, int]) -> np.ndarray:
    """Mask of the config's batched decode rows (batch > 1, one new token per row)."""
    tier, top_k, blocks = key
    return ((samples.tier_idx == tier) & (samples.top_k == top_k) & (samples.num_active_blocks == blocks)
            & (samples.batch > 1) & (samples.phase == "decode") & (samples.new_tokens == 1))


def guess_kv_read(samples: Any, mask: np.ndarray) -> str:
    """Without the runner's word: a shared buffer is GroupQueryAttention's, which reads each row's length."""
    modes = {m for m, keep in zip(samples.kv_mode, mask, strict=True) if keep}
    return "packed" if modes == {"shared"} else "padded"


def fit_batch_section(samples: Any, cfg: Any, kv_read: str | None = None) -> dict[str, Any] | None:
    """The batch section of config ``cfg`` (a ConfigCalibration with its decode fit), or None without rows."""
    m = batch_rows(samples, cfg.key)
    if not m.any():
        return None
    read = kv_read or guess_kv_read(samples, m)
    b = samples.batch[m].astype(np.int64)
    kv_max = np.asarray(samples.kv_max)[m].astype(np.float64)
    kv_total = np.asarray(samples.kv_total)[m].astype(np.float64)
    # Medians with the machine's drift divided out, as the single-request fit's (every shape once a round).
    shape_id = np.unique(np.stack([b, kv_max, kv_total], axis=1), axis=0, return_inverse=True)[1].reshape(-1)
    lat, _ = drift_adjusted(shape_id, samples.latency_ms[m], int(shape_id.max()) + 1)
    x = b * kv_max if read == "padded" else kv_total
    uniform = kv_total == b * kv_max
    base = section_from_decode(cfg.decode_knots, cfg.decode_values_ms)
    curves = [{"batch": 1, "knots_x": base["curves"][0]["knots_x"], "values_ms": base["curves"][0]["values_ms"]}]
    sizes = [1]
    lopo: list[float] = []
    measured: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for size in sorted(int(v) for v in np.unique(b[uniform])):
        sel = uniform & (b == size)
        xs, ys = _medians(x[sel], lat[sel])
        knots, values, loo = _curve(xs, ys)
        curves.append({"batch": size, "knots_x": knots, "values_ms": values})
        sizes.append(size)
        lopo.extend(float(v) for v in loo)
        measured[size] = (xs, ys)
    section: dict[str, Any] = {"kv_read": read, "prefill_with_batch": "separate", "sizes": sizes, "curves": curves}
    # Leave one batch size out: refit nothing, drop its curve and predict it by the interpolation rule.
    lobo: list[float] = []
    lobo_interp: list[float] = []
    lobo_by_size: dict[str, float] = {}
    for size, (xs, ys) in measured.items():
        keep = [i for i, s in enumerate(sizes) if s != size]
        if len(keep) < 2:
            continue
        held = {**section, "sizes": [sizes[i] for i in keep], "curves": [curves[i] for i in keep]}
        errs = [_predict(held, size, float(xv)) / yv - 1.0 for xv, yv in zip(xs, ys, strict=True)]
        lobo.extend(errs)
        if size < sizes[-1]:  # a size between two others: interpolated in B (the largest is extrapolated)
            lobo_interp.extend(errs)
        lobo_by_size[str(size)] = float(np.median(np.abs(errs)))
    ragged: list[float] = []
    shapes = ~uniform
    if shapes.any():
        keys = np.stack([b[shapes], kv_max[shapes], kv_total[shapes]], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        xr = x[shapes]
        for i, (size, _, _) in enumerate(uniq):
            sel = inverse.reshape(-1) == i
            med = float(np.median(lat[shapes][sel]))
            ragged.append(_predict(section, int(size), float(xr[sel][0])) / med - 1.0)
    all_x = [v for c in curves for v in c["knots_x"]]
    fit_error: dict[str, Any] = {**_stats(lopo, "lopo"), **_stats(lobo, "lobo"), **_stats(lobo_interp, "lobo_interpolated"),
                                 **_stats(ragged, "ragged"),
                                 "lobo_by_size": lobo_by_size, "n_ragged_shapes": len(ragged),
                                 "n_batch_samples": int(m.sum())}
    section.update(fit_error=fit_error, valid_x=[float(min(all_x)), float(max(all_x))])
    return section


def _pct(v: Any) -> str:
    return f"{float(v):.1%}" if isinstance(v, int | float) else "-"


def format_batch_table(cal: Any, samples: Any = None) -> str:
    """Per config with a batch section: each size's curve (and, with samples, measured uniform-batch
    medians vs the fit at every X), then the held-out errors. Empty string when no config has one."""
    lines: list[str] = []
    for cfg in cal.configs:
        section = cfg.batch
        if section is None:
            continue
        packed = section["kv_read"] == "packed"
        lines.append(f"batched decode step, config t{cfg.tier_idx}.k{cfg.top_k}.b{cfg.num_active_blocks}: "
                     f"kv_read {section['kv_read']} (X = {'sum L' if packed else 'B * max L'}), prefill with a "
                     f"running batch: {section.get('prefill_with_batch', 'separate')}")
        lines.append(f"  {'B':>3}  {'knots':>5}  {'X range':>15}  {'T range (ms)':>17}  {'us per KV token':>15}")
        for size, curve in zip(section["sizes"], section["curves"], strict=True):
            kx, kv = curve["knots_x"], curve["values_ms"]
            slope = (kv[-1] - kv[0]) / (kx[-1] - kx[0]) * 1e3 if len(kx) > 1 else 0.0
            lines.append(f"  {size:>3}  {len(kx):>5}  {kx[0]:>6.0f} .. {kx[-1]:<6.0f}  {kv[0]:>7.3f} .. {kv[-1]:<7.3f}"
                         f"  {slope:>15.4f}")
        if samples is not None:
            m = batch_rows(samples, cfg.key)
            b = samples.batch[m]
            kv_max, kv_total = np.asarray(samples.kv_max)[m], np.asarray(samples.kv_total)[m]
            x = kv_total if packed else b * kv_max
            lat = samples.latency_ms[m]
            lines.append(f"  {'B':>3}  {'X':>7}  {'shape':>7}  {'reps':>4}  {'median ms':>10}  {'fitted ms':>10}  "
                         f"{'fit err':>8}")
            keys = np.stack([b, kv_max, kv_total], axis=1) if m.any() else np.zeros((0, 3), dtype=np.int64)
            for row in (np.unique(keys, axis=0) if keys.size else []):
                sel = (b == row[0]) & (kv_max == row[1]) & (kv_total == row[2])
                med = float(np.median(lat[sel]))
                xv = float(x[sel][0])
                fitted = _predict(section, int(row[0]), xv)
                shape = "uniform" if row[2] == row[0] * row[1] else "ragged"
                lines.append(f"  {int(row[0]):>3}  {xv:>7.0f}  {shape:>7}  {int(sel.sum()):>4}  {med:>10.4f}  "
                             f"{fitted:>10.4f}  {fitted / med - 1.0:>+8.1%}")
        err = section.get("fit_error", {})
        by = err.get("lobo_by_size") or {}
        lines.append(f"  held-out error: leave-one-position-out median {_pct(err.get('lopo_median_rel'))}, max "
                     f"{_pct(err.get('lopo_max_rel'))}; leave-one-batch-size-out median "
                     f"{_pct(err.get('lobo_median_rel'))}, max {_pct(err.get('lobo_max_rel'))}"
                     + (" (per size: " + ", ".join(f"B={k} {_pct(v)}" for k, v in by.items()) + ")" if by else "")
                     + f"; interpolated sizes only: median {_pct(err.get('lobo_interpolated_median_rel'))}, max "
                     f"{_pct(err.get('lobo_interpolated_max_rel'))}")
        lines.append(f"  ragged batches (not fitted) vs T(B, X): median {_pct(err.get('ragged_median_rel'))}, max "
                     f"{_pct(err.get('ragged_max_rel'))} over {err.get('n_ragged_shapes', 0)} shapes")
        lines.append("")
    return "\n".join(lines)
