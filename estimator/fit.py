"""Samples -> Calibration: the position-dependent decode model and everything stored beside it.

Per config (tier_idx, top_k, num_active_blocks):
- decode: the median latency per past_len (robust to outlier repetitions), then a monotone
  piecewise-linear T(L) whose knot count is chosen by leave-one-position-out cross-validation
  (knots at quantiles of the measured positions; the simplest count within one standard error
  of the best wins, so a straight line -- 2 knots -- is kept unless the data need more). Monotone
  non-decreasing is enforced by non-negative least squares on the knot increments.
- prefill: a + b*S + c*S^2 on the per-S medians, all coefficients >= 0.
- residual quantiles: ratio of every repetition to the fitted value, pooled over decode and prefill.
- fit error: leave-one-position-out relative error (median, max) of the chosen model.
Across configs of one tier: the factorised model t0 + blocks*(u + w*top_k + v*L) with its
leave-one-config-out error; the Estimator uses it for configs that were not measured.

Serving loop (from a replayed request log, not from samples): the real generate loop pays more than
the engine-only sweep (re-binding, argmax, embedding copy per step; cold caches on the first steps
after a prefill). `fit_serving_loop` regresses each request's decode residual
r = measured_decode - engine_decode on (n - 1) and 1, and P where AICc supports it (Huber IRLS, o, c0,
c1 >= 0; a runtime that frees the P x vocab prefill logits at the first step pays per prompt token) and the
TTFT residual on a constant (o_p >= 0): total(n) = prefill(P) + o_p + [n >= 2] c(P) + sum_{j=0}^{n-2}
(T(P + j) + o), c(P) = c0 + c1 P. Terms held at the bound 0 are named (ServingLoop.clamped).
Fit it on one half of the log (`split_requests`) and keep the other half for validation and the
conformal factors, so those stay exchangeable with new requests.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_latency.errors import SamplesError
from trt_latency.estimator.calibration import (
    Calibration,
    ConfigCalibration,
    FactorisedModel,
    ServingLoop,
    schema_version_for,
)
from trt_latency.estimator.samples import Samples
from trt_latency.schema import ConfigKey
from trt_latency.stats import drift_adjusted, median_se_rel

QUANTILES = (0.5, 0.9, 0.95, 0.99)
MAX_KNOTS = 8


# ------------------------------------------------------------------------------- numerics


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set; problems here are tiny)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    tol = 10 * np.finfo(float).eps * max(1.0, float(np.abs(a).max(initial=0.0))) * max(m, n)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        for _inner in range(max_iter):
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                break
            mask = passive & (z <= 0)
            denom = x[mask] - z[mask]
            alpha = float(np.min(np.where(denom > 0, x[mask] / np.where(denom > 0, denom, 1.0), np.inf)))
            if not math.isfinite(alpha):
                alpha = 0.0
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        else:
            break
        x = z
        w = a.T @ (b - a @ x)
    return x


def pwl_eval(knots: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """T(L) with the estimator's conventions: constant below the first knot, last slope above the last."""
    x = np.asarray(x, dtype=np.float64)
    out = np.interp(x, knots, values)
    slope = (values[-1] - values[-2]) / (knots[-1] - knots[-2])
    above = x > knots[-1]
    out[above] = values[-1] + slope * (x[above] - knots[-1])
    return out


