"""Analyze a request log: how much of the decode ms/token growth does KV-cache growth explain?

Input: a RequestLog (estimator.requests) and, optionally, a calibrated Estimator. Output: an
AnalysisReport with

- the bucket table (output tokens 2, 3-5, 6-10, 11-20, 21+: count, mean and std of measured decode
  ms/token) beside what the calibrated per-position model predicts for the same requests;
- the share of the growth from the first to the last non-empty bucket that KV-length growth explains
  (predicted growth / measured growth, clamped to [0, 1], with a verdict in words);
- the trace authors' two checks: (a) decode ms/token against the mean KV size in bytes of each request
  (correlation, slope, and the memory bandwidth that slope implies), (b) decode ms/token at fixed output
  length across prefill-length terciles;
- the competing causes of a ms/token change (diagnostics.causes: constant, first_step, kv_growth; counting
  cannot occur, ms/token is per decode step here) fitted per request, scored by AICc, kv_growth's slope
  checked against the calibration's;
- with a calibration that carries serving-loop terms (o per decode step, c once after the prefill,
  o_p on the prefill; see estimator.fit.fit_serving_loop): the model column is engine + loop, the
  engine-only prediction is shown beside it, and the loop's share of the predicted time is stated.
  The KV-explained share always compares the engine-only growth (KV reads are engine work).

Pure numpy: no plotting or engine imports here. The numbers are computed here; their words (each check's
verdict, the printed table) are diagnostics.analyze_text's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from trt_latency.diagnostics.analyze_text import (
    NO_PREFILL_PAIRS,
    format_analysis,
    growth_verdict,
    kv_verdict,
    prefill_verdict,
    share_text,
)
from trt_latency.diagnostics.buckets import BUCKETS, SIGNIFICANCE_SE, in_bucket
from trt_latency.diagnostics.causes import CauseReport, explain_requests, kv_slope_from_calibration
from trt_latency.errors import RequestLogError, TrtLatencyError
from trt_latency.estimator.requests import RequestLog
from trt_latency.schema import ConfigKey


class _Prediction(Protocol):
    decode_ms: float


class Predictor(Protocol):
    """What analyze needs from an Estimator."""

    def predict(self, vision_tokens: int, text_tokens: int, output_tokens: int, tier_idx: int = 0,
                top_k: int = 1, num_active_blocks: int | None = None,
                quantile: float | None = None) -> Any: ...


@dataclass
class BucketRow:
    label: str
    count: int
    measured_mean: float
    measured_std: float
    predicted_mean: float
    predicted_std: float
    mean_kv_tokens: float  # mean over requests of the mean past_len of their decode steps
    mean_prompt_tokens: float
    engine_mean: float = math.nan  # engine-only predicted ms/token (= predicted_mean without loop terms)


@dataclass
class GrowthShare:
    first: str
    last: str
    measured_growth: float
    measured_se: float
    significant: bool | None  # None: too few requests to tell
    predicted_growth: float
    share_raw: float  # predicted / measured (unclamped); NaN when not defined
    share: float  # clamped to [0, 1]; NaN when not defined
    verdict: str
    loop_growth: float = math.nan  # what the serving-loop terms add to the predicted growth (c weighs on short requests)

    def share_text(self) -> str:
        return share_text(self)


@dataclass
class KvSizeCheck:
    x_unit: str  # "MiB" or "tokens"
    n: int
    correlation: float
    slope_ms_per_unit: float
    intercept_ms: float
    predicted_slope_ms_per_unit: float
    implied_bandwidth_gb_s: float  # 1/slope when x is bytes: the read rate at which KV growth costs this much
    verdict: str


@dataclass
class PrefillCell:
    bucket: str
    tercile: str
    count: int
    mean_prompt_tokens: float
    measured_mean: float
    measured_std: float
    predicted_mean: float


@dataclass
class PrefillCheck:
    tercile_edges: list[float]
    cells: list[PrefillCell]
    mean_delta_ms: float  # count-weighted mean over buckets of (longest - shortest prompt tercile)
    mean_delta_se: float
    predicted_delta_ms: float
    verdict: str


@dataclass
class AnalysisReport:
    path: str
    n_requests: int
    n_decode: int
    buckets: list[BucketRow]
    growth: GrowthShare | None
    kv_check: KvSizeCheck | None
    prefill_check: PrefillCheck | None
    has_model: bool
    level_ratio: float = math.nan  # mean measured / mean predicted ms/token over all requests
    engine_level_ratio: float = math.nan  # the same against the engine-only prediction
    serving_loop: dict[str, Any] = field(default_factory=dict)  # {"tier,top_k,blocks": {o, c, o_p, source}}
    loop_share_decode: float = math.nan  # share of the predicted decode time that is serving-loop terms
    loop_share_total: float = math.nan  # share of the predicted total time that is serving-loop terms
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # e.g. calibration path and provenance
    causes: CauseReport | None = None  # constant / first_step / kv_growth fitted per request (diagnostics.causes)

    def to_dict(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            if isinstance(value, float | np.floating):
                v = float(value)
                return v if math.isfinite(v) else None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            if isinstance(value, np.integer):
                return int(value)
            return value

        out = {
            "path": self.path,
            "n_requests": self.n_requests,
            "n_decode": self.n_decode,
            "has_model": self.has_model,
            "level_ratio": self.level_ratio,
            "engine_level_ratio": self.engine_level_ratio,
            "serving_loop": dict(self.serving_loop),
            "loop_share_decode": self.loop_share_decode,
            "loop_share_total": self.loop_share_total,
            "buckets": [vars(b) for b in self.buckets],
            "growth": None if self.growth is None else vars(self.growth),
            "kv_check": None if self.kv_check is None else vars(self.kv_check),
            "prefill_check": None if self.prefill_check is None else {
                **{k: v for k, v in vars(self.prefill_check).items() if k != "cells"},
                "cells": [vars(c) for c in self.prefill_check.cells],
            },
            "notes": list(self.notes),
            "source": dict(self.source),
            "causes": None if self.causes is None else self.causes.to_dict(),
        }
        return clean(out)  # type: ignore[no-any-return]

    def format_table(self) -> str:
        return format_analysis(self)


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if x.size >= 2 else math.nan


def _se(x: np.ndarray) -> float:
    return _std(x) / math.sqrt(x.size) if x.size >= 2 else math.nan


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan


def _predict(log: RequestLog, estimator: Predictor, mask: np.ndarray | None,
             serving: bool | None = None) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """(ms/token per request, count of each Prediction flag such as 'extrapolated' / 'factorised')."""
    per_token, flags, _, _ = _predict_full(log, estimator, mask, serving)
    return per_token, flags


def _predict_full(log: RequestLog, estimator: Predictor, mask: np.ndarray | None,
                  serving: bool | None = None) -> tuple[np.ndarray, dict[str, int], np.ndarray, np.ndarray]:
    """(ms/token, flag counts, decode ms, total ms) per request; `serving` passed on when not None."""
    flags: dict[str, int] = {}
    out = np.full(len(log), np.nan)
    dec = np.full(len(log), np.nan)
    tot = np.full(len(log), np.nan)
    extra = {} if serving is None else {"serving": serving}
    for i in range(len(log)):
        n = int(log.output_tokens[i])
        if n < 2 or (mask is not None and not mask[i]):
            continue
        nab = int(log.num_active_blocks[i])
        try:
            pred = estimator.predict(
                vision_tokens=int(log.vision_tokens[i]), text_tokens=int(log.text_tokens[i]), output_tokens=n,
                tier_idx=int(log.tier_idx[i]), top_k=int(log.top_k[i]), num_active_blocks=nab if nab > 0 else None,
                **extra)
        except (TrtLatencyError, ValueError, KeyError, IndexError) as exc:
            raise RequestLogError(
                f"the calibrated model cannot answer this request ({exc})", path=log.path, row=log.row_of(i),
                field="tier_idx/top_k/num_active_blocks",
                expected="a configuration the calibration covers",
                got=f"tier_idx={int(log.tier_idx[i])}, top_k={int(log.top_k[i])}, num_active_blocks={nab}",
            ) from None
        out[i] = float(pred.decode_ms) / (n - 1)
        dec[i], tot[i] = float(pred.decode_ms), float(pred.total_ms)
        for flag in str(getattr(pred, "flags", "") or "").split(";"):
            if flag.strip():
                flags[flag.strip()] = flags.get(flag.strip(), 0) + 1
    return out, flags, dec, tot


def _kv_bytes_per_request(log: RequestLog,
                          kv_bytes_per_token: float | Mapping[ConfigKey, float] | None) -> np.ndarray | None:
    if kv_bytes_per_token is None:
        return None
    if isinstance(kv_bytes_per_token, int | float):
        return np.full(len(log), float(kv_bytes_per_token))
    out = np.full(len(log), np.nan)
    by_tier: dict[int, float] = {}
    for (tier, _top_k, _blocks), v in kv_bytes_per_token.items():
        by_tier[tier] = max(by_tier.get(tier, 0.0), float(v))
    for i in range(len(log)):
        key = ConfigKey(int(log.tier_idx[i]), int(log.top_k[i]), int(log.num_active_blocks[i]))
        if key in kv_bytes_per_token:
            out[i] = float(kv_bytes_per_token[key])
        elif key[2] == 0 and key[0] in by_tier:  # 0 = the tier's largest measured config
            out[i] = by_tier[key[0]]
    return None if np.isnan(out).any() else out


def _growth(buckets: list[BucketRow], measured: dict[str, np.ndarray], has_model: bool,
            with_loop: bool = False) -> GrowthShare | None:  # fmt: skip
    filled = [b for b in buckets if b.count > 0]
    if len(filled) < 2:
        return None
    first, last = filled[0], filled[-1]
    g = last.measured_mean - first.measured_mean
    a, b = measured[first.label], measured[last.label]
    if a.size >= 2 and b.size >= 2:
        se = math.sqrt(_std(a) ** 2 / a.size + _std(b) ** 2 / b.size)
        significant: bool | None = abs(g) > SIGNIFICANCE_SE * se
    else:
        se, significant = math.nan, None
    p_model = last.predicted_mean - first.predicted_mean if has_model else math.nan
    # KV reads are engine work: the KV-explained share compares the engine-only growth.
    p = last.engine_mean - first.engine_mean if has_model and with_loop else p_model
    loop_growth = p_model - p if with_loop else math.nan
    share_raw = p / g if has_model and g != 0 else math.nan
    # A share of a change that is not there is noise: only report it for a real growth.
    share = min(1.0, max(0.0, share_raw)) if math.isfinite(share_raw) and significant is not False and g > 0 \
        else math.nan
    verdict = growth_verdict(first.label, last.label, g, se, significant, p, p_model, share_raw, share,
                             has_model, with_loop)
    return GrowthShare(first.label, last.label, g, se, significant, p, share_raw, share, verdict, loop_growth)


def _linfit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, pearson r); NaN where x has no spread."""
    if x.size < 2 or float(np.ptp(x)) == 0.0:
        return math.nan, math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if float(np.ptp(y)) > 0 else math.nan
    return float(slope), float(intercept), r


