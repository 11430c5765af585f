"""Which cause explains a rise of decode ms/token with output length? Four competing causes, fitted and compared.

A request with prompt P and n output tokens has n - 1 decode steps (the first output token comes from the
prefill). Each cause predicts a different shape of ms/token against n:

- ``constant``:   every step costs R                                     -> R
- ``counting``:   every step costs R, but the decode time was divided by n (output tokens) instead of n - 1
                  (decode steps)                                         -> R (n - 1) / n
- ``first_step``: the first decode step costs R + c (warm-up c > 0, overlap c < 0) -> R + c / (n - 1)
- ``kv_growth``:  step j reads P + j KV positions and costs a + b (P + j), b >= 0  -> a + b (P + (n - 2) / 2)
                  (the mean KV length of the n - 1 steps; the issue's P + n / 2 differs by a constant b that
                  a absorbs). Only a + b P is identified by a table without prompts: P moves a, never b.

Inputs are either a bucket table (output-token buckets ``2``, ``3-5``, ``21+`` with the mean ms/token of the
requests in each, optional std and count) or per-request data (n, P, ms/token) from a request log. A table's
bucket holds requests whose n spreads over the bucket's range; each request contributes its own ms/token to
the bucket mean, so a cause predicts the bucket mean as the average of its per-n formula over the bucket's n
(assumed uniform over the integers of the range; an open last bucket ``21+`` needs an assumed upper end).

Every cause is linear in its parameters once the per-n features are averaged, so each is a weighted least-
squares fit (kv_growth constrained to b >= 0). Causes are compared by AICc (BIC when there are too few
buckets for AICc's correction to exist), and kv_growth's b is checked against what the engine can pay: the
calibration's steepest decode slope in ms per KV token, or a stated default bound.

Pure numpy: no plotting, engine or CLI imports here.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_latency.diagnostics.buckets import parse_bucket
from trt_latency.errors import InputError

CAUSES = ("constant", "counting", "first_step", "kv_growth")
PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "constant": ("R",), "counting": ("R",), "first_step": ("R", "c"), "kv_growth": ("a", "b")}
TABLE_COLUMNS = ("output_tokens", "ms_per_token", "std", "count")
# Open last bucket "21+": n taken uniform over lo .. OPEN_UPPER_FACTOR * lo unless --open-upper says otherwise.
OPEN_UPPER_FACTOR = 4
# Default KV-slope bound without a calibration: 1 MB of K+V per token read at 1000 GB/s = 1e-3 ms per KV token.
# A 70B-class model with grouped-query attention in fp16 holds ~0.33 MB per token, and current GPUs read
# 1.5-4.8 TB/s, so this is a generous ceiling; it is an assumption, not a measurement.
DEFAULT_KV_BYTES_PER_TOKEN = 1.0e6
DEFAULT_BANDWIDTH_GB_S = 1000.0
# kv_growth is plausible while b (less 2 standard errors when known) is at most this multiple of the bound.
SLOPE_TOLERANCE = 2.0
# An Akaike/BIC difference below this is "about as good" (Burnham & Anderson).
CLOSE_SCORE = 2.0

NEXT_MEASUREMENT = {
    "constant": ("nothing beyond noise is needed: collect more requests per bucket (smaller standard errors) "
                 "before looking for a cause"),
    "counting": ("recompute ms/token as (total - ttft) / (n - 1), i.e. per decode step, not per output token: "
                 "if the rise disappears, it was the division; if short requests stay cheaper per step, their "
                 "first decode step is (first_step)"),
    "first_step": ("time the first decode step after the prefill separately from the later steps (one "
                   "timestamp per step): its excess over the others is c"),
    "kv_growth": ("measure decode ms/token at fixed n across prompt lengths (the prompt sets the KV length): "
                  "if it does not rise with P by about b per token, it is not the KV cache"),
}


# ---- the bucket table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    label: str
    lo: int
    hi: int  # inclusive; for an open bucket the assumed upper end
    open: bool
    mean: float
    std: float = math.nan
    count: int | None = None

    def ns(self) -> np.ndarray:
        return np.arange(self.lo, self.hi + 1, dtype=np.float64)

    def range_text(self) -> str:
        if self.open:
            return f"{self.lo}-{self.hi}*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass
class BucketTable:
    path: str
    buckets: list[Bucket]
    has_std: bool
    has_count: bool


def read_bucket_table(path: str | os.PathLike[str], open_upper: int | None = None) -> BucketTable:
    """Read TABLE.csv (output_tokens, ms_per_token[, std][, count]); one-line InputError on anything malformed."""
    where = os.fspath(path)
    try:
        with open(where, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError("file not found", path=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read ({exc})", path=where) from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError("empty file", path=where, expected="a header output_tokens,ms_per_token[,std][,count]")
    header = [h.strip() for h in rows[0]]
    for name in header:
        if name not in TABLE_COLUMNS:
            raise InputError("unknown column", path=where, row=1, field=name,
                             expected="columns output_tokens, ms_per_token, optional std and count")
    for name in ("output_tokens", "ms_per_token"):
        if name not in header:
            raise InputError("missing column", path=where, row=1, field=name,
                             expected="columns output_tokens, ms_per_token, optional std and count")
    if len(set(header)) != len(header):
        raise InputError("duplicate column", path=where, row=1, expected="each column once", got=",".join(header))
    col = {name: header.index(name) for name in header}
    buckets: list[Bucket] = []
    data = rows[1:]
    if len(data) < 2:
        raise InputError("too few buckets", path=where, expected="at least 2 bucket rows", got=len(data))
    for i, raw in enumerate(data):
        row = i + 2  # file line: the header is row 1
        if len(raw) != len(header):
            raise InputError(path=where, row=row, expected=f"{len(header)} cells like the header", got=len(raw))

        def cell(name: str, raw: list[str] = raw) -> str:
            return raw[col[name]].strip()

        label = cell("output_tokens")
        try:
            lo, hi = parse_bucket(label)
        except ValueError:
            raise InputError(path=where, row=row, field="output_tokens",
                             expected="a bucket like 2, 3-5 or 21+ (low <= high)", got=label) from None
        if lo < 2:
            raise InputError("a request needs >= 2 output tokens to have a decode step", path=where, row=row,
                             field="output_tokens", expected="a bucket starting at 2 or more", got=label)
        is_open = hi is None
        if is_open and i != len(data) - 1:
            raise InputError(path=where, row=row, field="output_tokens",
                             expected="an open bucket (N+) only in the last row", got=label)
        if hi is None:
            hi = open_upper if open_upper is not None else OPEN_UPPER_FACTOR * lo
            if hi < lo:
                raise InputError(path=where, row=row, field="output_tokens",
                                 expected=f"--open-upper >= the open bucket's start {lo}", got=hi)
        if buckets and lo <= buckets[-1].hi and not buckets[-1].open:
            raise InputError(path=where, row=row, field="output_tokens",
                             expected=f"buckets in ascending order, not overlapping (previous ends at "
                                      f"{buckets[-1].hi})", got=label)
        mean = _float(cell("ms_per_token"), where, row, "ms_per_token", "a finite ms/token > 0", positive=True)
        std = math.nan
        if "std" in col:
            std = _float(cell("std"), where, row, "std", "a finite std > 0 (it sets the weight)", positive=True)
        count: int | None = None
        if "count" in col:
            text = cell("count")
            try:
                count = int(text)
            except ValueError:
                count = 0
            if count < 1:
                raise InputError(path=where, row=row, field="count", expected="an integer >= 1", got=text)
        buckets.append(Bucket(label, lo, int(hi), is_open, mean, std, count))
    return BucketTable(where, buckets, "std" in col, "count" in col)


def _float(text: str, path: str, row: int, column: str, expected: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (positive and value <= 0):
        raise InputError(path=path, row=row, field=column, expected=expected, got=text)
    return value


# ---- the causes -----------------------------------------------------------------------------------


def _features(name: str, n: np.ndarray, prompt: np.ndarray | float) -> np.ndarray:
    """Per-request design rows of a cause at output lengths n (>= 2): shape (len(n), n_params)."""
    n = np.asarray(n, dtype=np.float64)
    if name == "constant":
        return np.ones((n.size, 1))
    if name == "counting":
        return ((n - 1.0) / n)[:, None]
    if name == "first_step":
        return np.column_stack([np.ones(n.size), 1.0 / (n - 1.0)])
    if name == "kv_growth":
        return np.column_stack([np.ones(n.size), np.asarray(prompt, dtype=np.float64) + (n - 2.0) / 2.0])
    raise ValueError(name)


def per_n_curve(name: str, params: dict[str, float], prompt_tokens: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """ms/token of one request of n output tokens under a fitted cause (for plots)."""
    theta = np.asarray([params[p] for p in PARAM_NAMES[name]], dtype=np.float64)

    def curve(n: np.ndarray) -> np.ndarray:
        return _features(name, np.asarray(n, dtype=np.float64), prompt_tokens) @ theta

    return curve


@dataclass
class Hypothesis:
    name: str
    params: dict[str, float]
    param_se: dict[str, float]
    predicted: list[float]  # per bucket (table) or per request
    residuals: list[float]  # measured - predicted, ms/token
    rss: float  # weighted residual sum of squares (chi^2 when the weights are 1/SE^2)
    n_params: int
    score: float | None  # AICc or BIC (lower is better); None: too few data points to score
    plausible: bool
    why: str  # why (not) plausible
    delta: float | None = None  # score - best score
    akaike_weight: float | None = None  # exp(-delta / 2), normalised over the scored causes (AICc or BIC)

    def params_text(self) -> str:
        parts = []
        for k, v in self.params.items():
            unit = " ms/KV token" if k == "b" else " ms"
            se = self.param_se.get(k, math.nan)
            parts.append(f"{k} = {_num(v)}" + (f" ± {_num(se)}" if math.isfinite(se) else "") + unit)
        return ", ".join(parts)


@dataclass
class CauseReport:
    source: str  # "table" or "requests"
    path: str
    labels: list[str]  # bucket labels (table) or [] (requests)
    ranges: list[str]
    measured: list[float]
    errors: list[float]  # the sigma each point was weighted with (NaN: equal weights)
    weights: str  # how points were weighted, in words
    known_scale: bool  # True when weights are 1/SE^2 (the score is chi^2 based)
    criterion: str  # "AICc" or "BIC"
    prompt_tokens: float | None  # the P assumed for a table (None: per-request P)
    kv_slope_bound: float  # ms per KV token the engine can pay
    bound_source: str
    hypotheses: dict[str, Hypothesis]
    best: str | None
    verdict: str
    next_measurement: str
    mean_n: list[float] = field(default_factory=list)  # mean n per bucket (plots)
    bucket_ranges: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float | np.floating):
                f = float(v)
                return f if math.isfinite(f) else None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v

        hyps = {}
        for name, h in self.hypotheses.items():
            hyps[name] = {
                "params": h.params, "param_se": h.param_se, "n_params": h.n_params, "score": h.score,
                "delta": h.delta, "akaike_weight": h.akaike_weight, "plausible": h.plausible, "why": h.why,
                "weighted_rss": h.rss,
                "residuals": h.residuals if self.source == "table" else None,
                "predicted": h.predicted if self.source == "table" else None,
                "residual_rms": _rms(h.residuals),
            }
        out: dict[str, Any] = {
            "source": self.source, "path": self.path, "hypotheses": hyps, "best": self.best,
            "weights": self.weights, "criterion": self.criterion, "prompt_tokens": self.prompt_tokens,
            "kv_slope_bound_ms_per_token": self.kv_slope_bound, "kv_slope_bound_source": self.bound_source,
            "verdict": self.verdict, "next_measurement": self.next_measurement, "notes": list(self.notes),
        }
        if self.source == "table":
            out["buckets"] = [{"label": lab, "n_range": rng, "measured": m, "sigma": e}
                              for lab, rng, m, e in zip(self.labels, self.ranges, self.measured, self.errors,
                                                        strict=True)]
        else:
            out["n_requests"] = len(self.measured)
        return clean(out)  # type: ignore[no-any-return]

    def format_table(self) -> str:
        lines: list[str] = []
        order = [n for n in CAUSES if n in self.hypotheses]
        if self.source == "table":
            lines.append(f"Bucket table: {self.path} ({len(self.labels)} buckets)")
            lines.append(_wrap(f"Weights: {self.weights}. Score: {self.criterion} (lower is better; it charges "
                               "for each parameter). n is taken uniform over the integers of each bucket"
                               + ("; * = open bucket, upper end assumed (--open-upper)." if
                                  any(r.endswith("*") for r in self.ranges) else ".")))
            lines.append("")
            spread = "SE" if self.known_scale else "std" if any(math.isfinite(e) for e in self.errors) else ""
            lines.append("Residual per bucket = measured - cause (ms/token):")
            head = f"{'output tokens':>13}  {'n range':>8}  {'measured' + (' ± ' + spread if spread else ''):>17}"
            for name in order:
                head += f"  {name:>10}"
            lines.append(head)
            lines.append("-" * len(head))
            for k, lab in enumerate(self.labels):
                err = self.errors[k]
                meas = f"{self.measured[k]:.2f}" + (f" ± {err:.2f}" if math.isfinite(err) else "")
                row = f"{lab:>13}  {self.ranges[k]:>8}  {meas:>17}"
                for name in order:
                    row += f"  {self.hypotheses[name].residuals[k]:>+10.2f}"
                lines.append(row)
            lines.append("")
        else:
            lines.append(f"Causes on the per-request data ({len(self.measured)} requests, decode ms/token = "
                         "(total - ttft) / (n - 1)):")
            lines.append(_wrap(f"Weights: {self.weights}. Score: {self.criterion} (lower is better; it charges "
                               "for each parameter). counting: cannot occur here, ms/token is computed from the "
                               "logged ttft and total per decode step."))
        head = f"{'cause':<11}  {'parameters':<54}  {'rms resid':>9}  {self.criterion:>9}  {'delta':>6}  {self.criterion + ' wt':>8}  plausible"
        lines.append(head)
        lines.append("-" * len(head))
        for name in order:
            h = self.hypotheses[name]
            score = f"{h.score:.2f}" if h.score is not None else "-"
            delta = f"{h.delta:.2f}" if h.delta is not None else "-"
            weight = f"{h.akaike_weight:.2f}" if h.akaike_weight is not None else "-"
            lines.append(f"{name:<11}  {h.params_text():<54}  {_rms(h.residuals):>9.3f}  {score:>9}  {delta:>6}  "
                         f"{weight:>8}  {'yes' if h.plausible else 'no'}")
        lines.append("")
        for name in order:
            h = self.hypotheses[name]
            if h.why:
                lines.append(_wrap(f"{name}: {h.why}", indent="  "))
        for note in self.notes:
            lines.append(_wrap("Note: " + note))
        lines.append(_wrap("Verdict: " + self.verdict))
        lines.append(_wrap("Measure next: " + self.next_measurement))
        return "\n".join(lines) + "\n"


# ---- fitting ---------------------------------------------------------------------------------------


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Weighted least squares: (theta, weighted RSS, inverse normal matrix (X'WX)^-1)."""
    sw = np.sqrt(w)
    theta, *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
    r = y - x @ theta
    rss = float(np.sum(w * r * r))
    try:
        inv = np.linalg.inv((x * w[:, None]).T @ x)
    except np.linalg.LinAlgError:
        inv = np.full((x.shape[1], x.shape[1]), np.nan)
    return theta, rss, inv


