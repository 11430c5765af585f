"""Plots (matplotlib, Agg backend, imported lazily so nothing else pays for it).

- decode.png: per-position decode latency of each measured config: every repetition as faint
  points, the median per position, the fitted piecewise-linear model with its knots, and a quantile band
  (fitted * residual-ratio quantiles); a second panel shows prefill latency vs prompt length with the
  fitted quadratic.
- analyze plot: measured vs predicted decode ms/token per output-token bucket, std error bars.
- batch.png: batched decode step time against the KV it reads (X) for each batch size: measured medians
  of the uniform batches (dots), the ragged batches (crosses) and each size's fitted curve T_B(X).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trt_latency.estimator.analyze import AnalysisReport


@dataclass
class DecodeSeries:
    """What decode.png shows for one measured config."""

    label: str
    past_len: np.ndarray  # one entry per timed repetition
    latency_ms: np.ndarray
    knots: Sequence[float]
    values_ms: Sequence[float]
    residual_quantiles: Mapping[float, float] = field(default_factory=dict)  # q -> measured/fitted ratio
    prefill_len: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prefill_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prefill_coeffs: Sequence[float] | None = None  # a + b*S + c*S^2


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _band(quantiles: Mapping[float, float]) -> tuple[float, float, float, float, float | None, float]:
    """(q_lo, ratio_lo, q_hi, ratio_hi, q_tail, ratio_tail) from the stored residual-ratio quantiles.

    The band runs from the lowest stored quantile to p90 (or the highest below it); the highest
    quantile above that (e.g. p99) is drawn as a dashed line.
    """
    by_q = sorted((float(q), float(v)) for q, v in quantiles.items())
    q_lo, r_lo = by_q[0]
    upper = [qv for qv in by_q if qv[0] <= 0.9 and qv[0] > q_lo] or by_q[-1:]
    q_hi, r_hi = upper[-1]
    q_tail, r_tail = by_q[-1]
    return q_lo, r_lo, q_hi, r_hi, (q_tail if q_tail > q_hi else None), r_tail


def _decode_panel(ax: Any, s: DecodeSeries, color: str) -> None:
    """One config: repetitions, medians, fitted piecewise-linear T(L), knots, residual-quantile band."""
    x = np.asarray(s.past_len, dtype=np.float64)
    y = np.asarray(s.latency_ms, dtype=np.float64)
    ax.scatter(x, y, s=9, alpha=0.3, color=color, linewidths=0, label="repetitions")
    positions = np.unique(x)
    medians = np.array([np.median(y[x == p]) for p in positions])
    ax.plot(positions, medians, "o", ms=4, color=color, mfc="white", mew=1.2, label="median per position")
    knots = np.asarray(s.knots, dtype=np.float64)
    values = np.asarray(s.values_ms, dtype=np.float64)
    top = float(np.quantile(y, 0.95)) if y.size else 0.0
    top = max(top, float(medians.max()) if medians.size else 0.0)
    if knots.size:
        hi = max(float(knots[-1]), float(positions.max()) if positions.size else 0.0)
        grid = np.linspace(0.0, hi, 200)
        fitted = np.interp(grid, knots, values)  # flat beyond the end knots, like the monotone model's clamp
        if len(s.residual_quantiles) >= 2:
            qlo, rlo, qhi, rhi, qtail, rtail = _band(s.residual_quantiles)
            ax.fill_between(grid, fitted * rlo, fitted * rhi, color=color, alpha=0.15, linewidth=0,
                            label=f"fit x p{qlo * 100:g}..p{qhi * 100:g} of measured/fitted")
            if qtail is not None:
                ax.plot(grid, fitted * rtail, "--", lw=0.9, color=color, alpha=0.8,
                        label=f"fit x p{qtail * 100:g}")
        ax.plot(grid, fitted, "-", lw=1.8, color="black", alpha=0.85, label=f"fitted T(L), {knots.size} knots")
        ax.plot(knots, values, "D", ms=6, color=color, mec="black", mew=0.8, label="knots")
        top = max(top, float(values.max()))
    ax.set_title(s.label, fontsize=10)
    ax.set_xlabel("KV-cache position (past_len)")
    ax.set_ylabel("decode step (ms)")
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(0, top * 1.5 if top > 0 else 1.0)  # scaled to the data: a wide band may leave the frame
    ax.legend(fontsize=7, loc="upper left", ncol=2, handlelength=1.6)


def plot_decode(series: Sequence[DecodeSeries], path: str | os.PathLike[str], title: str = "") -> str:
    """Write decode.png: one decode panel per config, prefill vs prompt length beside them."""
    plt = pyplot()
    from matplotlib.gridspec import GridSpec

    n = max(1, len(series))
    dec_cols = 1 if n == 1 else 2
    rows = (n + dec_cols - 1) // dec_cols
    has_prefill = any(s.prefill_len.size for s in series)
    cols = dec_cols + (1 if has_prefill else 0)
    fig = plt.figure(figsize=(5.6 * dec_cols + (4.8 if has_prefill else 0), 4.2 * rows + 0.6))
    grid = GridSpec(rows, cols, figure=fig, width_ratios=[1.4] * dec_cols + ([1.1] if has_prefill else []))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(series):
        _decode_panel(fig.add_subplot(grid[i // dec_cols, i % dec_cols]), s, colors[i % len(colors)])
    if has_prefill:
        ax2 = fig.add_subplot(grid[:, -1])
        for i, s in enumerate(series):
            if not s.prefill_len.size:
                continue
            color = colors[i % len(colors)]
            x = np.asarray(s.prefill_len, dtype=np.float64)
            y = np.asarray(s.prefill_ms, dtype=np.float64)
            ax2.scatter(x, y, s=9, alpha=0.35, color=color, linewidths=0)
            if s.prefill_coeffs is not None:
                a, b, c = (float(v) for v in s.prefill_coeffs)
                g = np.linspace(0, x.max(), 100)
                ax2.plot(g, a + b * g + c * g**2, "-", lw=1.5, color=color, label=s.label)
        ax2.set_xlabel("prompt tokens S")
        ax2.set_ylabel("prefill / TTFT (ms)")
        ax2.set_title("Prefill vs prompt length (fit a + b*S + c*S^2)", fontsize=10)
        ax2.grid(alpha=0.3)
        ax2.set_ylim(bottom=0)
        ax2.set_xlim(left=0)
        ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle(title or "Decode step latency per KV-cache position", fontsize=11)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_analysis(report: AnalysisReport, path: str | os.PathLike[str]) -> str:
    """Measured vs predicted decode ms/token per output-token bucket (error bars = std)."""
    plt = pyplot()
    rows = [b for b in report.buckets if b.count > 0]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    x = np.arange(len(rows), dtype=np.float64)
    width = 0.38 if report.has_model else 0.6
    meas = np.array([b.measured_mean for b in rows])
    meas_err = np.nan_to_num(np.array([b.measured_std for b in rows]))
    ax.bar(x - (width / 2 if report.has_model else 0), meas, width, yerr=meas_err, capsize=4,
           label="measured (request log)", color="#4c72b0", alpha=0.85)
    if report.has_model:
        pred = np.array([b.predicted_mean for b in rows])
        pred_err = np.nan_to_num(np.array([b.predicted_std for b in rows]))
        ax.bar(x + width / 2, pred, width, yerr=pred_err, capsize=4,
               label="predicted (calibrated per-position model)", color="#dd8452", alpha=0.85)
    ax.set_xticks(x, [f"{b.label}\n(n={b.count})" for b in rows])
    ax.set_xlabel("output tokens")
    ax.set_ylabel("decode ms/token (mean ± std)")
    title = "Decode ms/token by output length"
    g = report.growth
    if g is not None and report.has_model:
        title += f"\nKV-explained share of the growth {g.first} -> {g.last}: {g.share_text()}"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    top = np.nanmax(np.concatenate([meas + meas_err] + ([pred + pred_err] if report.has_model else [])))
    ax.set_ylim(0, top * 1.22)  # headroom so the legend never covers a bar
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def decode_series(samples: Any, cal: Any) -> list[DecodeSeries]:
    """One DecodeSeries per calibrated config from Samples (estimator.samples) and a Calibration."""
    out: list[DecodeSeries] = []
    for cfg in cal.configs:
        same = ((samples.tier_idx == cfg.tier_idx) & (samples.top_k == cfg.top_k)
                & (samples.num_active_blocks == cfg.num_active_blocks))
        same &= samples.batch <= 1  # batched rows have their own plot (batch.png)
        dec = same & (samples.phase == "decode") & (samples.new_tokens == 1)
        pre = same & (samples.phase == "prefill")
        out.append(DecodeSeries(
            label=f"t{cfg.tier_idx} k{cfg.top_k} b{cfg.num_active_blocks}",
            past_len=samples.past_len[dec], latency_ms=samples.latency_ms[dec],
            knots=list(cfg.decode_knots), values_ms=list(cfg.decode_values_ms),
            residual_quantiles=dict(cfg.residual_quantiles),
            prefill_len=samples.new_tokens[pre], prefill_ms=samples.latency_ms[pre],
            prefill_coeffs=list(cfg.prefill_coeffs),
        ))
    return out


def plot_calibration(samples: Any, cal: Any, path: str | os.PathLike[str], title: str = "") -> str:
    """decode.png for a calibration and the samples it was fitted from."""
    return plot_decode(decode_series(samples, cal), path, title=title)


def plot_causes(report: Any, path: str | os.PathLike[str]) -> str:
    """A bucket table's measured ms/token (error bars: the sigma it was weighted with, else none) at each
    bucket's mean n, beside each cause's per-n curve and its bucket averages (estimator.causes.CauseReport)."""
    from trt_latency.estimator.causes import CAUSES, per_n_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    x = np.asarray(report.mean_n, dtype=np.float64)
    y = np.asarray(report.measured, dtype=np.float64)
    err = np.asarray(report.errors, dtype=np.float64)
    lo = np.asarray([r[0] for r in report.bucket_ranges], dtype=np.float64)
    hi = np.asarray([r[1] for r in report.bucket_ranges], dtype=np.float64)
    ax.errorbar(x, y, yerr=None if not np.isfinite(err).any() else np.nan_to_num(err),
                xerr=[x - lo, hi - x], fmt="o", color="black", ms=6, capsize=4, elinewidth=1.2, zorder=5,
                label="measured (bar: n range; whisker: " + ("SE" if report.known_scale else "std") + ")")
    grid = np.unique(np.round(np.geomspace(2, max(3.0, float(hi.max())), 200)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(c for c in CAUSES if c in report.hypotheses):
        h = report.hypotheses[name]
        color = colors[i % len(colors)]
        curve = per_n_curve(name, h.params, report.prompt_tokens or 0.0)
        score = f"{report.criterion} {h.score:.1f}" if h.score is not None else "not scored"
        mark = "" if h.plausible else ", implausible"
        ax.plot(grid, curve(grid), "-" if h.plausible else ":", lw=2.2 if name == report.best else 1.3,
                color=color, label=f"{name} ({score}{mark})" + (" = best" if name == report.best else ""))
        ax.plot(x, h.predicted, "s", ms=5, mfc="white", mec=color, mew=1.3)
    ax.set_xscale("log")
    ticks = sorted({int(v) for v in lo} | {int(hi[-1])})
    ax.set_xticks(ticks, [str(t) for t in ticks])  # where each bucket starts (and the last ends), plain numbers
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("output tokens n (log; ticks where buckets start); squares: each cause's bucket average")
    ax.set_ylabel("decode ms/token")
    ax.set_title(f"Which cause explains the buckets? best: {report.best or 'none'}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    top = float(np.nanmax(y + np.nan_to_num(err)))
    ax.set_ylim(0, top * 1.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_batch(samples: Any, cal: Any, path: str | os.PathLike[str], title: str = "") -> str | None:
    """batch.png: per config with a batch section, step ms vs X per batch size with the fit; None if none."""
    from trt_latency.estimator.batch_fit import batch_rows

    configs = [c for c in cal.configs if c.batch is not None]
    if not configs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 5), squeeze=False)
    for ax, cfg in zip(axes[0], configs, strict=True):
        section = cfg.batch
        packed = section["kv_read"] == "packed"
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        m = batch_rows(samples, cfg.key)
        b = samples.batch[m]
        kv_max, kv_total = np.asarray(samples.kv_max)[m], np.asarray(samples.kv_total)[m]
        x = kv_total if packed else b * kv_max
        uniform = kv_total == b * kv_max
        single = ((samples.tier_idx == cfg.tier_idx) & (samples.top_k == cfg.top_k) & (samples.batch <= 1)
                  & (samples.num_active_blocks == cfg.num_active_blocks) & (samples.phase == "decode")
                  & (samples.new_tokens == 1))
        for i, (size, curve) in enumerate(zip(section["sizes"], section["curves"], strict=True)):
            color = colors[i % len(colors)]
            if size == 1:
                xs_all, ys_all, rag = samples.past_len[single], samples.latency_ms[single], np.zeros(0, dtype=bool)
            else:
                sel = b == size
                xs_all, ys_all, rag = x[sel], samples.latency_ms[m][sel], ~uniform[sel]
            for kind, keep, marker in (("uniform", ~rag if rag.size else np.ones(xs_all.shape, bool), "o"),
                                       ("ragged", rag, "x")):
                if not keep.any():
                    continue
                ux = np.unique(xs_all[keep])
                med = [float(np.median(ys_all[keep][xs_all[keep] == v])) for v in ux]
                ax.scatter(ux, med, s=18, color=color, marker=marker,
                           label=f"B={size} measured" + (" (ragged)" if kind == "ragged" else ""))
            knots = np.asarray(curve["knots_x"], dtype=np.float64)
            if knots.size > 1:  # the fit over its own knots (piecewise linear: the knots are the line)
                ax.plot(knots, curve["values_ms"], color=color, lw=1.5, marker="|", label=f"T_{size}(X) fit")
        err = section.get("fit_error", {})
        note = ", ".join(f"{k.split('_')[0]} {float(err[k]):.1%}" for k in
                         ("lopo_median_rel", "lobo_median_rel", "ragged_median_rel") if err.get(k) is not None)
        ax.set_title(f"t{cfg.tier_idx} k{cfg.top_k} b{cfg.num_active_blocks}: median held-out error {note}",
                     fontsize=9)
        ax.set_xlabel("KV tokens read per step, X = " + ("sum L (packed)" if packed else "B * max L (padded)"))
        ax.set_ylabel("decode step (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