def _kv_check(log: RequestLog, ok: np.ndarray, measured: np.ndarray, predicted: np.ndarray | None,
              kv_bytes: np.ndarray | None) -> KvSizeCheck | None:
    if int(ok.sum()) < 3:
        return None
    n_out = log.output_tokens[ok].astype(np.float64)
    mean_past = log.prompt_tokens[ok].astype(np.float64) + (n_out - 2.0) / 2.0
    if kv_bytes is not None:
        x, unit = mean_past * kv_bytes[ok] / 2**20, "MiB"
    else:
        x, unit = mean_past, "tokens"
    y = measured[ok]
    slope, intercept, r = _linfit(x, y)
    pslope = _linfit(x, predicted[ok])[0] if predicted is not None else math.nan
    bandwidth = 2**20 / (slope * 1e-3) / 1e9 if unit == "MiB" and slope > 0 else math.nan
    n = int(ok.sum())
    # t statistic of the correlation: is the slope distinguishable from zero with this many requests?
    t_stat = r * math.sqrt((n - 2) / max(1e-12, 1.0 - r * r)) if math.isfinite(r) and n > 2 else math.nan
    verdict = kv_verdict(n, r, slope, pslope, t_stat, predicted is not None)
    return KvSizeCheck(unit, n, r, slope, intercept, pslope, bandwidth, verdict)


