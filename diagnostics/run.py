"""The diagnostics from files, as the verbs call them: each entry point takes an options dataclass (the
field names are the flags'), reads the request log or bucket table and the calibration, runs the
diagnostic, writes the plot, and returns the report; the verb only parses and prints.

- ``run_analyze(AnalyzeOptions) -> Analysis``: a request log (diagnostics.analyze) or a bucket table
  (diagnostics.causes), with the calibration it was compared against;
- ``run_compare(CompareOptions) -> CompareReport``: the seed's options fitted on one half of a request log
  and scored on the other (diagnostics.compare).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trt_latency.diagnostics.causes import DEFAULT_BANDWIDTH_GB_S, DEFAULT_KV_BYTES_PER_TOKEN
from trt_latency.schema import ConfigKey


def _from_namespace(cls: Any, ns: Any) -> Any:
    return cls(**{f: getattr(ns, f) for f in cls.__dataclass_fields__ if hasattr(ns, f)})


@dataclass(frozen=True)
class AnalyzeOptions:
    """``analyze``: one of ``requests`` (a request log) or ``table`` (a bucket table)."""

    requests: str | None = None
    table: str | None = None
    calibration: str | None = None  # calibration.yaml to compare with
    plot: str | None = None  # PNG to write
    prompt_tokens: float = 0.0  # table: prompt tokens assumed for kv_growth
    open_upper: int | None = None  # table: upper end of an open last bucket
    kv_bytes_per_token: float = DEFAULT_KV_BYTES_PER_TOKEN  # without a calibration: the kv_growth slope bound's
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GB_S

    @classmethod
    def from_namespace(cls, ns: Any) -> AnalyzeOptions:
        return _from_namespace(cls, ns)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Analysis:
    """What ``analyze`` prints: the report (AnalysisReport or, for a table, CauseReport) and the calibration
    it was compared against (None without one)."""

    report: Any
    calibration: Any = None


@dataclass(frozen=True)
class CompareOptions:
    """``compare``: the request log, the calibration (optional), alpha, the split and the conformal mode."""

    requests: str
    calibration: str | None = None
    alpha: float = 0.05
    split: str = "parity"
    seed: int = 0
    conformal: str = "cross"
    plot: str | None = None

    @classmethod
    def from_namespace(cls, ns: Any) -> CompareOptions:
        return _from_namespace(cls, ns)  # type: ignore[no-any-return]


def kv_bytes_from_calibration(cal: Any) -> dict[ConfigKey, float]:
    """Bytes per KV token of each calibrated config (2 * blocks * kv_heads * head_dim * dtype size)."""
    out: dict[ConfigKey, float] = {}
    for cfg in cal.configs:
        value = getattr(cfg, "kv_bytes_per_token", None)
        if value:
            out[ConfigKey(int(cfg.tier_idx), int(cfg.top_k), int(cfg.num_active_blocks))] = float(value)
    return out


def _kv_bound(options: AnalyzeOptions, cal: Any) -> tuple[float, str]:
    """ms per KV token the engine can pay: the calibration's steepest decode slope, else the assumed bound."""
    from trt_latency.diagnostics.causes import default_kv_bound, kv_slope_from_calibration

    if cal is not None:
        return kv_slope_from_calibration(cal), f"the steepest decode slope of {options.calibration}"
    return default_kv_bound(options.kv_bytes_per_token, options.bandwidth_gbs)


def _write_plot(plot: Callable[[Any, str], Any], report: Any, path: str) -> None:
    try:
        plot(report, path)
    except OSError as exc:
        from trt_latency.errors import InputError

        raise InputError(f"cannot write the plot ({exc.strerror or exc})", path=path,
                         expected="a writable PNG path in an existing folder") from None


def run_analyze(options: AnalyzeOptions) -> Analysis:
    """The request log's bucket table, growth share, checks and causes, or the bucket table's causes."""
    if (options.requests is None) == (options.table is None):
        raise ValueError("analyze takes one of a request log (requests) and a bucket table (table)")
    if options.table is not None:
        return _table(options)
    from trt_latency.diagnostics.analyze import analyze
    from trt_latency.estimator.requests import read_requests

    log = read_requests(options.requests, require_decode=True)  # the log's errors before the calibration's
    cal = _calibration(options)
    estimator = None
    kv_bytes: dict[ConfigKey, float] | None = None
    source: dict[str, Any] = {}
    if cal is not None:
        from trt_latency.estimator.model import Estimator

        estimator = Estimator(cal)
        kv_bytes = kv_bytes_from_calibration(cal) or None
        prov = dict(getattr(cal, "provenance", {}) or {})
        desc = ", ".join(str(prov[k]) for k in ("backend", "device") if prov.get(k))
        source = {"calibration": str(options.calibration) + (f" ({desc})" if desc else ""),
                  "provenance": {k: v for k, v in prov.items() if isinstance(v, str | int | float)}}
    bound, bound_source = _kv_bound(options, cal)
    report = analyze(log, estimator, kv_bytes, kv_slope_bound=bound, kv_bound_source=bound_source)
    report.source.update(source)
    if options.plot:
        from trt_latency.diagnostics.plot_analyze import plot_analysis

        _write_plot(plot_analysis, report, options.plot)
        report.source["plot"] = os.fspath(options.plot)
    return Analysis(report, cal)


def _calibration(options: AnalyzeOptions) -> Any:
    if not options.calibration:
        return None
    from trt_latency.estimator.calibration import load_calibration

    return load_calibration(options.calibration)


def _table(options: AnalyzeOptions) -> Analysis:
    from trt_latency.diagnostics.causes import explain_table, read_bucket_table

    assert options.table is not None
    table = read_bucket_table(options.table, open_upper=options.open_upper)
    cal = _calibration(options)
    bound, source = _kv_bound(options, cal)
    report = explain_table(table, prompt_tokens=options.prompt_tokens, kv_slope_bound=bound, bound_source=source)
    if options.plot:
        from trt_latency.diagnostics.plot_analyze import plot_causes

        _write_plot(plot_causes, report, options.plot)
    return Analysis(report, cal)


def run_compare(options: CompareOptions) -> Any:
    """The CompareReport of a request log (with the calibration's engine model when one is given)."""
    from trt_latency.diagnostics.compare import compare_log
    from trt_latency.errors import InputError
    from trt_latency.estimator.requests import read_requests

    log = read_requests(options.requests)
    estimator = None
    if options.calibration:
        from trt_latency.estimator.calibration import load_calibration
        from trt_latency.estimator.model import Estimator

        estimator = Estimator(load_calibration(options.calibration))
    try:
        report = compare_log(log, estimator, alpha=options.alpha, split=options.split, seed=options.seed,
                             conformal=options.conformal)
    except ValueError as exc:
        raise InputError(str(exc), path=options.requests,
                         expected="requests on both sides of the split (and predictable by the calibration)") from None
    report.source["requests"] = os.fspath(options.requests)
    if options.calibration:
        report.source["calibration"] = os.fspath(options.calibration)
    if options.plot:
        from trt_latency.diagnostics.plot_compare import plot_compare

        _write_plot(plot_compare, report, options.plot)
        report.source["plot"] = os.fspath(options.plot)
    return report
