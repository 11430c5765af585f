"""compare plot: each strategy's bound vs the held-out request's actual total, one panel per strategy.

On the diagonal the bound is exact; above it the request fits with that much reserved in vain; below
it (red) the request missed its bound. Shared log axes, so panels compare at a glance.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from trt_latency.plots import pyplot

if TYPE_CHECKING:
    from trt_latency.serving.compare import CompareReport


def plot_compare(report: CompareReport, path: str | os.PathLike[str]) -> str:
    plt = pyplot()
    names = list(report.held_bounds)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), sharex=True, sharey=True, squeeze=False)
    actual = np.asarray(report.held_actual, dtype=np.float64)
    finite = [b[np.isfinite(b) & (b > 0)] for b in report.held_bounds.values()]
    lo = float(min([actual.min()] + [b.min() for b in finite if b.size])) * 0.9
    hi = float(max([actual.max()] + [b.max() for b in finite if b.size])) * 1.1
    for ax, name in zip(axes.flat, names, strict=False):
        bound = np.asarray(report.held_bounds[name], dtype=np.float64)
        miss = actual > bound
        s = report.strategies[name]
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.9, label="bound = actual")
        ax.scatter(actual[~miss], np.clip(bound[~miss], lo, hi), s=8, alpha=0.45, color="#4c72b0", linewidths=0,
                   label="fits (above: reserved in vain)")
        ax.scatter(actual[miss], np.clip(bound[miss], lo, hi), s=14, alpha=0.9, color="#c44e52", linewidths=0,
                   label="missed its bound")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{name}\nmissed {s['violation_rate'] * 100:.1f}%  over-reserved {s['over_reservation'] * 100:.0f}%"
                     f"  goodput {s['goodput'] * 100:.0f}%", fontsize=9)
        ax.grid(alpha=0.25, which="both")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("actual total (ms, held out)")
    for ax in axes[:, 0]:
        ax.set_ylabel("strategy's bound (ms)")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Bound vs actual per strategy (split: {report.split}; alpha {report.alpha:g})", fontsize=10)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