def _prefill_check(log: RequestLog, ok: np.ndarray, measured: np.ndarray,
                   predicted: np.ndarray | None) -> PrefillCheck | None:
    prompt = log.prompt_tokens.astype(np.float64)
    if int(ok.sum()) < 6 or np.unique(prompt[ok]).size < 2:
        return None
    e1, e2 = (float(v) for v in np.quantile(prompt[ok], [1 / 3, 2 / 3]))
    edges = [e1, e2] if e2 > e1 else [e1]
    labels = ([f"P <= {e1:.0f}", f"{e1:.0f} < P <= {e2:.0f}", f"P > {e2:.0f}"] if len(edges) == 2
              else [f"P <= {e1:.0f}", f"P > {e1:.0f}"])
    group = np.searchsorted(np.asarray(edges), prompt, side="left")
    cells: list[PrefillCell] = []
    deltas: list[tuple[int, float, float, float]] = []  # weight, measured delta, variance, predicted delta
    groups: list[tuple[np.ndarray, np.ndarray]] = []  # per bucket: (mask of shortest, mask of longest tercile)
    within: list[tuple[int, float]] = []  # (n - 1, variance) of every cell with >= 2 requests
    for label, lo, hi in BUCKETS:
        mine = ok & in_bucket(log.output_tokens, lo, hi)
        present = []
        for gi, glabel in enumerate(labels):
            m = mine & (group == gi)
            if not m.any():
                continue
            pm = _mean(predicted[m]) if predicted is not None else math.nan
            cells.append(PrefillCell(label, glabel, int(m.sum()), _mean(prompt[m]), _mean(measured[m]),
                                     _std(measured[m]), pm))
            if m.sum() >= 2:
                within.append((int(m.sum()) - 1, _std(measured[m]) ** 2))
            present.append((gi, m))
        if len(present) >= 2 and present[0][0] == 0 and present[-1][0] == len(labels) - 1:
            groups.append((present[0][1], present[-1][1]))
    # Cells are small: estimate the noise of a cell mean from the pooled within-cell variance.
    dof = sum(d for d, _ in within)
    pooled = sum(d * v for d, v in within) / dof if dof > 0 else math.nan
    for lo_m, hi_m in groups:
        d = _mean(measured[hi_m]) - _mean(measured[lo_m])
        var = pooled / int(hi_m.sum()) + pooled / int(lo_m.sum())
        pd = _mean(predicted[hi_m]) - _mean(predicted[lo_m]) if predicted is not None else math.nan
        deltas.append((int(min(lo_m.sum(), hi_m.sum())), d, var, pd))
    if not deltas:
        return PrefillCheck(edges, cells, math.nan, math.nan, math.nan, NO_PREFILL_PAIRS)
    w = np.asarray([d[0] for d in deltas], dtype=np.float64)
    w = w / w.sum()
    delta = float(np.sum(w * np.asarray([d[1] for d in deltas])))
    variances = np.asarray([d[2] for d in deltas])
    se = float(math.sqrt(np.sum(w**2 * variances))) if np.isfinite(variances).all() else math.nan
    pdelta = float(np.sum(w * np.asarray([d[3] for d in deltas]))) if predicted is not None else math.nan
    verdict = prefill_verdict(delta, se, pdelta, predicted is not None)
    return PrefillCheck(edges, cells, delta, se, pdelta, verdict)


