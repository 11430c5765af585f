"""analyze's plots (matplotlib through trt_latency.plots.pyplot, imported on first use).

- a request log: measured vs predicted decode ms/token per output-token bucket, std error bars;
- a bucket table (analyze --table): the measured buckets beside each cause's per-n curve.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from trt_latency.diagnostics.causes import CAUSES, CauseReport, per_n_curve
from trt_latency.plots import pyplot

if TYPE_CHECKING:
    from trt_latency.diagnostics.analyze import AnalysisReport


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


def plot_causes(report: CauseReport, path: str | os.PathLike[str]) -> str:
    """A bucket table's measured ms/token (error bars: the sigma it was weighted with, else none) at each
    bucket's mean n, beside each cause's per-n curve and its bucket averages (diagnostics.causes.CauseReport)."""
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
