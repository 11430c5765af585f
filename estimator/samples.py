"""samples.csv -> numpy columns (no pandas: the estimator side stays light).

One row per timed repetition. `fit` needs phase, past_len, new_tokens and latency_ms; the config
columns (tier_idx, top_k, num_active_blocks) default to 0 and batch to 1 when absent; the batch metadata
kv_max / kv_total (batched decode rows) default to past_len / batch * past_len.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from trt_latency.errors import SamplesError
from trt_latency.formats import SAMPLES_REQUIRED, samples_records
from trt_latency.schema import SAMPLES_COLUMNS, ConfigKey

__all__ = ["SAMPLES_COLUMNS", "Samples", "concat_samples", "read_samples", "samples_from_rows"]

REQUIRED_COLUMNS = SAMPLES_REQUIRED
INT_COLUMNS = ("tier_idx", "top_k", "num_active_blocks", "batch", "past_len", "new_tokens", "rep")
_INT_DEFAULTS = {"tier_idx": 0, "top_k": 0, "num_active_blocks": 0, "batch": 1, "rep": 0}
PHASES = ("decode", "prefill")
_MAX_INT = 1 << 40
_KV_META = ("kv_total", "kv_max")  # optional batch metadata; -1 while parsing = absent (filled from past_len)


@dataclass
class Samples:
    """Columns of equal length; `phase` holds 'decode' / 'prefill'."""

    tier_idx: np.ndarray
    top_k: np.ndarray
    num_active_blocks: np.ndarray
    batch: np.ndarray
    phase: np.ndarray
    past_len: np.ndarray
    new_tokens: np.ndarray
    rep: np.ndarray
    latency_ms: np.ndarray
    backend: list[str] = field(default_factory=list)
    device: list[str] = field(default_factory=list)
    kv_mode: list[str] = field(default_factory=list)  # "concat" / "shared" ("" in files written before it)
    source: str = ""
    kv_total: np.ndarray | None = None  # sum of the batch's past lengths (None: batch * past_len)
    kv_max: np.ndarray | None = None  # max of the batch's past lengths (None: past_len)

    def __post_init__(self) -> None:
        if self.kv_max is None:
            self.kv_max = np.asarray(self.past_len, dtype=np.int64).copy()
        if self.kv_total is None:
            self.kv_total = np.asarray(self.past_len, dtype=np.int64) * np.asarray(self.batch, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.latency_ms.shape[0])

    def configs(self) -> list[ConfigKey]:
        keys = {ConfigKey(int(t), int(k), int(b)) for t, k, b in zip(self.tier_idx, self.top_k, self.num_active_blocks, strict=True)}
        return sorted(keys)


def _parse_int(text: str, path: str, row: int, column: str) -> int:
    s = text.strip()
    try:
        value = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise SamplesError(path=path, row=row, field=column, expected="an integer", got=text) from None
        if not math.isfinite(f) or f != int(f):
            raise SamplesError(path=path, row=row, field=column, expected="an integer", got=text) from None
        value = int(f)
    if not 0 <= value <= _MAX_INT:
        raise SamplesError(path=path, row=row, field=column, expected=f"an integer in [0, {_MAX_INT}]", got=text)
    return value


def _parse_latency(text: str, path: str, row: int) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise SamplesError(path=path, row=row, field="latency_ms", expected="a finite number > 0", got=text) from None
    if not math.isfinite(value) or value <= 0.0:
        raise SamplesError(path=path, row=row, field="latency_ms", expected="a finite number > 0", got=text)
    return value


def samples_from_rows(rows: Iterable[dict[str, object]], source: str = "") -> Samples:
    """Build Samples from already-typed dicts (e.g. trtexec import); values are checked like a CSV."""
    cols: dict[str, list[object]] = {c: [] for c in SAMPLES_COLUMNS}
    for i, r in enumerate(rows, start=1):
        for c in INT_COLUMNS:
            cols[c].append(_parse_int(str(r.get(c, _INT_DEFAULTS.get(c, 0))), source, i, c))
        phase = str(r.get("phase", ""))
        if phase not in PHASES:
            raise SamplesError(path=source, row=i, field="phase", expected="'decode' or 'prefill'", got=phase)
        cols["phase"].append(phase)
        cols["latency_ms"].append(_parse_latency(str(r.get("latency_ms", "")), source, i))
        cols["backend"].append(str(r.get("backend", "")))
        cols["device"].append(str(r.get("device", "")))
        cols["kv_mode"].append(str(r.get("kv_mode", "")))
        for c in _KV_META:
            cols[c].append(_parse_int(str(r[c]), source, i, c) if r.get(c, "") != "" else -1)
    return _to_samples(cols, source)


def _to_samples(cols: dict[str, list[object]], source: str) -> Samples:
    ints = {c: np.asarray(cols[c], dtype=np.int64) for c in INT_COLUMNS}
    meta = {c: np.asarray(cols[c], dtype=np.int64) for c in _KV_META}
    fill = {"kv_max": ints["past_len"], "kv_total": ints["past_len"] * ints["batch"]}
    for c in _KV_META:
        meta[c] = np.where(meta[c] < 0, fill[c], meta[c]) if meta[c].size else fill[c].copy()
    return Samples(
        tier_idx=ints["tier_idx"],
        top_k=ints["top_k"],
        num_active_blocks=ints["num_active_blocks"],
        batch=ints["batch"],
        phase=np.asarray(cols["phase"], dtype=object).astype(str) if cols["phase"] else np.zeros(0, dtype="<U7"),
        past_len=ints["past_len"],
        new_tokens=ints["new_tokens"],
        rep=ints["rep"],
        latency_ms=np.asarray(cols["latency_ms"], dtype=np.float64),
        backend=[str(x) for x in cols["backend"]],
        device=[str(x) for x in cols["device"]],
        kv_mode=[str(x) for x in cols["kv_mode"]],
        source=source,
        kv_total=meta["kv_total"],
        kv_max=meta["kv_max"],
    )


def read_samples(path: str | os.PathLike[str]) -> Samples:
    """Parse samples.csv. Errors are SamplesError naming the file, the row (1 = header) and the column."""
    p = os.fspath(path)
    cols: dict[str, list[object]] = {c: [] for c in SAMPLES_COLUMNS}
    records = samples_records(p)  # the one reader and version policy (trt_latency/formats.py)
    _, names = next(records)
    index = {name: i for i, name in enumerate(names)}
    for rowno, row in records:
        for c in INT_COLUMNS:
            if c in index:
                cols[c].append(_parse_int(row[index[c]], p, rowno, c))
            else:
                cols[c].append(_INT_DEFAULTS.get(c, 0))
        phase = row[index["phase"]].strip()
        if phase not in PHASES:
            raise SamplesError(path=p, row=rowno, field="phase", expected="'decode' or 'prefill'", got=phase)
        cols["phase"].append(phase)
        cols["latency_ms"].append(_parse_latency(row[index["latency_ms"]], p, rowno))
        cols["backend"].append(row[index["backend"]].strip() if "backend" in index else "")
        cols["device"].append(row[index["device"]].strip() if "device" in index else "")
        cols["kv_mode"].append(row[index["kv_mode"]].strip() if "kv_mode" in index else "")
        for c in _KV_META:
            text = row[index[c]].strip() if c in index else ""
            cols[c].append(_parse_int(text, p, rowno, c) if text else -1)
    if not cols["latency_ms"]:
        raise SamplesError("no data rows", path=p, expected="at least one sample row")
    return _to_samples(cols, p)


def concat_samples(parts: Iterable[Samples]) -> Samples:
    """One Samples from several (e.g. a samples.csv plus trtexec files)."""
    items = list(parts)
    if len(items) == 1:
        return items[0]
    arrays = {
        name: np.concatenate([getattr(s, name) for s in items])
        for name in ("tier_idx", "top_k", "num_active_blocks", "batch", "phase", "past_len", "new_tokens", "rep",
                     "latency_ms")
    }  # fmt: skip
    return Samples(
        **arrays,
        backend=[b for s in items for b in s.backend],
        device=[d for s in items for d in s.device],
        kv_mode=[m for s in items for m in (s.kv_mode or [""] * len(s))],
        source=",".join(s.source for s in items if s.source),
        kv_total=np.concatenate([np.asarray(s.kv_total) for s in items]),
        kv_max=np.concatenate([np.asarray(s.kv_max) for s in items]),
    )