def analyze(requests: RequestLog, estimator: Predictor | None = None,
            kv_bytes_per_token: float | Mapping[ConfigKey, float] | None = None,
            kv_slope_bound: float | None = None, kv_bound_source: str = "") -> AnalysisReport:
    """Bucket table, KV-explained share, the two verification checks and the competing causes for one log.

    ``kv_slope_bound``: ms per KV token the engine can pay (kv_growth's plausibility); default: the
    estimator's calibration's steepest decode slope, else diagnostics.causes' assumed bound.

    ``kv_bytes_per_token``: bytes of K and V per token of KV length (2 * layers * kv_heads * head_dim *
    dtype size), one number or one per (tier_idx, top_k, num_active_blocks); without it check (a) uses
    KV length in tokens.
    """
    log = requests
    measured = log.decode_ms_per_token()
    ok = np.isfinite(measured)
    notes: list[str] = []
    predicted: np.ndarray | None = None
    engine: np.ndarray | None = None
    loops = _serving_loops(estimator)
    loop_share_decode = loop_share_total = math.nan
    if estimator is not None:
        predicted, flags, dec, tot = _predict_full(log, estimator, ok, True if loops else None)
        engine = predicted
        if loops:
            engine, _, edec, etot = _predict_full(log, estimator, ok, False)
            fin = ok & np.isfinite(dec) & np.isfinite(edec)
            if fin.any() and float(np.sum(dec[fin])) > 0:
                loop_share_decode = float(np.sum(dec[fin] - edec[fin]) / np.sum(dec[fin]))
                loop_share_total = float(np.sum(tot[fin] - etot[fin]) / np.sum(tot[fin]))
        for flag, count in sorted(flags.items()):
            why = {"extrapolated": "outside the calibrated KV / prompt range",
                   "factorised": "for a config that was not measured (factorised model)"}.get(flag, flag)
            notes.append(f"{count} of {int(ok.sum())} predictions are {why}; treat them with care.")
    n_skipped = int((~ok).sum())
    if n_skipped:
        notes.append(f"{n_skipped} request(s) with a single output token have no decode step and are left out.")
    n_out = log.output_tokens.astype(np.float64)
    mean_past = log.prompt_tokens.astype(np.float64) + (n_out - 2.0) / 2.0
    buckets: list[BucketRow] = []
    by_label: dict[str, np.ndarray] = {}
    for label, lo, hi in BUCKETS:
        m = ok & in_bucket(log.output_tokens, lo, hi)
        by_label[label] = measured[m]
        buckets.append(BucketRow(
            label=label, count=int(m.sum()), measured_mean=_mean(measured[m]), measured_std=_std(measured[m]),
            predicted_mean=_mean(predicted[m]) if predicted is not None else math.nan,
            predicted_std=_std(predicted[m]) if predicted is not None else math.nan,
            mean_kv_tokens=_mean(mean_past[m]), mean_prompt_tokens=_mean(log.prompt_tokens[m].astype(np.float64)),
            engine_mean=_mean(engine[m]) if engine is not None else math.nan,
        ))
    growth = _growth(buckets, by_label, predicted is not None, bool(loops))
    if growth is None:
        notes.append("Fewer than two output-token buckets have requests; no growth to measure.")
    kv_bytes = _kv_bytes_per_request(log, kv_bytes_per_token)
    if kv_bytes_per_token is not None and kv_bytes is None:
        notes.append("KV bytes per token unknown for some request configurations; check (a) uses KV tokens.")
    kv_check = _kv_check(log, ok, measured, predicted, kv_bytes)
    prefill_check = _prefill_check(log, ok, measured, predicted)
    level = (float(np.mean(measured[ok]) / np.mean(predicted[ok]))
             if predicted is not None and ok.any() and np.mean(predicted[ok]) > 0 else math.nan)
    engine_level = (float(np.mean(measured[ok]) / np.mean(engine[ok]))
                    if engine is not None and ok.any() and np.mean(engine[ok]) > 0 else math.nan)
    cal = getattr(estimator, "calibration", None)
    if kv_slope_bound is None and cal is not None:
        kv_slope_bound, kv_bound_source = kv_slope_from_calibration(cal), "the calibration's steepest decode slope"
    causes = explain_requests(log.output_tokens, log.prompt_tokens, measured, log.path, kv_slope_bound,
                              kv_bound_source)
    return AnalysisReport(path=log.path, n_requests=len(log), n_decode=int(ok.sum()), buckets=buckets,
                          growth=growth, kv_check=kv_check, prefill_check=prefill_check,
                          has_model=predicted is not None, level_ratio=level, engine_level_ratio=engine_level,
                          serving_loop=loops, loop_share_decode=loop_share_decode,
                          loop_share_total=loop_share_total, notes=notes, causes=causes)


def _serving_loops(estimator: Any) -> dict[str, Any]:
    """Serving-loop terms of the estimator's calibration ({} when it has none or is not an Estimator)."""
    cal = getattr(estimator, "calibration", None)
    if estimator is None or not getattr(estimator, "has_serving_loop", False) or cal is None:
        return {}
    out: dict[str, Any] = {}
    for c in cal.configs:
        lp = c.serving_loop
        if lp is not None:
            out[f"{c.tier_idx},{c.top_k},{c.num_active_blocks}"] = {
                "decode_step_ms": lp.decode_step_ms, "first_step_ms": lp.first_step_ms, "prefill_ms": lp.prefill_ms,
                "n_requests": lp.n_requests, "source": lp.source,
                "first_step_per_token_ms": lp.first_step_per_token_ms, "clamped": list(lp.clamped),
                "prefill_per_token_ms": lp.prefill_per_token_ms}
    return out
