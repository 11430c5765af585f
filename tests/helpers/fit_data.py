"""Synthetic samples from a known piecewise-linear truth, and trtexec --exportTimes files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

POSITIONS = sorted(set(np.unique(np.round(np.geomspace(1, 4096, 10)).astype(int)).tolist()
                       + np.linspace(0, 4096, 11)[1:].astype(int).tolist()))


def truth(past_len: np.ndarray | float, blocks: int = 4, top_k: int = 1) -> np.ndarray:
    """Flat-ish (overhead bound) up to 1638, then steeper (bandwidth bound): a kink at a measured position."""
    L = np.asarray(past_len, dtype=float)
    base = 0.3 + 0.1 * blocks * (1 + 0.3 * top_k)
    return base + 5e-5 * blocks * L + 1.5e-4 * blocks * np.maximum(L - 1638, 0.0)


def synthetic_rows(noise: float = 0.01, outliers: float = 0.05, reps: int = 7, seed: int = 0,
                   configs: tuple = ((0, 1, 4),), fn=truth) -> list[dict]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    rows = []
    for tier, top_k, blocks in configs:
        for L in POSITIONS:
            for rep in range(reps):
                v = float(fn(L, blocks, top_k)) * (1 + noise * rng.standard_normal())
                if rng.random() < outliers:
                    v *= rng.uniform(1.5, 4.0)  # preemption / page-fault spikes
                rows.append({"tier_idx": tier, "top_k": top_k, "num_active_blocks": blocks, "phase": "decode",
                             "past_len": L, "new_tokens": 1, "rep": rep, "latency_ms": v})
        for s in (8, 32, 64, 128, 256, 512, 1024):
            for rep in range(3):
                v = (0.5 + 0.01 * s + 2e-6 * s * s) * blocks / 4 * (1 + noise * rng.standard_normal())
                rows.append({"tier_idx": tier, "top_k": top_k, "num_active_blocks": blocks, "phase": "prefill",
                             "past_len": 0, "new_tokens": s, "rep": rep, "latency_ms": v})
    return rows


def export_times(path: Path, compute_ms: list[float]) -> Path:
    # The layout trtexec --exportTimes writes: one object per inference (ms).
    t, entries = 0.0, []
    for ms in compute_ms:
        entries.append({"startInMs": t, "endInMs": t + 0.01, "startComputeMs": t + 0.01, "endComputeMs": t + 0.01 + ms,
                        "startOutMs": t + 0.01 + ms, "endOutMs": t + 0.02 + ms, "inMs": 0.01, "computeMs": ms,
                        "outMs": 0.01, "latencyMs": ms + 0.02, "endToEndMs": ms + 0.02})
        t += ms + 0.05
    path.write_text(json.dumps(entries, indent=2))
    return path

