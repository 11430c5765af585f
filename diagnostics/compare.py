"""The seed's estimator options, fitted on one half of a request log and scored on the other.

The seed analysis (../shared/seed-decode-latency-analysis.md) ends with a decision: keep one constant
decode ms/token, take the conservative (largest output-length bucket's) rate x a safety factor 1.2-1.3,
or move to an average, a per-position model, or hybrid early/late rates. This module measures that
decision on a user's own trace. Every strategy predicts a request's total for its real output length n
(point) and reserves point x factor (bound); the budget check is ``bound <= budget``.

Strategies (fitted per logged config (tier_idx, top_k, num_active_blocks), as the seed's estimator
takes those as inputs; a config with fewer than MIN_GROUP_ROWS fit requests uses the pooled fit):

- ``average`` (option 1): mean TTFT and the mean of per-request decode ms/token
  ``(total - ttft) / (n - 1)``; point = ttft + (n - 1) * rate; factor 1.
- ``conservative-1.2`` / ``-1.3`` (option 3, the seed's recommendation): rate = mean per-request ms/token
  of the largest non-empty output-length bucket of the seed's table (2, 3-5, 6-10, 11-20, 21+);
  point = mean TTFT + (n - 1) * rate; factor 1.2 / 1.3 on the whole total.
- ``hybrid`` (option 4): early rate = mean ms/token of requests with n in 2..5 (all their steps are
  tokens 2-5); late rate = mean over requests with n >= 6 of (decode - 4 * early) / (n - 5) (their steps
  after token 5); one rate = early and late weighted by the fit half's share of decode steps that are
  tokens 2-5 vs later; point = mean TTFT + (n - 1) * rate; factor 1.
- ``position`` (option 2): total(n) = prefill(P) + o_p + [n >= 2] c + sum_{j=0}^{n-2} (T(P + j) + o).
  With a calibration: its engine model (from the sweep, never from this log) plus (o, c, o_p) fitted on
  the fit half by ``estimator.fit.fit_loop_terms``. Without one: regression on the fit half with the
  basis T(L) = t0 + t1 L (the seed's "constant + linear") and prefill(P) + o_p = a + b P + q P^2, so
  TTFT = a + b P + q P^2 and decode = c [n >= 2] + (t0 + o)(n - 1) + t1 ((n - 1) P + (n - 1)(n - 2) / 2),
  weighted least squares (weights 1 / (n - 1): a sum of n - 1 noisy steps); c may be negative (a fast
  first step). Factor 1.
- ``trt-latency``: ``position`` x a conformal factor for alpha, both from the fit half only: the
  ceil((m + 1)(1 - alpha))-th smallest of m scores actual/predicted (per config; the pooled factor where
  a config has too few scores for alpha). Scores (``conformal=``):
  ``cross`` (default, cross-conformal): 5 folds of the fit half (round-robin in request_id order within
  each config), each fold scored by position fitted on the other four; the point model is ``position``
  itself (all of the fit half). Each score comes from a model fitted on 80% of the fit half, the bound
  from one fitted on 100%, so the split-conformal guarantee holds only approximately: the worst case
  for cross-conformal / CV+ is 1 - 2 alpha (Barber et al. 2021); the held-out violation rate is measured.
  ``split``: position fitted on alternate fit-half rows, scores from the other rows: exact
  P(actual > bound) <= alpha per config if held-out requests are exchangeable with the fit half, at
  the price of half the fit data for the model.

Scores on the held-out half: ``mape`` (mean |point - actual| / actual), ``violation_rate`` (share with
actual > bound), ``over_reservation`` (mean bound / actual - 1 over requests not missed), and at the
four SLO-class budgets (``loadtest``'s quantiles 0.2, 0.4, 0.6, 0.8, here of the fit half's actual
totals per config, since a log has no prediction-free budgets): ``admitted`` (share of held-out request x
class pairs with bound <= budget) and ``goodput`` (admitted and actual <= budget).

Pure numpy; the calibration path gets engine-only predictions from the Estimator (serving=False).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_latency.diagnostics.buckets import BUCKETS, in_bucket

STRATEGIES: tuple[str, ...] = ("average", "conservative-1.2", "conservative-1.3", "hybrid", "position",
                               "trt-latency")
EARLY_LAST_TOKEN = 5  # the seed's option 4: "first 2-5 tokens" are early, later ones late
SLO_QUANTILES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # loadtest --slo-quantiles default
MIN_GROUP_ROWS = 8  # fewer fit requests in a config: it uses the pooled fit
SPLITS = ("parity", "random")

ConfigKeyT = tuple[int, int, int]


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Columns:
    """What the strategies see of a request log (one entry per request)."""

    request_id: np.ndarray
    prompt: np.ndarray  # P = vision + text tokens
    output_tokens: np.ndarray
    ttft_ms: np.ndarray
    total_ms: np.ndarray
    keys: list[ConfigKeyT]
    engine_prefill_ms: np.ndarray | None = None  # calibration's engine-only prediction (serving=False)
    engine_decode_ms: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.output_tokens.shape[0])

    @classmethod
    def from_log(cls, log: Any, engine: tuple[np.ndarray, np.ndarray] | None = None) -> Columns:
        keys = [(int(t), int(k), int(b)) for t, k, b in zip(log.tier_idx, log.top_k, log.num_active_blocks,
                                                           strict=True)]
        return cls(np.asarray(log.request_id, dtype=np.int64),
                   (np.asarray(log.vision_tokens) + np.asarray(log.text_tokens)).astype(np.float64),
                   np.asarray(log.output_tokens, dtype=np.int64), np.asarray(log.ttft_ms, dtype=np.float64),
                   np.asarray(log.total_ms, dtype=np.float64), keys,
                   None if engine is None else np.asarray(engine[0], dtype=np.float64),
                   None if engine is None else np.asarray(engine[1], dtype=np.float64))

    def take(self, mask: np.ndarray) -> Columns:
        idx = np.flatnonzero(mask)
        return Columns(self.request_id[idx], self.prompt[idx], self.output_tokens[idx], self.ttft_ms[idx],
                       self.total_ms[idx], [self.keys[i] for i in idx],
                       None if self.engine_prefill_ms is None else self.engine_prefill_ms[idx],
                       None if self.engine_decode_ms is None else self.engine_decode_ms[idx])


def split_log(request_id: np.ndarray, how: str = "parity", seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(fit mask, held-out mask, description). parity: even request_id fits (the rule calibrate's
    serving-loop fit uses), odd is held out; random: a seeded random half of the rows fits."""
    rid = np.asarray(request_id, dtype=np.int64)
    if how == "parity":
        fit = rid % 2 == 0
        return fit, ~fit, "request_id parity (fit: even ids, held out: odd ids)"
    if how == "random":
        order = np.random.default_rng(seed).permutation(rid.size)
        fit = np.zeros(rid.size, dtype=bool)
        fit[order[: rid.size // 2]] = True
        return fit, ~fit, f"random half (seed {seed}; fit: {int(fit.sum())} rows, held out: {int((~fit).sum())})"
    raise ValueError(f"split must be one of {SPLITS}, got {how!r}")


def _rate(c: Columns) -> np.ndarray:
    """Per-request decode ms/token (total - ttft) / (n - 1); NaN where n < 2."""
    steps = (c.output_tokens - 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (c.total_ms - c.ttft_ms) / steps
    out[steps < 1] = np.nan
    return out


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


# ------------------------------------------------------------------------------ the seed's options


def fit_average(c: Columns) -> dict[str, float]:
    """Option 1: mean TTFT, mean per-request decode ms/token."""
    return {"ttft_ms": _mean(c.ttft_ms), "ms_per_token": _mean(_rate(c))}


def fit_conservative(c: Columns) -> dict[str, float]:
    """Option 3: mean per-request ms/token of the largest non-empty seed bucket (21+ when present)."""
    rate, n = _rate(c), c.output_tokens
    for _label, lo, hi in reversed(BUCKETS):
        mine = in_bucket(n, lo, hi) & np.isfinite(rate)
        if mine.any():
            return {"ttft_ms": _mean(c.ttft_ms), "ms_per_token": float(rate[mine].mean()), "bucket_from": float(lo)}
    return {"ttft_ms": _mean(c.ttft_ms), "ms_per_token": math.nan, "bucket_from": math.nan}


def fit_hybrid(c: Columns) -> dict[str, float]:
    """Option 4: early rate (tokens 2-5), late rate (tokens 6+), weighted by the share of early steps."""
    n = c.output_tokens
    decode = c.total_ms - c.ttft_ms
    rate = _rate(c)
    early_steps = EARLY_LAST_TOKEN - 1  # tokens 2..5 are the first 4 decode steps
    short = (n >= 2) & (n <= EARLY_LAST_TOKEN)
    long_ = n > EARLY_LAST_TOKEN
    early = float(rate[short].mean()) if short.any() else math.nan
    late = math.nan
    if long_.any():
        # a long request's steps after token 5: its decode minus 4 early steps at the early rate
        base = early if math.isfinite(early) else float(rate[long_].mean())
        late = float(((decode[long_] - early_steps * base) / (n[long_] - EARLY_LAST_TOKEN)).mean())
    if not math.isfinite(early):
        early = late
    if not math.isfinite(late):
        late = early
    steps = np.maximum(n - 1, 0).astype(np.float64)
    e_steps = np.minimum(steps, early_steps)
    weight = float(e_steps.sum() / steps.sum()) if steps.sum() > 0 else 1.0
    return {"ttft_ms": _mean(c.ttft_ms), "early_ms_per_token": early, "late_ms_per_token": late,
            "early_weight": weight, "ms_per_token": weight * early + (1.0 - weight) * late}


def predict_constant(params: Mapping[str, float], c: Columns) -> np.ndarray:
    """ttft + (n - 1) * ms_per_token: every seed option is this with its own rate."""
    steps = np.maximum(c.output_tokens - 1, 0)
    with np.errstate(invalid="ignore"):  # no decode rate (no n >= 2 in the fit): n = 1 still gets its TTFT
        return params["ttft_ms"] + np.where(steps > 0, steps * params["ms_per_token"], 0.0)


# ------------------------------------------------------------------------------ option 2: per position


def _step_sum(c: Columns) -> np.ndarray:
    """sum_{j=0}^{n-2} (P + j) = (n - 1) P + (n - 1)(n - 2) / 2: what t1 multiplies."""
    m = np.maximum(c.output_tokens - 1, 0).astype(np.float64)
    return m * c.prompt + m * (m - 1.0) / 2.0


def _lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with columns scaled to unit max (P^2 next to 1); min-norm when a column is idle."""
    if a.shape[0] == 0:
        return np.zeros(a.shape[1])
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    x = np.linalg.lstsq(a / scale, b, rcond=None)[0]
    return np.asarray(x / scale, dtype=np.float64)


def fit_position_regression(c: Columns) -> dict[str, float]:
    """Option 2 from the requests alone (see the module docstring for the basis)."""
    p = c.prompt
    a, b, q = _lstsq(np.column_stack([np.ones_like(p), p, p * p]), c.ttft_ms)
    dec = c.output_tokens >= 2
    out = {"prefill_a_ms": float(a), "prefill_b_ms": float(b), "prefill_q_ms": float(q),
           "first_step_ms": 0.0, "step_ms": 0.0, "step_per_kv_ms": 0.0}
    if dec.any():
        m = (c.output_tokens[dec] - 1).astype(np.float64)
        w = 1.0 / np.sqrt(m)
        x = np.column_stack([np.ones_like(m), m, _step_sum(c)[dec]])
        first, step, per_kv = _lstsq(x * w[:, None], (c.total_ms - c.ttft_ms)[dec] * w)
        out.update(first_step_ms=float(first), step_ms=float(step), step_per_kv_ms=float(per_kv))
    return out


def fit_position_calibrated(c: Columns) -> dict[str, float]:
    """Option 2 with a calibration: its engine model + serving-loop terms fitted on these rows."""
    from trt_latency.estimator.fit import fit_loop_terms

    assert c.engine_prefill_ms is not None and c.engine_decode_ms is not None
    o, first, o_p = fit_loop_terms(c.output_tokens, (c.total_ms - c.ttft_ms) - c.engine_decode_ms,
                                   c.ttft_ms - c.engine_prefill_ms)
    return {"o_ms": float(o), "c_ms": float(first), "o_p_ms": float(o_p)}


def fit_position(c: Columns) -> dict[str, float]:
    return fit_position_regression(c) if c.engine_prefill_ms is None else fit_position_calibrated(c)


def predict_position(params: Mapping[str, float], c: Columns) -> np.ndarray:
    m = np.maximum(c.output_tokens - 1, 0).astype(np.float64)
    has = (m > 0).astype(np.float64)
    if "o_ms" in params:
        assert c.engine_prefill_ms is not None and c.engine_decode_ms is not None
        return (c.engine_prefill_ms + params["o_p_ms"] + c.engine_decode_ms + has * params["c_ms"]
                + m * params["o_ms"])
    p = c.prompt
    return (params["prefill_a_ms"] + params["prefill_b_ms"] * p + params["prefill_q_ms"] * p * p
            + has * params["first_step_ms"] + m * params["step_ms"] + params["step_per_kv_ms"] * _step_sum(c))


# ------------------------------------------------------------------------------ per config


_FIT = {"average": fit_average, "conservative": fit_conservative, "hybrid": fit_hybrid, "position": fit_position}
_PREDICT = {"average": predict_constant, "conservative": predict_constant, "hybrid": predict_constant,
            "position": predict_position}


def _family(name: str) -> str:
    return "conservative" if name.startswith("conservative") else name


def _conservative_factor(name: str) -> float:
    return float(name.split("-", 1)[1])


@dataclass
class GroupedFit:
    """One strategy family fitted per config (pooled where a config has too few fit rows)."""

    family: str
    per_key: dict[ConfigKeyT, dict[str, float]]
    pooled: dict[str, float]

    def params_for(self, key: ConfigKeyT) -> dict[str, float]:
        return self.per_key.get(key, self.pooled)

    def predict(self, c: Columns) -> np.ndarray:
        out = np.full(len(c), np.nan)
        for key in sorted(set(c.keys)):
            mine = np.array([k == key for k in c.keys])
            out[mine] = _PREDICT[self.family](self.params_for(key), c.take(mine))
        return out


def fit_grouped(family: str, c: Columns) -> GroupedFit:
    per_key: dict[ConfigKeyT, dict[str, float]] = {}
    for key in sorted(set(c.keys)):
        mine = np.array([k == key for k in c.keys])
        if int(mine.sum()) >= MIN_GROUP_ROWS:
            per_key[key] = _FIT[family](c.take(mine))
    return GroupedFit(family, per_key, _FIT[family](c))


def _config_rank(c: Columns) -> np.ndarray:
    """Each row's 0-based rank in request_id order within its config (a fixed, value-blind order)."""
    rank = np.zeros(len(c), dtype=np.int64)
    for key in set(c.keys):
        idx = np.flatnonzero(np.array([k == key for k in c.keys]))
        idx = idx[np.argsort(c.request_id[idx], kind="stable")]
        rank[idx] = np.arange(idx.size)
    return rank


def alternate_halves(c: Columns) -> tuple[np.ndarray, np.ndarray]:
    """(model rows, conformal rows) of a fit half: alternate rows in request_id order within each config."""
    model = _config_rank(c) % 2 == 0
    return model, ~model


@dataclass
class ConformalPart:
    """trt-latency's factor per config (and the pooled one used where a config cannot back alpha)."""

    per_key: dict[ConfigKeyT, float]
    pooled: float
    n_scores: dict[ConfigKeyT, int]

    def factor_for(self, key: ConfigKeyT) -> float:
        f = self.per_key.get(key, math.inf)
        return f if math.isfinite(f) else self.pooled


def _factors(c: Columns, scores: np.ndarray, alpha: float) -> ConformalPart:
    from trt_latency.serving.conformal import conformal_factor

    per_key: dict[ConfigKeyT, float] = {}
    n_scores: dict[ConfigKeyT, int] = {}
    for key in sorted(set(c.keys)):
        mine = np.array([k == key for k in c.keys])
        per_key[key] = conformal_factor(scores[mine], alpha)
        n_scores[key] = int(mine.sum())
    return ConformalPart(per_key, conformal_factor(scores, alpha), n_scores)


CONFORMAL_MODES = ("cross", "split")
CROSS_FOLDS = 5


def fit_trt_latency(c: Columns, alpha: float, mode: str = "cross") -> tuple[GroupedFit, ConformalPart]:
    """(point model, conformal factors) of trt-latency, from the fit half ``c`` only.

    cross (default): the point model is ``position`` fitted on all of ``c``; the scores are out-of-fold
    actual/predicted over CROSS_FOLDS folds of ``c`` (rows dealt round-robin in request_id order within
    each config), each fold predicted by position fitted on the other folds. split: position fitted on
    alternate rows, scores from the other rows.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "split":
            model_rows, conf_rows = alternate_halves(c)
            model = fit_grouped("position", c.take(model_rows))
            held = c.take(conf_rows)
            return model, _factors(held, held.total_ms / model.predict(held), alpha)
        if mode != "cross":
            raise ValueError(f"conformal mode must be one of {CONFORMAL_MODES}, got {mode!r}")
        fold = _config_rank(c) % CROSS_FOLDS
        scores = np.full(len(c), np.nan)
        for k in range(CROSS_FOLDS):
            out = fold == k
            if out.any() and (~out).any():
                part = c.take(out)
                scores[out] = part.total_ms / fit_grouped("position", c.take(~out)).predict(part)
        return fit_grouped("position", c), _factors(c, scores, alpha)


# ------------------------------------------------------------------------------ scores


def slo_budgets(fit: Columns, quantiles: Sequence[float] = SLO_QUANTILES) -> GroupedFit:
    """Per config: the SLO class budgets (ms) = quantiles of the fit half's actual totals."""
    def budgets(c: Columns) -> dict[str, float]:
        return {f"q{q:g}": float(np.quantile(c.total_ms, q)) for q in quantiles}

    per_key = {}
    for key in sorted(set(fit.keys)):
        mine = np.array([k == key for k in fit.keys])
        if int(mine.sum()) >= MIN_GROUP_ROWS:
            per_key[key] = budgets(fit.take(mine))
    return GroupedFit("budgets", per_key, budgets(fit))


def score(actual: np.ndarray, point: np.ndarray, bound: np.ndarray, budgets: np.ndarray) -> dict[str, Any]:
    """Scores of one strategy on held-out requests; budgets is (requests, classes) in ms."""
    actual = np.asarray(actual, dtype=np.float64)
    ok = actual <= bound
    admitted = bound[:, None] <= budgets
    good = admitted & (actual[:, None] <= budgets)
    over = bound[ok] / actual[ok] - 1.0
    return {
        "mape": float(np.mean(np.abs(point - actual) / actual)),
        "violation_rate": float(np.mean(~ok)),
        "over_reservation": float(over.mean()) if over.size else math.nan,
        "admitted": float(admitted.mean()),
        "goodput": float(good.mean()),
        "admitted_by_class": [float(v) for v in admitted.mean(axis=0)],
        "goodput_by_class": [float(v) for v in good.mean(axis=0)],
        "violations": int((~ok).sum()),
    }


def _undefined(scores: dict[str, Any], conf: ConformalPart, alpha: float, mode: str, n_held: int) -> dict[str, Any]:
    """The trt-latency row when the fit half is too small for alpha: no finite factor, so every bound is
    infinite; violation, over-reservation, admitted and goodput are then undefined (not 0% / inf%), and the
    row says how many requests alpha needs."""
    from trt_latency.serving.conformal import min_requests_for

    have, need = sum(conf.n_scores.values()), min_requests_for(alpha)
    per_score = 2 if mode == "split" else 1  # split: half the fit half gives scores; cross: every row does
    reason = (f"no conformal factor at alpha {alpha:g}: the fit half gave {have} scores, alpha {alpha:g} needs at "
              f"least {need} (a fit half of {need * per_score} requests, about {2 * need * per_score} in a log split "
              f"in two); or use alpha >= {1.0 / (have + 1):.3g}" if have else
              f"no conformal factor at alpha {alpha:g}: the fit half gave no scores; alpha {alpha:g} needs at least "
              f"{need}")
    undefined = ("violation_rate", "over_reservation", "admitted", "goodput")
    out = {**scores, **{k: math.nan for k in undefined}, "violations": 0, "undefined": reason,
           "admitted_by_class": [math.nan] * len(scores["admitted_by_class"]),
           "goodput_by_class": [math.nan] * len(scores["goodput_by_class"]), "undefined_requests": n_held}
    return out


def _pct(value: float, width: int) -> str:
    """A share as a percentage; an undefined one (nan, inf) as n/a, never "inf%" or "nan%"."""
    return f"{value * 100:{width - 1}.1f}%" if math.isfinite(value) else f"{'n/a':>{width}}"


# ------------------------------------------------------------------------------ the comparison


@dataclass
class CompareReport:
    split: str
    alpha: float
    n_fit: int
    n_held: int
    position_source: str
    conformal: str
    strategies: dict[str, dict[str, Any]]
    fitted: dict[str, Any]  # every fitted parameter (for the report and the no-leak test)
    oracle_goodput: float
    budgets: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    held_actual: np.ndarray = field(default_factory=lambda: np.zeros(0))
    held_bounds: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers (a factor the data cannot back, nothing to average) become None."""
        return _finite_or_none(self._raw_dict())

    def _raw_dict(self) -> dict[str, Any]:
        return {"split": self.split, "alpha": self.alpha, "strategies": self.strategies,
                "n_fit": self.n_fit, "n_held_out": self.n_held, "position": self.position_source,
                "conformal": self.conformal,
                "oracle_goodput": self.oracle_goodput, "slo_budgets_ms": self.budgets,
                "slo_quantiles": list(SLO_QUANTILES), "fitted": self.fitted, **self.source}

    def format_table(self) -> str:
        lines = []
        if self.source.get("requests"):
            lines.append(f"requests: {self.source['requests']}")
        lines += [f"split: {self.split}; fit {self.n_fit}, held out {self.n_held}",
                  f"position: {self.position_source}",
                  f"trt-latency: {self.conformal}",
                  "SLO budgets: loadtest's class quantiles " + "/".join(f"{q:g}" for q in SLO_QUANTILES)
                  + " of the fit half's actual totals, per config",
                  "",
                  f"{'strategy':<18} {'mape':>7} {'violation':>10} {'over-res':>9} {'admitted':>9} {'goodput':>8}"]
        notes = []
        for name, s in self.strategies.items():
            lines.append(f"{name:<18} {_pct(s['mape'], 7)} {_pct(s['violation_rate'], 10)} "
                         f"{_pct(s['over_reservation'], 9)} {_pct(s['admitted'], 9)} {_pct(s['goodput'], 8)}")
            if s.get("undefined"):
                notes.append(f"{name}: n/a: {s['undefined']}")
            elif not math.isfinite(s["over_reservation"]):
                notes.append(f"{name}: over-res n/a: every held-out request was missed (actual > bound)")
        lines.append(f"{'oracle':<18} {'':>7} {'':>10} {'':>9} {self.oracle_goodput * 100:8.1f}% "
                     f"{self.oracle_goodput * 100:7.1f}%")
        lines.append("(violation = held-out actual > bound; over-res = mean bound/actual - 1 over requests not "
                     "missed; admitted / goodput = share of held-out request x SLO-class pairs admitted / admitted "
                     "and met)")
        lines += notes
        return "\n".join(lines) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _key_label(key: ConfigKeyT) -> str:
    return f"t{key[0]}.k{key[1]}.b{key[2]}"


def _fitted_dict(g: GroupedFit) -> dict[str, Any]:
    return {"pooled": g.pooled, **{_key_label(k): v for k, v in sorted(g.per_key.items())}}


def compare(c: Columns, fit_mask: np.ndarray, held_mask: np.ndarray, alpha: float = 0.05,
            split: str = "", conformal: str = "cross") -> CompareReport:
    """Fit every strategy on ``fit_mask`` rows only, score on ``held_mask`` rows."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    fit, held = c.take(fit_mask), c.take(held_mask)
    if len(fit) == 0 or len(held) == 0:
        raise ValueError("both halves need requests")
    budgets_fit = slo_budgets(fit)
    budgets = np.array([[budgets_fit.params_for(k)[f"q{q:g}"] for q in SLO_QUANTILES] for k in held.keys])
    if budgets.size == 0:
        budgets = np.zeros((0, len(SLO_QUANTILES)))
    fits = {f: fit_grouped(f, fit) for f in ("average", "conservative", "hybrid", "position")}
    tl_model, tl_conf = fit_trt_latency(fit, alpha, conformal)
    strategies: dict[str, dict[str, Any]] = {}
    bounds: dict[str, np.ndarray] = {}
    for name in STRATEGIES:
        if name == "trt-latency":
            point = tl_model.predict(held)
            factor = np.array([tl_conf.factor_for(k) for k in held.keys])
        else:
            point = fits[_family(name)].predict(held)
            factor = np.full(len(held), _conservative_factor(name) if name.startswith("conservative") else 1.0)
        bound = point * factor
        strategies[name] = score(held.total_ms, point, bound, budgets)
        bounds[name] = bound
        if name == "trt-latency" and not np.isfinite(factor).all():
            strategies[name] = _undefined(strategies[name], tl_conf, alpha, conformal, len(held))
    fitted: dict[str, Any] = {f: _fitted_dict(g) for f, g in fits.items()}
    fitted["trt-latency"] = {"position": _fitted_dict(tl_model),
                             "conformal_factor": {"pooled": tl_conf.pooled,
                                                  **{_key_label(k): v for k, v in sorted(tl_conf.per_key.items())}},
                             "conformal_n": {_key_label(k): v for k, v in sorted(tl_conf.n_scores.items())}}
    fitted["slo_budgets_ms"] = _fitted_dict(budgets_fit)
    source = ("the calibration's engine model (sweep data) + serving-loop terms o, c, o_p fitted on the fit half"
              if c.engine_prefill_ms is not None else
              "regression on the fit half: TTFT = a + b P + q P^2, decode = c [n>=2] + s0 (n-1) + t1 sum_j (P+j) "
              "(T(L) = t0 + t1 L)")
    oracle = float((held.total_ms[:, None] <= budgets).mean())
    how = (f"position x cross-conformal factor at alpha {alpha:g} (out-of-fold scores over {CROSS_FOLDS} folds of "
           "the fit half; approximate 1 - alpha, worst case 1 - 2 alpha)" if conformal == "cross" else
           f"position fitted on alternate fit-half rows x split-conformal factor at alpha {alpha:g} from the other "
           "fit-half rows (exact 1 - alpha under exchangeability)")
    return CompareReport(split or "custom", float(alpha), len(fit), len(held), source, how, strategies, fitted, oracle,
                         _fitted_dict(budgets_fit), held_actual=held.total_ms, held_bounds=bounds)


def compare_log(log: Any, estimator: Any = None, alpha: float = 0.05, split: str = "parity",
                seed: int = 0, conformal: str = "cross") -> CompareReport:
    """compare() on a RequestLog; with an Estimator, position uses its engine-only predictions.

    Requests the calibration cannot predict (config or length outside it) take no part; their count is
    in ``source["skipped"]``.
    """
    engine = None
    keep = np.ones(len(log), dtype=bool)
    if estimator is not None:
        pre = np.full(len(log), np.nan)
        dec = np.full(len(log), np.nan)
        for i in range(len(log)):
            try:
                p = estimator.predict(int(log.vision_tokens[i]), int(log.text_tokens[i]), int(log.output_tokens[i]),
                                      tier_idx=int(log.tier_idx[i]), top_k=int(log.top_k[i]),
                                      num_active_blocks=int(log.num_active_blocks[i]) or None, serving=False)
            except Exception:  # noqa: BLE001 - a request the calibration cannot answer takes no part
                continue
            pre[i], dec[i] = p.prefill_ms, p.decode_ms
        engine = (pre, dec)
        keep = np.isfinite(pre) & np.isfinite(dec)
    # split the whole log first: a row's side never depends on which other rows could be predicted
    fit_mask, held_mask, text = split_log(np.asarray(log.request_id), split, seed)
    cols = Columns.from_log(log, engine).take(keep)
    report = compare(cols, fit_mask[keep], held_mask[keep], alpha, text, conformal)
    report.source["skipped"] = int((~keep).sum())
    return report
