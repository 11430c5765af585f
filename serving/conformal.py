"""Split-conformal safety factors from a request log.

For every replayed request the score is ``actual_total / predicted_total`` (the Estimator's
prediction for the request's real lengths). For a miscoverage level alpha the factor is the
``ceil((n + 1) * (1 - alpha))``-th smallest of the n scores of that config: if a new request is
exchangeable with the logged ones, ``actual <= factor * predicted`` holds with probability at least
1 - alpha. So ``admit(..., alpha=)`` states its violation bound instead of guessing 1.2-1.3.

When n is too small for a level (``ceil((n + 1)(1 - alpha)) > n``) the factor is infinite: the
data cannot back that promise, and we record that instead of inventing a number.

Besides the levels asked for, the fit also stores the level 0.5 (the conformal median of the
scores): the AdmissionController measures drift relative to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from trt_latency.errors import RequestLogError
from trt_latency.schema import ConfigKey

DEFAULT_ALPHAS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
CENTER_ALPHA = 0.5  # stored too: the calibration-time median score, the reference for online drift


class _Predictor(Protocol):
    def predict(self, vision_tokens: int, text_tokens: int, output_tokens: int, tier_idx: int = 0,
                top_k: int = 1, num_active_blocks: int | None = None, quantile: float | None = None) -> Any: ...


def conformal_rank(n: int, alpha: float) -> int:
    """1-based rank of the split-conformal quantile among n scores (may exceed n: then no factor)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    # The tiny epsilon keeps float noise (e.g. 20 * 0.95 = 18.999999999999996) from moving the rank.
    return max(1, math.ceil((n + 1) * (1.0 - alpha) - 1e-9))