def _fit_one(name: str, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(theta, (X'WX)^-1, weighted RSS); kv_growth constrained to b >= 0."""
    theta, rss, inv = _wls(x, y, w)
    if name == "kv_growth" and theta[1] < 0:
        # b >= 0: a longer KV cache cannot make a step cheaper; the constrained optimum sits on b = 0.
        t0, rss, inv0 = _wls(x[:, :1], y, w)
        theta = np.array([t0[0], 0.0])
        inv = np.array([[inv0[0, 0], 0.0], [0.0, np.nan]])
    return theta, inv, rss


def _score(rss: float, m: int, k: int, known_scale: bool, criterion: str, floor: float) -> float | None:
    """AICc / BIC of a Gaussian fit with k parameters (plus the noise scale when it is not known)."""
    kk = k if known_scale else k + 1
    if m < kk + 1:  # no degree of freedom left: the fit is exact for any data, nothing to compare
        return None
    base = rss if known_scale else m * math.log(max(rss, floor) / m)
    if criterion == "BIC":
        return base + kk * math.log(m)
    return base + 2 * kk + 2 * kk * (kk + 1) / (m - kk - 1)


def _criterion(m: int, known_scale: bool) -> str:
    """AICc when its small-sample correction exists for every cause (m >= K + 2), else BIC."""
    k_max = 2 if known_scale else 3
    return "AICc" if m >= k_max + 2 else "BIC"


def _plausibility(name: str, params: dict[str, float], se: dict[str, float], bound: float, bound_source: str,
                  prompt: float | None) -> tuple[bool, str]:
    if name in ("constant", "counting"):
        ok = params["R"] > 0
        return ok, "" if ok else "R <= 0: a decode step cannot take negative time."
    if name == "first_step":
        r, c = params["R"], params["c"]
        if r <= 0 or r + c < 0:
            return False, (f"the steps would cost R = {_num(r)} ms and the first R + c = {_num(r + c)} ms; "
                           "a step cannot take negative time.")
        return True, (f"first decode step {_num(r + c)} ms, later steps {_num(r)} ms "
                      f"({'slower' if c > 0 else 'faster'} first step).")
    a, b = params["a"], params["b"]
    b_se = se.get("b", math.nan)
    b_low = b - 2.0 * b_se if math.isfinite(b_se) else b
    limit = SLOPE_TOLERANCE * bound
    p_text = "the per-request prompt" if prompt is None else f"P = {_num(prompt)}"
    if b <= 0:
        return True, "b = 0 (at its bound): no KV growth in this data, kv_growth reduces to constant."
    if b_low > limit:
        ratio = b / bound if bound > 0 else math.inf
        return False, (f"b = {_num(b)} ms per KV token is {_ratio(ratio)} the slope the engine can pay "
                       f"({_num(bound)} ms per KV token, {bound_source}); allowed up to {SLOPE_TOLERANCE:g}x. "
                       "A rise this steep is not KV reads.")
    if a < 0:  # a is the step cost at KV length 0 (the features carry P)
        return False, (f"with {p_text} the step at KV length 0 would cost a = {_num(a)} ms < 0.")
    if b > limit:
        return True, (f"b = {_num(b)} ms per KV token is {_ratio(b / bound if bound > 0 else math.inf)} the bound "
                      f"{_num(bound)} ({bound_source}), but within 2 standard errors (± {_num(b_se)}) of a slope the "
                      "engine can pay: not ruled out.")
    return True, (f"b = {_num(b)} ms per KV token is within {SLOPE_TOLERANCE:g}x the bound {_num(bound)} "
                  f"({bound_source}).")


def _compare(design: Callable[[str], np.ndarray], y: np.ndarray, w: np.ndarray, known_scale: bool,
             prompt_tokens: float | None, bound: float, bound_source: str,
             causes: Sequence[str]) -> tuple[dict[str, Hypothesis], str, str | None]:
    m = y.size
    criterion = _criterion(m, known_scale)
    floor = 1e-24 * max(1.0, float(np.sum(w * y * y)))
    designs = {name: design(name) for name in causes}
    fits = {name: (x, *_fit_one(name, x, y, w)) for name, x in designs.items()}
    if known_scale:
        scale = 1.0
    else:
        # Noise level for the standard errors: the smallest residual variance of any cause (a cause that does
        # not fit would otherwise inflate its own errors with its lack of fit and look "consistent" with anything).
        per_cause = [rss / (m - len(theta)) for _x, theta, _inv, rss in fits.values() if m > len(theta)]
        scale = min(per_cause) if per_cause else math.nan
    hyps: dict[str, Hypothesis] = {}
    for name, (x, theta, inv, rss) in fits.items():
        names = PARAM_NAMES[name]
        params = {p: float(v) for p, v in zip(names, theta, strict=True)}
        se = {p: float(math.sqrt(max(float(inv[i, i]), 0.0) * scale)) if math.isfinite(float(inv[i, i]))
              else math.nan for i, p in enumerate(names)}
        pred = x @ theta
        score = _score(rss, m, len(params), known_scale, criterion, floor)
        ok, why = _plausibility(name, params, se, bound, bound_source, prompt_tokens)
        hyps[name] = Hypothesis(name, params, se, [float(v) for v in pred], [float(v) for v in y - pred], rss,
                                len(params), score, ok, why)
    scored = {n: h.score for n, h in hyps.items() if h.score is not None}
    if scored:
        lo = min(scored.values())
        rel = {n: math.exp(-(s - lo) / 2.0) for n, s in scored.items()}
        total = sum(rel.values())
        for n, s in scored.items():
            hyps[n].delta = s - lo
            hyps[n].akaike_weight = rel[n] / total
    eligible = [n for n in causes if hyps[n].plausible and hyps[n].score is not None]
    best = min(eligible, key=lambda n: hyps[n].score or 0.0) if eligible else None
    return hyps, criterion, best


def _verdict(hyps: dict[str, Hypothesis], best: str | None, criterion: str, known_scale: bool, m: int) -> str:
    if best is None:
        return ("No cause is both scorable and physically plausible with this data (too few points, or every "
                "fit needs a negative step time or an impossible KV slope).")
    h = hyps[best]
    text = f"{best} explains the data best ({h.params_text()}; {criterion} {h.score:.2f})."
    close = [n for n, o in hyps.items() if n != best and o.plausible and o.delta is not None
             and o.delta - (h.delta or 0.0) < CLOSE_SCORE]
    if close:
        text += (" About as good (" + criterion + " within " + f"{CLOSE_SCORE:g}): " + ", ".join(close)
                 + "; the measurement below tells them apart.")
    else:
        near = [o.name for n, o in hyps.items() if n != best and o.plausible and _rms(o.residuals)
                <= 1.5 * _rms(h.residuals) and o.n_params > h.n_params]
        if near:
            text += (f" {', '.join(near)} fit{'s' if len(near) == 1 else ''} nearly as closely (rms residual "
                     + ", ".join(f"{_rms(hyps[n].residuals):.3g}" for n in near)
                     + f" vs {_rms(h.residuals):.3g} ms) but pay{'s' if len(near) == 1 else ''} for an extra "
                     "parameter; the measurement below tells them apart.")
        runner = [] if near else sorted((o for n, o in hyps.items() if n != best and o.score is not None and o.plausible),
                        key=lambda o: o.score or 0.0)
        if runner:
            text += f" Next plausible: {runner[0].name} ({criterion} +{(runner[0].score or 0) - (h.score or 0):.1f})."
    implausible = [n for n, o in hyps.items() if not o.plausible and o.delta is not None and o.delta < (h.delta or 0)]
    for n in implausible:
        text += f" {n} fits better numerically ({criterion} {hyps[n].score:.2f}) but is not physically plausible."
    if known_scale and m > h.n_params:
        red = h.rss / (m - h.n_params)
        if red > 3.0:
            text += (f" Even {best} leaves chi^2/dof = {red:.1f} (> 3): the buckets differ by more than their "
                     "standard errors allow, so more than one cause may be at work.")
    return text


# ---- entry points ---------------------------------------------------------------------------------


def kv_slope_from_calibration(cal: Any) -> float:
    """The steepest decode slope of any calibrated config, ms per KV token (from the decode knots)."""
    best = 0.0
    for cfg in getattr(cal, "configs", []):
        k = np.asarray(cfg.decode_knots, dtype=np.float64)
        v = np.asarray(cfg.decode_values_ms, dtype=np.float64)
        if k.size >= 2:
            dk = np.diff(k)
            good = dk > 0
            if good.any():
                best = max(best, float(np.max(np.diff(v)[good] / dk[good])))
    return best


def default_kv_bound(kv_bytes_per_token: float = DEFAULT_KV_BYTES_PER_TOKEN,
                     bandwidth_gb_s: float = DEFAULT_BANDWIDTH_GB_S) -> tuple[float, str]:
    bound = kv_bytes_per_token / (bandwidth_gb_s * 1e9) * 1e3
    return bound, (f"assumed: {kv_bytes_per_token:.3g} bytes of KV per token read at {bandwidth_gb_s:g} GB/s; "
                   "pass -c CAL for the engine's measured slope")


def table_weights(table: BucketTable) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(sigma per bucket, weights, description, known scale)."""
    std = np.asarray([b.std for b in table.buckets])
    if table.has_std and table.has_count:
        sigma = std / np.sqrt(np.asarray([b.count or 1 for b in table.buckets], dtype=np.float64))
        return sigma, 1.0 / sigma**2, ("1/SE^2 with SE = std/sqrt(count) (the noise level is known: the score "
                                       "is chi^2 based)"), True
    if table.has_std:
        return std, 1.0 / std**2, ("1/std^2 (no count column: equal counts assumed, relative weights only, the "
                                   "noise level is estimated from the fit)"), False
    return np.full(std.size, math.nan), np.ones(std.size), "equal (no std column)", False


def explain_table(table: BucketTable, prompt_tokens: float = 0.0, kv_slope_bound: float | None = None,
                  bound_source: str = "") -> CauseReport:
    """Fit every cause to a bucket table, score them, check plausibility, name the best."""
    if kv_slope_bound is None:
        kv_slope_bound, bound_source = default_kv_bound()
    sigma, w, wtext, known = table_weights(table)
    y = np.asarray([b.mean for b in table.buckets])
    ns = [b.ns() for b in table.buckets]

    def design(name: str) -> np.ndarray:
        # A bucket's feature = the mean of the per-n feature over the n it holds: each request contributes its
        # own ms/token to the bucket mean, and every cause is linear in its parameters.
        return np.vstack([_features(name, n, float(prompt_tokens)).mean(axis=0) for n in ns])

    hyps, criterion, best = _compare(design, y, w, known, float(prompt_tokens), kv_slope_bound, bound_source,
                                     CAUSES)
    notes = [f"kv_growth assumes P = {_num(prompt_tokens)} prompt tokens (--prompt-tokens): a table without "
             "prompts fixes only a + b*P, so P moves a and nothing else (not b, the residuals or the score)."]
    if any(b.open for b in table.buckets):
        ob = table.buckets[-1]
        notes.append(f"Open bucket {ob.label} taken as n = {ob.lo}..{ob.hi} (--open-upper; default "
                     f"{OPEN_UPPER_FACTOR}x its start).")
    m = y.size
    unscored = [n for n, h in hyps.items() if h.score is None]
    if unscored:
        notes.append(f"{', '.join(unscored)}: as many parameters as the {m} buckets allow, so they fit any table "
                     "and are not scored.")
    verdict = _verdict(hyps, best, criterion, known, m)
    nxt = NEXT_MEASUREMENT[best] if best else "more buckets (or a request log) before any cause can be tested"
    return CauseReport("table", table.path, [b.label for b in table.buckets], [b.range_text() for b in table.buckets],
                       [float(v) for v in y], [float(s) for s in sigma], wtext, known, criterion,
                       float(prompt_tokens), float(kv_slope_bound), bound_source, hyps, best, verdict, nxt,
                       mean_n=[float(n.mean()) for n in ns], bucket_ranges=[(b.lo, b.hi) for b in table.buckets],
                       notes=notes)


def explain_requests(output_tokens: np.ndarray, prompt_tokens: np.ndarray, ms_per_token: np.ndarray, path: str = "",
                     kv_slope_bound: float | None = None, bound_source: str = "") -> CauseReport | None:
    """The causes that can occur in a request log (constant, first_step, kv_growth), fitted per request.

    ``counting`` cannot occur: the log's ms/token is (total - ttft) / (n - 1), per decode step. Requests are
    weighted equally (one request, one ms/token); None when fewer than 5 requests have a decode step.
    """
    n = np.asarray(output_tokens, dtype=np.float64)
    p = np.asarray(prompt_tokens, dtype=np.float64)
    y = np.asarray(ms_per_token, dtype=np.float64)
    ok = np.isfinite(y) & (n >= 2)
    if int(ok.sum()) < 5:
        return None
    if kv_slope_bound is None:
        kv_slope_bound, bound_source = default_kv_bound()
    n, p, y = n[ok], p[ok], y[ok]
    causes = ("constant", "first_step", "kv_growth")
    hyps, criterion, best = _compare(lambda name: _features(name, n, p), y, np.ones(y.size), False, None,
                                     kv_slope_bound, bound_source, causes)
    verdict = _verdict(hyps, best, criterion, False, y.size)
    nxt = NEXT_MEASUREMENT[best] if best else "more requests"
    if best == "kv_growth":
        nxt = ("check (b) above, at fixed n across prompt lengths: ms/token should rise with P by about b per "
               "token, and b should match the engine's calibrated slope (-c CAL)")
    return CauseReport("requests", path, [], [], [float(v) for v in y], [], "equal (one point per request)",
                       False, criterion, None, float(kv_slope_bound), bound_source, hyps, best, verdict, nxt,
                       notes=[])


# ---- small helpers --------------------------------------------------------------------------------


def _rms(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.sqrt(np.mean(a * a))) if a.size else math.nan


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    if v == 0:
        return "0"
    mag = abs(v)
    if mag >= 100:
        return f"{v:.1f}"
    if mag >= 0.1:
        return f"{v:.3g}" if mag < 10 else f"{v:.2f}"
    return f"{v:.3g}"


def _ratio(r: float) -> str:
    return "inf x" if not math.isfinite(r) else f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=110, initial_indent=indent, subsequent_indent=indent + "  ")