def _hat_basis(knots: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Column k = piecewise-linear 'hat' at knot k, with pwl_eval's extension conventions."""
    k = knots.shape[0]
    seg = np.searchsorted(knots, x, side="right") - 1
    seg[seg < 0] = 0
    seg[seg > k - 2] = k - 2
    t = (x - knots[seg]) / (knots[seg + 1] - knots[seg])
    t = np.where(x < knots[0], 0.0, t)  # constant below the first knot; t > 1 above the last: last slope
    basis = np.zeros((x.shape[0], k))
    rows = np.arange(x.shape[0])
    basis[rows, seg] = 1.0 - t
    basis[rows, seg + 1] += t
    return basis


def fit_monotone_pwl(x: np.ndarray, y: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Knot values (non-decreasing, >= 0) minimising relative squared error to (x, y)."""
    h = _hat_basis(knots, x)
    cum = np.tril(np.ones((knots.shape[0], knots.shape[0])))  # values = cum @ increments
    weight = 1.0 / y
    d = nnls(h @ cum * weight[:, None], np.ones_like(y))
    values = cum @ d
    # Strictly positive first value, non-decreasing after (rounding can make increments -0).
    values[0] = max(values[0], float(np.min(y)) * 1e-3)
    return np.maximum.accumulate(values)


def _weighted_sse(x: np.ndarray, y: np.ndarray, knots: np.ndarray) -> float:
    """Relative SSE of the unconstrained least-squares fit (cheap; used to rank candidate knots)."""
    design = _hat_basis(knots, x) / y[:, None]
    try:
        coef = np.linalg.solve(design.T @ design, design.sum(axis=0))
    except np.linalg.LinAlgError:
        coef = np.linalg.lstsq(design, np.ones_like(y), rcond=None)[0]
    return float(np.sum((design @ coef - 1.0) ** 2))


def greedy_knots(x: np.ndarray, y: np.ndarray, max_knots: int) -> list[np.ndarray]:
    """Nested knot sets (2, 3, ... max_knots knots) chosen among the measured positions by forward
    selection: start from the two endpoints, add the position that most reduces the relative error."""
    n = x.shape[0]
    chosen = [0, n - 1]
    sets = [x[chosen].astype(np.float64)]
    while len(chosen) < min(max_knots, n):
        best_j, best_sse = -1, math.inf
        for j in range(1, n - 1):
            if j in chosen:
                continue
            sse = _weighted_sse(x, y, x[sorted([*chosen, j])].astype(np.float64))
            if sse < best_sse - 1e-15:
                best_j, best_sse = j, sse
        if best_j < 0:
            break
        chosen = sorted([*chosen, best_j])
        sets.append(x[chosen].astype(np.float64))
    return sets


@dataclass
class DecodeFit:
    knots: np.ndarray
    values: np.ndarray
    loo_rel: np.ndarray  # signed relative error per held-out position
    cv_scores: dict[int, float]


def loo_knot_errors(x: np.ndarray, y: np.ndarray, kmax: int) -> tuple[np.ndarray, dict[int, float]]:
    """Leave-one-position-out CV of the monotone piecewise-linear fit for every knot count 2..kmax
    (knot placement redone inside each fold): signed relative errors [knot count, held-out position]
    and the mean squared error per knot count (counts whose every fold produced a prediction)."""
    n = x.shape[0]
    errs = np.full((kmax + 1, n), np.nan)
    for i in range(n):
        keep = np.arange(n) != i
        for knots in greedy_knots(x[keep], y[keep], kmax):
            values = fit_monotone_pwl(x[keep], y[keep], knots)
            errs[knots.shape[0], i] = pwl_eval(knots, values, x[i : i + 1])[0] / y[i] - 1.0
    scores = {k: float(np.mean(errs[k] ** 2)) for k in range(2, kmax + 1) if np.isfinite(errs[k]).all()}
    return errs, scores


def fit_decode(x: np.ndarray, y: np.ndarray, max_knots: int = MAX_KNOTS) -> DecodeFit:
    """Choose the knot count by leave-one-position-out CV (knot placement redone inside each fold),
    keep the fewest knots whose CV error is within one standard error of the best, refit on all."""
    n = x.shape[0]
    if n <= 3:
        knots = x.astype(np.float64) if n == 2 else x[[0, n - 1]].astype(np.float64)
        values = fit_monotone_pwl(x, y, knots)
        errs = np.full(n, np.nan)
        if n == 3:
            values_loo = fit_monotone_pwl(x[[0, 2]], y[[0, 2]], x[[0, 2]].astype(np.float64))
            errs[1] = pwl_eval(x[[0, 2]].astype(np.float64), values_loo, x[1:2])[0] / y[1] - 1.0
        return DecodeFit(knots, values, errs, {})
    errs, scores = loo_knot_errors(x, y, min(max_knots, n - 1))
    ses = {k: float(np.std(errs[k] ** 2) / math.sqrt(n)) for k in scores}
    best = min(scores, key=lambda kk: scores[kk])
    chosen = min(k for k in scores if scores[k] <= scores[best] + ses[best])
    sets = greedy_knots(x, y, chosen)
    knots = sets[-1]
    values = fit_monotone_pwl(x, y, knots)
    return DecodeFit(knots, values, errs[chosen], scores)


def fit_prefill(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[a, b, c] >= 0 for a + b*S + c*S^2, relative least squares on per-S medians."""
    if s.shape[0] == 1:
        return np.array([float(y[0]), 0.0, 0.0])
    design = np.stack([np.ones_like(s), s, s * s], axis=1) / y[:, None]
    scale = np.array([1.0, 1.0 / max(float(s.max()), 1.0), 1.0 / max(float(s.max()), 1.0) ** 2])
    coef = nnls(design * scale, np.ones_like(y)) * scale
    if s.shape[0] == 2:  # two points cannot support a curvature term
        coef = nnls(design[:, :2] * scale[:2], np.ones_like(y)) * scale[:2]
        coef = np.array([coef[0], coef[1], 0.0])
    return coef


def prefill_eval(coeffs: np.ndarray | list[float], s: np.ndarray) -> np.ndarray:
    a, b, c = coeffs
    return np.maximum(a + s * (b + c * s), 0.0)


def median_rel_se(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Relative standard error of each key's median (trt_latency.stats.median_se_rel, the one the sweep
    stops on; nan below 3 repetitions). It is the floor that measurement noise alone puts under the
    leave-one-position-out error: a held-out position is compared with its own noisy median."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    se = np.array([median_se_rel(values[inverse == i]) for i in range(uniq.shape[0])])
    return np.where(np.isfinite(se), se, np.nan)


def _medians(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    med = np.array([float(np.median(values[inverse == i])) for i in range(uniq.shape[0])])
    return uniq.astype(np.float64), med, counts


def decode_rows(samples: Samples, key: ConfigKey) -> np.ndarray:
    """Mask of one config's single-request decode rows (the rows T(L) is fitted on)."""
    tier, top_k, blocks = key
    sel = (samples.tier_idx == tier) & (samples.top_k == top_k) & (samples.num_active_blocks == blocks)
    return sel & (samples.batch <= 1) & (samples.phase == "decode") & (samples.new_tokens == 1)


def decode_latencies(samples: Samples, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(past_len, drift-adjusted latency, drift level) of the decode rows ``dec`` (decode_rows), in measuring order."""
    past = samples.past_len[dec]
    lat, level = drift_adjusted(past, samples.latency_ms[dec], int(np.unique(past).shape[0]))
    return past, lat, level


# ------------------------------------------------------------------------------- per config


def fit_config(
    samples: Samples, key: ConfigKey, kv_bytes_per_token: int | None = None
) -> tuple[ConfigCalibration, np.ndarray, np.ndarray]:
    """Fit one config; returns the calibration and the decode (positions, medians) it used."""
    tier, top_k, blocks = key
    sel = (samples.tier_idx == tier) & (samples.top_k == top_k) & (samples.num_active_blocks == blocks)
    sel &= samples.batch <= 1
    dec = decode_rows(samples, key)
    pre = sel & (samples.phase == "prefill") & (samples.past_len == 0)
    where = f"config (tier_idx={tier}, top_k={top_k}, num_active_blocks={blocks})"
    if not dec.any():
        raise SamplesError(f"{where} has no decode rows", path=samples.source or None, field="phase",
                           expected="decode rows with new_tokens=1 at >= 2 past_len values")  # fmt: skip
    dec_past, dec_lat, drift = decode_latencies(samples, dec)  # the fit's medians: the machine's drift divided out
    x, y, _ = _medians(dec_past, dec_lat)
    if x.shape[0] < 2:
        raise SamplesError(f"{where} has decode rows at one past_len only", path=samples.source or None,
                           field="past_len", expected="decode rows at >= 2 distinct past_len values")  # fmt: skip
    dfit = fit_decode(x, y)
    ratios = [samples.latency_ms[dec] / pwl_eval(dfit.knots, dfit.values, samples.past_len[dec])]
    prefill_err = None
    if pre.any():
        s, ps, _ = _medians(samples.new_tokens[pre], samples.latency_ms[pre])
        coeffs = fit_prefill(s, ps)
        fitted = prefill_eval(coeffs, samples.new_tokens[pre].astype(np.float64))
        ratios.append(samples.latency_ms[pre] / np.maximum(fitted, 1e-12))
        prefill_err = float(np.max(np.abs(prefill_eval(coeffs, s) / ps - 1.0)))
        prefill_range = [float(s.min()), float(s.max())]
    else:
        # No prefill measured: one decode step at the first position stands in, flagged by an empty range.
        coeffs = np.array([float(dfit.values[0]), 0.0, 0.0])
        prefill_range = [0.0, 0.0]
    all_ratios = np.concatenate(ratios)
    rq = {q: float(np.quantile(all_ratios, q)) for q in QUANTILES}
    loo = np.abs(dfit.loo_rel[np.isfinite(dfit.loo_rel)])
    se_all = median_rel_se(dec_past, dec_lat)  # per position, same order as x
    # How many held-out misses the measurement's own noise explains (|miss| <= 2 SE of that position's
    # median): when most are, more rounds (or a quieter machine) buy precision and more knots would not.
    both = np.isfinite(dfit.loo_rel) & np.isfinite(se_all)
    within = int(np.sum(np.abs(dfit.loo_rel[both]) <= 2.0 * se_all[both]))
    se = se_all[np.isfinite(se_all)]
    fit_error: dict[str, Any] = {
        "loo_median_rel": float(np.median(loo)) if loo.size else None,
        "loo_max_rel": float(np.max(loo)) if loo.size else None,
        "n_positions": int(x.shape[0]),
        "n_knots": int(dfit.knots.shape[0]),
        "n_decode_samples": int(dec.sum()),
        "n_prefill_samples": int(pre.sum()),
        "prefill_max_rel": prefill_err,
        # Measurement-noise floor of the LOPO figures (relative standard error of the per-position medians).
        "position_se_median_rel": float(np.median(se)) if se.size else None,
        "position_se_max_rel": float(np.max(se)) if se.size else None,
        "loo_within_2se": within,  # of the positions with a held-out error and an SE
        # The machine's drift the medians were corrected for (robust sd of the per-repetition level).
        "drift_sd_rel": float(np.expm1(1.4826 * np.median(np.abs(drift)))) if drift.size else 0.0,
        "loo_with_se": int(np.sum(both)),
    }
    cfg = ConfigCalibration(
        tier_idx=tier,
        top_k=top_k,
        num_active_blocks=blocks,
        decode_knots=[float(v) for v in dfit.knots],
        decode_values_ms=[float(v) for v in dfit.values],
        prefill_coeffs=[float(v) for v in coeffs],
        residual_quantiles=rq,
        valid_past_len=[float(x[0]), float(x[-1])],
        valid_prefill_len=prefill_range,
        fit_error=fit_error,
        conformal=None,
        kv_bytes_per_token=kv_bytes_per_token,
    )
    return cfg, x, y


# ------------------------------------------------------------------------------- factorised


def _factorised_lstsq(rows: list[tuple[int, int, np.ndarray, np.ndarray]]) -> np.ndarray:
    design, target = [], []
    for top_k, blocks, x, y in rows:
        feats = np.stack([np.ones_like(x), np.full_like(x, blocks), np.full_like(x, blocks * top_k), blocks * x], axis=1)
        design.append(feats / y[:, None])  # relative error
        target.append(np.ones_like(y))
    coef, *_ = np.linalg.lstsq(np.concatenate(design), np.concatenate(target), rcond=None)
    return np.asarray(coef, dtype=np.float64)


def fit_factorised(tier: int, rows: list[tuple[int, int, np.ndarray, np.ndarray]]) -> FactorisedModel:
    """rows = (top_k, blocks, positions, medians) per measured config of one tier."""
    coef = _factorised_lstsq(rows)
    med = mx = None
    if len(rows) >= 2:
        errs = []
        for i, (top_k, blocks, x, y) in enumerate(rows):
            c = _factorised_lstsq(rows[:i] + rows[i + 1 :])
            pred = c[0] + blocks * (c[1] + c[2] * top_k + c[3] * x)
            errs.append(np.abs(pred / y - 1.0))
        all_errs = np.concatenate(errs)
        med, mx = float(np.median(all_errs)), float(np.max(all_errs))
    lo = min(float(r[2].min()) for r in rows)
    hi = max(float(r[2].max()) for r in rows)
    return FactorisedModel(tier_idx=tier, t0=float(coef[0]), u=float(coef[1]), w=float(coef[2]), v=float(coef[3]),
                           valid_past_len=[lo, hi], n_configs=len(rows), heldout_median_rel=med,
                           heldout_max_rel=mx)  # fmt: skip


# ------------------------------------------------------------------------------- entry point


def default_provenance(samples: Samples) -> dict[str, Any]:
    import trt_latency

    backends = sorted({b for b in samples.backend if b})
    devices = sorted({d for d in samples.device if d})
    return {
        "backend": ",".join(backends) or "unknown",
        "device": ",".join(devices) or "unknown",
        "engine_sha256": None,
        "versions": {"trt_latency": trt_latency.__version__, "numpy": np.__version__},
        "date": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "samples": samples.source or None,
    }


def fit_samples(
    samples: Samples,
    provenance: Mapping[str, Any] | None = None,
    kv_bytes_per_token: Mapping[ConfigKey, int] | int | None = None,
    batch_kv_read: Mapping[ConfigKey, str] | str | None = None,
) -> Calibration:
    """Fit every config present in `samples`. `provenance` entries override the defaults.

    Configs with batched decode rows (batch > 1) also get a batch section (estimator/batch_fit.py);
    ``batch_kv_read`` says what the engine reads ("padded" / "packed"), by default guessed from kv_mode."""
    if len(samples) == 0:
        raise SamplesError("no samples", path=samples.source or None, expected="at least one decode row")
    prov = default_provenance(samples)
    if provenance:
        prov.update(dict(provenance))
    configs: list[ConfigCalibration] = []
    per_tier: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    for key in samples.configs():
        kv = kv_bytes_per_token.get(key) if isinstance(kv_bytes_per_token, Mapping) else kv_bytes_per_token
        cfg, x, y = fit_config(samples, key, None if kv is None else int(kv))
        configs.append(cfg)
        per_tier.setdefault(key[0], []).append((key[1], key[2], x, y))
    factorised = [fit_factorised(tier, rows) for tier, rows in sorted(per_tier.items())]
    configs = _with_batch_sections(samples, configs, batch_kv_read)
    return Calibration(schema_version_for(configs), prov, configs, factorised)


def _with_batch_sections(samples: Samples, configs: list[ConfigCalibration],
                         kv_read: Mapping[ConfigKey, str] | str | None) -> list[ConfigCalibration]:
    if not (samples.batch > 1).any():
        return configs
    from trt_latency.estimator.batch_fit import fit_batch_section

    out = []
    for cfg in configs:
        read = kv_read.get(cfg.key) if isinstance(kv_read, Mapping) else kv_read
        section = fit_batch_section(samples, cfg, read)
        out.append(cfg if section is None else dataclasses.replace(cfg, batch=section))
    return out


def format_fit_table(cal: Calibration) -> str:
    """One line per config: knots, valid range, LOPO error, prefill and quantiles; then the factorised model."""

    def pct(v: Any) -> str:
        return "   n/a" if v is None else f"{100 * float(v):5.2f}%"

    lines = [
        "tier top_k blocks  knots  past_len range    T(lo) ms   T(hi) ms  LOPO med   LOPO max  prefill a+bS+cS^2 (ms)        p90/p99 ratio",
    ]
    for c in cal.configs:
        fe = c.fit_error
        a, b, cc = c.prefill_coeffs
        rq = c.residual_quantiles
        lines.append(
            f"{c.tier_idx:4d} {c.top_k:5d} {c.num_active_blocks:6d} {len(c.decode_knots):6d}  "
            f"[{c.valid_past_len[0]:6.0f}, {c.valid_past_len[1]:6.0f}]  {c.decode_values_ms[0]:9.4f}  "
            f"{c.decode_values_ms[-1]:9.4f}  {pct(fe.get('loo_median_rel')):>8}  {pct(fe.get('loo_max_rel')):>8}  "
            f"{a:8.4f} {b:9.3e} {cc:9.3e}   {rq.get(0.9, float('nan')):.3f}/{rq.get(0.99, float('nan')):.3f}"
        )
    for f in cal.factorised:
        held = (
            f"held-out (leave-one-config-out, {f.n_configs} configs): median {pct(f.heldout_median_rel)}, "
            f"max {pct(f.heldout_max_rel)}"
            if f.heldout_median_rel is not None
            else "held-out error: n/a (one config measured)"
        )
        lines.append(
            f"factorised tier {f.tier_idx}: T = {f.t0:.4g} + blocks*({f.u:.4g} + {f.w:.4g}*top_k + {f.v:.4g}*L) ms; {held}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- serving loop

MIN_LOOP_REQUESTS = 4  # fewer decode requests than this in the fit half: no loop terms (source "none")
HUBER_K = 1.345  # 95% efficiency under Gaussian noise, bounded influence of outlier requests


def _huber_nnls(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None, iters: int = 50) -> np.ndarray:
    """Huber regression min sum rho((a x - b) / s) with x >= 0, by IRLS over non-negative least squares.

    The scale s is the MAD of the current residuals (re-estimated every iteration); `weights` are
    fixed per-row weights (e.g. for rows whose noise grows with their size)."""
    w0 = np.ones(b.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    sq = np.sqrt(w0)
    x = nnls(a * sq[:, None], b * sq)
    for _ in range(iters):
        r = (b - a @ x) * sq
        scale = 1.4826 * float(np.median(np.abs(r - np.median(r))))
        if not scale > 1e-12:
            break
        u = np.abs(r) / (HUBER_K * scale)
        hw = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
        s = np.sqrt(w0 * hw)
        x_new = nnls(a * s[:, None], b * s)
        if np.allclose(x_new, x, rtol=1e-9, atol=1e-12):
            x = x_new
            break
        x = x_new
    return x


@dataclass(frozen=True)
class LoopTerms:
    """The serving-loop terms fitted from request residuals, and which of them sit at their bound 0."""

    o: float = 0.0
    c0: float = 0.0
    c1: float = 0.0  # ms per prompt token of the first step; 0 when the constant c is kept
    o_p: float = 0.0
    clamped: tuple[str, ...] = ()  # names from calibration.LOOP_TERMS held at 0 by the fit
    form: str = "constant"  # "constant" c or "prompt" c0 + c1 P (chosen by AICc)
    aicc: tuple[float, float] = (math.nan, math.nan)  # (constant, prompt); nan = not compared
    o_p1: float = 0.0  # ms per prompt token on the TTFT side; 0 when the constant o_p is kept
    prefill_form: str = "constant"  # "constant" o_p or "prompt" o_p + o_p1 P (chosen by AICc)


def _aicc(rss: float, n: int, k: int) -> float:
    if n - k - 1 <= 0 or not rss > 0:
        return math.nan
    return n * math.log(rss / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _selection_clip(residuals: np.ndarray) -> float:
    """Where a model comparison clips residuals: SELECT_CLIP_K robust SDs (MAD) of the constant fit's."""
    return SELECT_CLIP_K * max(1.4826 * float(np.median(np.abs(residuals - np.median(residuals)))), 1e-12)


def _robust_rss(a: np.ndarray, b: np.ndarray, x: np.ndarray, w: np.ndarray, clip: float) -> float:
    """Weighted residual sum of squares with each residual clipped at `clip` (SELECT_CLIP_K robust SDs of a common
    scale), so a few descheduled requests do not choose the model form."""
    r = np.clip((b - a @ x) * np.sqrt(w), -clip, clip)
    return float(r @ r)


MIN_SLOPE_PROMPTS = 3  # distinct prompt lengths among the decode rows before a first-step slope is tried
SLOPE_AICC_MARGIN = 2.0  # the slope must lower AICc by this much (otherwise the constant c is kept)
# Residuals are clipped at this many robust SDs of the constant fit when the forms are compared: a
# descheduled request (a 3-sigma outlier) does not choose the form, but a systematic misfit still counts.
# (The estimation's Huber cut, 1.345, clipped a third of a 9-row fit: a slope the first steps showed plainly,
# 8-30 ms growing with P, lost to the constant whose worst residuals the clip had capped.)
SELECT_CLIP_K = 3.0


_FREE_O_SHIFT_MS = 1e3  # o = o' - shift with o' >= 0: an o above -1 s per step, i.e. unbounded here


def _free_o_fit(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """_huber_nnls with the first coefficient (o) free of its bound 0 (the others stay >= 0): for comparing
    forms only, never an estimate."""
    x = _huber_nnls(a, b + _FREE_O_SHIFT_MS * a[:, 0], w)
    x[0] -= _FREE_O_SHIFT_MS
    return x


def fit_loop(output_tokens: np.ndarray, decode_residual_ms: np.ndarray, prefill_residual_ms: np.ndarray,
             prefill_ms: np.ndarray | None = None, prompt: np.ndarray | None = None,
             first_residual_ms: np.ndarray | None = None) -> LoopTerms:
    """The serving-loop terms from per-request residuals over the engine-only prediction.

    decode_residual_ms[i] = measured decode - engine decode of request i (used where output_tokens >= 2):
    r = o * (n - 1) + c(P), rows weighted 1 / (n - 1) since a sum of n - 1 noisy steps has variance ~ n - 1.
    first_residual_ms[i] (optional; NaN where not timed) = the first decode step alone - the engine's step
    at KV P: o + c(P), observed without the n - 2 later steps' noise. Where it is given the request
    contributes two rows instead of one: that first step [1, 1, P] (weight 1) and its later steps
    r - first = o * (n - 2) (weight 1 / (n - 2), when n >= 3). The first step after a prefill is what c(P)
    is, so a few requests pin its slope where their decode totals could not (a 2048-token prompt's extra
    100 ms is lost in 16 steps that each scatter by 10-30% on a shared host).
    c(P) is a constant c0, or c0 + c1 P (P = `prompt`, the request's prompt tokens) when the slope is
    supported: enough distinct prompts, c1 > 0, and AICc (robust RSS, residuals clipped at SELECT_CLIP_K
    robust SDs of the constant fit) lower by SLOPE_AICC_MARGIN. prefill_residual_ms = measured TTFT - engine
    prefill: o_p is its Huber location (or o_p + o_p1 P where the prompts support it, _fit_prefill_side), rows
    weighted 1 / prefill_ms^2 when given (timing noise is relative:
    a VLM request's 100 ms encoder scatters by +-20 ms and would bury a 0.1 ms host overhead measured on the
    short prompts). All >= 0; a term the bound holds at 0 is named in `clamped`.
    """
    n = np.asarray(output_tokens, dtype=np.float64)
    r = np.asarray(decode_residual_ms, dtype=np.float64)
    rp = np.asarray(prefill_residual_ms, dtype=np.float64)
    dec = (n >= 2) & np.isfinite(r)
    pl_all = None if prompt is None else np.asarray(prompt, dtype=np.float64)
    rf = np.full(n.shape, np.nan) if first_residual_ms is None else np.asarray(first_residual_ms, dtype=np.float64)
    o = c0 = c1 = 0.0
    clamped: list[str] = []
    form, aicc = "constant", (math.nan, math.nan)
    if dec.any():
        # one row per decode total, or two: the first step and the later steps
        rows: list[tuple[float, float, float, float, float]] = []  # (o coef, c0 coef, c1 coef, target, weight)
        for i in np.flatnonzero(dec):
            p_i = 0.0 if pl_all is None else float(pl_all[i])
            if np.isfinite(rf[i]):
                rows.append((1.0, 1.0, p_i, float(rf[i]), 1.0))
                if n[i] >= 3:
                    rows.append((n[i] - 2.0, 0.0, 0.0, float(r[i] - rf[i]), 1.0 / (n[i] - 2.0)))
            else:
                rows.append((n[i] - 1.0, 1.0, p_i, float(r[i]), 1.0 / (n[i] - 1.0)))
        table = np.asarray(rows, dtype=np.float64)
        a3, b, w = table[:, :3], table[:, 3], table[:, 4]
        a = a3[:, :2]
        if np.linalg.matrix_rank(a) >= 2:  # o and c told apart: two output lengths, or first steps and later ones
            x = _huber_nnls(a, b, w)
            o, c0 = (float(v) for v in x)
            with_c = a3[:, 1] > 0
            if pl_all is not None and np.unique(a3[with_c, 2]).size >= MIN_SLOPE_PROMPTS:
                # The forms are compared with o free of its bound: where the replay stepped faster than the
                # sweep (o held at 0), the later steps' misfit is the same under both forms and, in the
                # RSS, drowned the first steps' plain slope (ordinary-backing runs kept a constant c of
                # 10.6-13.8 ms where the first steps read 3.9 ms at P = 167 and 38.7 at 940).
                x1f, x2f = _free_o_fit(a, b, w), _free_o_fit(a3, b, w)
                clip = _selection_clip((b - a @ x1f) * np.sqrt(w))
                m = int(b.size)
                aicc = (_aicc(_robust_rss(a, b, x1f, w, clip), m, 2), _aicc(_robust_rss(a3, b, x2f, w, clip), m, 3))
                if x2f[2] > 0 and aicc[1] + SLOPE_AICC_MARGIN < aicc[0]:
                    x2 = _huber_nnls(a3, b, w)  # the estimate keeps o >= 0
                    o, c0, c1 = (float(v) for v in x2)
                    form = "prompt"
            clamped += [name for name, v in (("o", o), ("c", c0)) if v == 0.0]
        else:  # one output length only: o and c cannot be told apart; call it all per-step
            steps = n[dec] - 1.0
            o = float(_huber_nnls(steps[:, None], r[dec], 1.0 / steps)[0])
            clamped += ["o"] if o == 0.0 else []
    o_p, o_p1, prefill_form = _fit_prefill_side(rp, prefill_ms, pl_all)
    if o_p == 0.0 and np.isfinite(rp).any():
        clamped.append("o_p")
    return LoopTerms(o, c0, c1, o_p, tuple(clamped), form, aicc, o_p1, prefill_form)


def _fit_prefill_side(rp: np.ndarray, prefill_ms: np.ndarray | None, prompt: np.ndarray | None
                      ) -> tuple[float, float, str]:
    """(o_p, o_p1, form) from the TTFT residuals: a Huber location, or a per-prompt-token form where the
    prompts support it. Candidates: the constant o_p, o_p1 P alone (one parameter, as the constant: a runtime
    that writes the prefill's P x vocab logits pays per token and nothing per call) and o_p + o_p1 P; the
    lowest AICc wins, a per-token form only by SLOPE_AICC_MARGIN over the constant and with o_p1 > 0. The
    one-parameter per-token form matters at a real-size model's budget: 4 fit requests, where AICc's
    small-sample penalty for a second parameter (12 at n = 4) hides any slope. Rows weighted 1 /
    prefill_ms^2 when given: the prefill's timing noise is relative, so a long prompt's seconds do not bury
    the short prompts' overhead, and a slope has to hold on the relative scale too."""
    ok = np.isfinite(rp)
    y = rp[ok]
    if not y.size:
        return 0.0, 0.0, "constant"
    w = np.ones(y.size) if prefill_ms is None else 1.0 / np.maximum(np.asarray(prefill_ms, dtype=np.float64)[ok],
                                                                    1e-3) ** 2
    ones = np.ones((y.size, 1))
    x = _huber_nnls(ones, y, w)
    o_p = float(x[0])
    if prompt is None or np.unique(prompt[ok]).size < MIN_SLOPE_PROMPTS:
        return o_p, 0.0, "constant"
    p = np.asarray(prompt, dtype=np.float64)[ok]
    res = (y - ones @ x) * np.sqrt(w)
    clip = _selection_clip(res)
    m = int(y.size)
    best = (_aicc(_robust_rss(ones, y, x, w, clip), m, 1), o_p, 0.0, "constant")
    for a in (p[:, None], np.column_stack([np.ones(m), p])):
        xa = _huber_nnls(a, y, w)
        slope = float(xa[-1])
        score = _aicc(_robust_rss(a, y, xa, w, clip), m, a.shape[1])
        if slope > 0 and score + SLOPE_AICC_MARGIN < best[0] and not math.isnan(score):
            best = (score + SLOPE_AICC_MARGIN, float(xa[0]) if a.shape[1] == 2 else 0.0, slope, "prompt")
    if math.isnan(best[0]):
        return o_p, 0.0, "constant"
    return best[1], best[2], best[3]


def loop_note(loop: ServingLoop) -> str:
    """The summary's note on a config's loop terms: the first step's slope and the terms held at their
    bound (a clamped term is never printed as a silent 0.0000)."""
    note = f"; c(P) = c + {loop.first_step_per_token_ms:.3g} ms * P" if loop.first_step_per_token_ms else ""
    note += f"; o_p(P) = o_p + {loop.prefill_per_token_ms:.3g} ms * P" if loop.prefill_per_token_ms else ""
    if loop.clamped:
        note += (f"; clamped at 0: {', '.join(loop.clamped)} (the replay asked for less than the engine-only "
                 "sweep: a bound, not a measurement)")
    return note


def fit_loop_terms(output_tokens: np.ndarray, decode_residual_ms: np.ndarray,
                   prefill_residual_ms: np.ndarray, prefill_ms: np.ndarray | None = None) -> tuple[float, float, float]:
    """(o, c, o_p) of `fit_loop` with a constant first-step term (no prompt lengths given)."""
    t = fit_loop(output_tokens, decode_residual_ms, prefill_residual_ms, prefill_ms)
    return t.o, t.c0, t.o_p


@dataclass
class LoopFitReport:
    """Serving-loop terms of one config and their held-out check (request-level |relative error| of total)."""

    key: ConfigKey
    loop: ServingLoop
    n_fit: int
    n_holdout: int
    holdout_median_rel_engine: float  # engine-only prediction (what the conformal factor absorbed before)
    holdout_median_rel_serving: float  # with the loop terms
    holdout_median_ratio_engine: float  # median measured / predicted total
    holdout_median_ratio_serving: float
    holdout_decode_median_rel_engine: float = math.nan  # decode part only (requests with >= 2 tokens)
    holdout_decode_median_rel_serving: float = math.nan
    terms: LoopTerms | None = None  # the fit itself (form, AICc); None without enough decode requests


def split_requests(request_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fit mask, holdout mask): even request_id fits the loop terms, odd ones validate them and
    calibrate the conformal factors (a fixed rule, so a resumed replay keeps every request's side)."""
    rid = np.asarray(request_id, dtype=np.int64)
    fit = rid % 2 == 0
    return fit, ~fit


def _log_key(log: Any, i: int) -> ConfigKey:
    return ConfigKey(int(log.tier_idx[i]), int(log.top_k[i]), int(log.num_active_blocks[i]))


def engine_predictions(log: Any, estimator: Any, serving: bool = False,
                       output_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prefill_ms, decode_ms) per request of a RequestLog from the Estimator (NaN where it cannot answer);
    ``output_tokens``: the same count for every request instead of each one's own."""
    pre = np.full(len(log), np.nan)
    dec = np.full(len(log), np.nan)
    for i in range(len(log)):
        t, k, b = _log_key(log, i)
        n = int(log.output_tokens[i]) if output_tokens is None else output_tokens
        try:
            p = estimator.predict(int(log.vision_tokens[i]), int(log.text_tokens[i]), n,
                                  tier_idx=t, top_k=k, num_active_blocks=b or None, serving=serving,
                                  images=log.images_of(i) if hasattr(log, "images_of") else None)  # fmt: skip
        except Exception:  # noqa: BLE001 - a request the model cannot answer takes no part
            continue
        pre[i], dec[i] = p.prefill_ms, p.decode_ms
    return pre, dec


def engine_first_steps(log: Any, estimator: Any) -> np.ndarray:
    """The engine's step at each request's first decode position (KV = P): the engine-only decode of a
    2-token request; NaN where the log did not time its first step or the estimator cannot answer."""
    first = getattr(log, "first_step_ms", None)
    if first is None:
        return np.full(len(log), np.nan)
    timed = np.isfinite(first) & (np.asarray(log.output_tokens) >= 2)
    return np.where(timed, engine_predictions(log, estimator, output_tokens=2)[1], np.nan)


def _median_rel(measured: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(measured) & np.isfinite(predicted) & (predicted > 0)
    if not ok.any():
        return math.nan, math.nan
    ratio = measured[ok] / predicted[ok]
    return float(np.median(np.abs(ratio - 1.0))), float(np.median(ratio))


def fit_serving_loop(log: Any, estimator: Any, fit_mask: np.ndarray | None = None,
                     holdout_mask: np.ndarray | None = None) -> dict[ConfigKey, LoopFitReport]:
    """Serving-loop terms per config of a RequestLog, fitted on `fit_mask` rows, checked on `holdout_mask`.

    Keys are the calibration's config keys (a log's num_active_blocks 0 = the tier's largest measured).
    Default masks: `split_requests(log.request_id)`. The estimator's engine-only prediction
    (predict(serving=False)) is the baseline the residuals are taken against.
    """
    if fit_mask is None or holdout_mask is None:
        fit_mask, holdout_mask = split_requests(log.request_id)
    pre, dec = engine_predictions(log, estimator, serving=False)
    first = getattr(log, "first_step_ms", None)  # None: a log written before the column
    first_residual = (np.full(len(log), np.nan) if first is None else np.asarray(first, dtype=np.float64)) \
        - engine_first_steps(log, estimator)
    ttft = np.asarray(log.ttft_ms, dtype=np.float64)
    total = np.asarray(log.total_ms, dtype=np.float64)
    n_out = np.asarray(log.output_tokens, dtype=np.int64)
    prompt = (np.asarray(log.vision_tokens, dtype=np.float64) + np.asarray(log.text_tokens, dtype=np.float64))
    keys: list[ConfigKey | None] = []
    for i in range(len(log)):
        t, k, b = _log_key(log, i)
        try:
            keys.append(ConfigKey(*estimator.config_key(t, k, b or None)))
        except Exception:  # noqa: BLE001 - unknown config: not fitted
            keys.append(None)
    measured = {tuple(k) for k in estimator.configs()}  # factorised configs borrow their nearest's terms
    out: dict[ConfigKey, LoopFitReport] = {}
    for key in sorted({k for k in keys if k is not None and k in measured}):
        mine = np.array([k == key for k in keys]) & np.isfinite(pre) & np.isfinite(dec)
        fit = mine & fit_mask
        n_dec = int((fit & (n_out >= 2)).sum())
        terms = None
        if n_dec >= MIN_LOOP_REQUESTS:
            terms = fit_loop(n_out[fit], (total - ttft)[fit] - dec[fit], ttft[fit] - pre[fit], pre[fit], prompt[fit],
                             first_residual[fit])
            loop = ServingLoop(terms.o, terms.c0, terms.o_p, int(fit.sum()), "replay", terms.c1, terms.clamped,
                               terms.o_p1)
        else:
            loop = ServingLoop(0.0, 0.0, 0.0, int(fit.sum()), "none")
        hold = mine & holdout_mask
        engine_total = pre[hold] + dec[hold]
        steps = np.maximum(n_out[hold] - 1, 0).astype(np.float64)
        pre_extra = loop.prefill_extra_ms(prompt[hold])
        serving_total = (engine_total + pre_extra + np.where(steps > 0, loop.first_ms(prompt[hold]), 0.0)
                         + steps * loop.decode_step_ms)
        rel_e, ratio_e = _median_rel(total[hold], engine_total)
        rel_s, ratio_s = _median_rel(total[hold], serving_total)
        has_dec = steps > 0
        measured_dec = (total - ttft)[hold][has_dec]
        dec_e = _median_rel(measured_dec, dec[hold][has_dec])[0]
        dec_s = _median_rel(measured_dec, (serving_total - pre[hold] - pre_extra)[has_dec])[0]
        out[key] = LoopFitReport(key, loop, int(fit.sum()), int(hold.sum()), rel_e, rel_s, ratio_e, ratio_s,
                                 dec_e, dec_s, terms)
    return out