def conformal_factor(scores: Sequence[float] | np.ndarray, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest score; +inf when n is too small for alpha."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = int(values.size)
    rank = conformal_rank(n, alpha)
    if n == 0 or rank > n:
        return math.inf
    return float(np.partition(values, rank - 1)[rank - 1])


def backed_level(n: int, level: float) -> float:
    """``level``, raised where n scores cannot back it to the smallest level they can (1 / (n + 1)): the
    finite factor nearest the one asked for, for a level that moves online (the controller's)."""
    return max(float(level), 1.0 / (n + 1))


def min_requests_for(alpha: float) -> int:
    """Smallest n for which a finite factor exists at level alpha."""
    n = 1
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class ConformalFit:
    """Conformal factors of one config: ``factors[i]`` goes with ``alphas[i]`` (inf = not enough data)."""

    key: ConfigKey
    alphas: tuple[float, ...]
    factors: tuple[float, ...]
    n: int

    def factor(self, alpha: float) -> float:
        for a, f in zip(self.alphas, self.factors, strict=True):
            if abs(a - alpha) < 1e-12:
                return f
        raise KeyError(f"alpha {alpha} not fitted (have {list(self.alphas)})")

    @property
    def unavailable(self) -> tuple[float, ...]:
        """Levels the data cannot back (n too small): no factor is stored for them."""
        return tuple(a for a, f in zip(self.alphas, self.factors, strict=True) if not math.isfinite(f))

    def as_dict(self) -> dict[str, Any]:
        """The calibration.yaml form ``{alphas, factors, n}``: only levels with a finite factor.

        A level missing from the file while n is stored says "not enough requests for this
        alpha"; the Estimator then has no factor for it rather than an invented one.
        """
        kept = [(a, f) for a, f in zip(self.alphas, self.factors, strict=True) if math.isfinite(f)]
        return {"alphas": [a for a, _ in kept], "factors": [f for _, f in kept], "n": self.n}


def _with_center(alphas: Iterable[float]) -> tuple[float, ...]:
    out = sorted({float(a) for a in alphas} | {CENTER_ALPHA})
    for a in out:
        if not 0.0 < a < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {a!r}")
    return tuple(out)


def fit_scores(key: ConfigKey, scores: Sequence[float] | np.ndarray,
               alphas: Iterable[float] = DEFAULT_ALPHAS) -> ConformalFit:
    """Conformal factors of one config from its scores (non-finite scores are dropped)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    levels = _with_center(alphas)
    return ConformalFit(key=key, alphas=levels, factors=tuple(conformal_factor(values, a) for a in levels),
                        n=int(values.size))


# --- scores from a request log --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RequestScores:
    """Per config: scores (actual / predicted total) in log order, and rows that could not be scored."""

    scores: dict[ConfigKey, np.ndarray]
    skipped: dict[str, int]


def _log_columns(log: Any) -> dict[str, np.ndarray]:
    names = ("vision_tokens", "text_tokens", "output_tokens", "tier_idx", "top_k", "num_active_blocks", "total_ms")
    if isinstance(log, Mapping):
        return {n: np.asarray(log[n]) for n in names}
    return {n: np.asarray(getattr(log, n)) for n in names}


def request_scores(estimator: _Predictor, log: Any) -> RequestScores:
    """Score every request of a log (a RequestLog from estimator.requests or a mapping of columns).

    Config key = (tier_idx, top_k, num_active_blocks) as logged; num_active_blocks 0 means the
    tier's largest measured config (the Estimator's None).
    """
    cols = _log_columns(log)
    per_key: dict[ConfigKey, list[float]] = {}
    skipped: dict[str, int] = {}
    n = int(cols["total_ms"].shape[0])
    for i in range(n):
        blocks = int(cols["num_active_blocks"][i])
        key = ConfigKey(int(cols["tier_idx"][i]), int(cols["top_k"][i]), blocks)
        try:
            pred = estimator.predict(int(cols["vision_tokens"][i]), int(cols["text_tokens"][i]),
                                     int(cols["output_tokens"][i]), tier_idx=key[0], top_k=key[1],
                                     num_active_blocks=blocks or None)
            predicted = float(pred.total_ms)
        except Exception as exc:  # noqa: BLE001 - an unscorable row is counted, never fatal
            skipped[type(exc).__name__] = skipped.get(type(exc).__name__, 0) + 1
            continue
        actual = float(cols["total_ms"][i])
        if not (math.isfinite(predicted) and predicted > 0 and math.isfinite(actual) and actual > 0):
            skipped["non-finite or non-positive prediction"] = skipped.get(
                "non-finite or non-positive prediction", 0) + 1
            continue
        per_key.setdefault(key, []).append(actual / predicted)
    return RequestScores(scores={k: np.asarray(v, dtype=np.float64) for k, v in per_key.items()},
                         skipped=skipped)


def fit_conformal(estimator: _Predictor, log: Any,
                  alphas: Iterable[float] = DEFAULT_ALPHAS) -> dict[ConfigKey, ConformalFit]:
    """Conformal factors per config from every request of the log."""
    levels = tuple(alphas)
    return {key: fit_scores(key, s, levels) for key, s in request_scores(estimator, log).scores.items()}


def coverage_check(estimator: _Predictor, log: Any, alphas: Iterable[float] = DEFAULT_ALPHAS,
                   seed: int = 0) -> dict[str, Any]:
    """Fit on a random half of each config's requests, count violations on the other half.

    Returns ``{"configs": [{key, n_fit, n_check, levels: [{alpha, factor, violation_rate}]}], "skipped"}``.
    The violation rate of a finite factor should be near or below alpha (it is random: with n_check
    requests its standard error is about sqrt(alpha / n_check)).
    """
    levels = tuple(alphas)
    scored = request_scores(estimator, log)
    rng = np.random.default_rng(seed)
    report: list[dict[str, Any]] = []
    for key in sorted(scored.scores):
        s = scored.scores[key]
        order = rng.permutation(s.size)
        half = s.size // 2
        fit_part, check_part = s[order[:half]], s[order[half:]]
        fit = fit_scores(key, fit_part, levels)
        rows = []
        for a in levels:
            f = fit.factor(a)
            rate = float(np.mean(check_part > f)) if check_part.size else math.nan
            rows.append({"alpha": a, "factor": f, "violation_rate": rate})
        report.append({"key": list(key), "n_fit": int(fit_part.size), "n_check": int(check_part.size),
                       "levels": [r for r in rows if r["alpha"] != CENTER_ALPHA]})
    return {"configs": report, "skipped": dict(scored.skipped)}


# --- the calibration file -------------------------------------------------------------------------

def _config_key_of(cfg: Any) -> ConfigKey:
    return ConfigKey(int(cfg.tier_idx), int(cfg.top_k), int(cfg.num_active_blocks))


def attach_conformal(cal: Any, fits: Mapping[ConfigKey, ConformalFit]) -> Any:
    """A copy of the Calibration with ``conformal`` set on every config that has a fit.

    A fit keyed with num_active_blocks 0 (log rows without the column) goes to the tier's config
    with the most blocks and that top_k, which is what the Estimator predicts for such rows.
    """
    configs = list(cal.configs)
    resolved: dict[ConfigKey, ConformalFit] = {}
    for key, fit in fits.items():
        target = key
        if key[2] == 0:
            candidates = [_config_key_of(c) for c in configs if int(c.tier_idx) == key[0] and int(c.top_k) == key[1]]
            if not candidates:
                continue
            target = max(candidates, key=lambda k: k[2])
        # Two logs keys can resolve to one config (0 and the explicit block count): keep the larger sample.
        if target not in resolved or fit.n > resolved[target].n:
            resolved[target] = fit
    from trt_latency.estimator.calibration import with_conformal

    out = cal
    for target, fit in sorted(resolved.items()):
        stored = fit.as_dict()
        if stored["alphas"]:  # with no finite factor at all, nothing can be stated: leave it unset
            out = with_conformal(out, target, stored["alphas"], stored["factors"], stored["n"])
    return out


def calibrate_from_log(calibration_path: str | os.PathLike[str], requests_path: str | os.PathLike[str],
                       out_path: str | os.PathLike[str] | None = None,
                       alphas: Iterable[float] = DEFAULT_ALPHAS, seed: int = 0) -> dict[str, Any]:
    """Fit conformal factors of a calibration from a request log and save them (atomically).

    Returns the coverage report of a held-out split plus the stored factors. ``out_path`` defaults
    to the calibration file itself.
    """
    from trt_latency.estimator.calibration import load_calibration, save_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.estimator.requests import read_requests

    cal = load_calibration(calibration_path)
    estimator = Estimator(cal)
    log = read_requests(requests_path)
    levels = tuple(alphas)
    fits = fit_conformal(estimator, log, levels)
    if not fits:
        raise RequestLogError("no request could be scored against the calibration", path=os.fspath(requests_path))
    coverage = coverage_check(estimator, log, levels, seed=seed)
    save_calibration(attach_conformal(cal, fits), out_path if out_path is not None else calibration_path)
    return {"factors": {",".join(map(str, k)): f.as_dict() for k, f in sorted(fits.items())},
            "coverage": coverage}
