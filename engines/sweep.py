"""Runner + plan -> samples.csv: per-position step timings, appended as measured, resumable.

Order: repetition rounds; inside a round every (phase, past_len, new_tokens) is visited once in a
seeded shuffled order, so slow machine drift spreads over all positions instead of masquerading as
position dependence. Each visit warms up at its shape (the first run after a shape change pays for
allocation) and then times one repetition; its row is appended, flushed and fsync'ed at once.

Resume: a rerun reads samples.csv, repairs a partial trailing line (a run killed mid-write) and
measures only the (phase, past_len, new_tokens, rep) rows missing for that config.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trt_latency.engines.base import Runner
from trt_latency.engines.config import Plan, SweepSpec, TierSpec
from trt_latency.errors import SamplesError
from trt_latency.schema import SAMPLES_COLUMNS, ConfigKey

BATCH = 1


class PlannedRow(NamedTuple):
    phase: str  # "decode" | "prefill"
    past_len: int
    new_tokens: int
    rep: int


@dataclass(frozen=True)
class SweepResult:
    path: Path
    key: ConfigKey
    rows_planned: int
    rows_written: int
    rows_skipped: int  # already present (resume)
    seconds: float
    positions: tuple[int, ...]
    prefill_lengths: tuple[int, ...]


def decode_positions(max_past_len: int, log_points: int, linear_points: int) -> list[int]:
    """Sorted, deduplicated past lengths: a geometric grid 1..max (dense where the curve bends) plus a
    linear grid up to max (even coverage for the fit); always contains 1, 2, 4 (when <= max) and max."""
    if max_past_len < 1:
        raise ValueError(f"max_past_len must be >= 1, got {max_past_len}")
    points = {1, max_past_len}
    points.update(p for p in (2, 4) if p <= max_past_len)
    if log_points >= 2:
        points.update(int(round(v)) for v in np.geomspace(1, max_past_len, log_points))
    if linear_points >= 1:
        points.update(int(round(v)) for v in np.linspace(max_past_len / linear_points, max_past_len, linear_points))
    return sorted(p for p in points if 1 <= p <= max_past_len)


def prefill_lengths(tier: TierSpec, sweep: SweepSpec, max_new_tokens: int | None = None) -> list[int]:
    cap = tier.max_prefill_len if max_new_tokens is None else min(tier.max_prefill_len, max_new_tokens)
    return sorted(s for s in sweep.prefill.lengths if s <= cap)


def plan_rows(tier: TierSpec, sweep: SweepSpec, max_past_len: int | None = None,
              max_new_tokens: int | None = None) -> list[PlannedRow]:
    """Every row one config's sweep must produce (natural order; the measuring order is shuffled)."""
    cap = tier.max_past_len if max_past_len is None else min(tier.max_past_len, max_past_len)
    rows = [PlannedRow("decode", p, 1, r)
            for p in decode_positions(cap, sweep.decode.log_points, sweep.decode.linear_points)
            for r in range(sweep.decode.reps)]
    rows += [PlannedRow("prefill", 0, s, r) for s in prefill_lengths(tier, sweep, max_new_tokens)
             for r in range(sweep.prefill.reps)]
    return rows


def measurement_order(rows: list[PlannedRow], seed: int, key: ConfigKey) -> list[PlannedRow]:
    """Rounds by rep; inside each round a seeded shuffle over shapes (decode and prefill mixed)."""
    rng = np.random.default_rng([seed, key.tier_idx, key.top_k, key.num_active_blocks])
    by_rep: dict[int, list[PlannedRow]] = {}
    for row in sorted(rows):
        by_rep.setdefault(row.rep, []).append(row)
    ordered: list[PlannedRow] = []
    for rep in sorted(by_rep):
        group = by_rep[rep]
        ordered.extend(group[i] for i in rng.permutation(len(group)))
    return ordered


def repair_trailing_line(path: Path) -> bool:
    """Cut a partial last line (no newline: the writer was killed mid-row). True if something was cut."""
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        # Scan back for the last newline in chunks.
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = pos + idx + 1
                break
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _int_field(text: str, path: Path, row: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SamplesError(path=str(path), row=row, field=column, expected="an integer", got=text) from None


def read_done(path: Path, key: ConfigKey, backend: str | None = None) -> set[PlannedRow]:
    """Rows already in samples.csv for ``key`` (after repairing a partial trailing line)."""
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    repair_trailing_line(path)
    text = path.read_text(encoding="utf-8")
    if not text:
        return set()
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    if tuple(h.strip() for h in header) != SAMPLES_COLUMNS:
        raise SamplesError("cannot resume into a file with another header", path=str(path), row=0,
                           expected=",".join(SAMPLES_COLUMNS), got=",".join(header))
    idx = {c: i for i, c in enumerate(SAMPLES_COLUMNS)}
    done: set[PlannedRow] = set()
    for n, rec in enumerate(reader, start=1):
        if not rec:
            continue
        if len(rec) != len(SAMPLES_COLUMNS):
            raise SamplesError(path=str(path), row=n, expected=f"{len(SAMPLES_COLUMNS)} fields", got=len(rec))
        cfg = tuple(_int_field(rec[idx[c]], path, n, c) for c in ("tier_idx", "top_k", "num_active_blocks", "batch"))
        if cfg != (*key, BATCH):
            continue
        if backend is not None and rec[idx["backend"]] != backend:
            raise SamplesError(f"rows of config {tuple(key)} were measured with backend {rec[idx['backend']]!r}; "
                               "mixing backends in one file would corrupt the fit (use another output)",
                               path=str(path), row=n, field="backend", expected=backend, got=rec[idx["backend"]])
        phase = rec[idx["phase"]]
        if phase not in ("decode", "prefill"):
            raise SamplesError(path=str(path), row=n, field="phase", expected="decode or prefill", got=phase)
        done.add(PlannedRow(phase, _int_field(rec[idx["past_len"]], path, n, "past_len"),
                            _int_field(rec[idx["new_tokens"]], path, n, "new_tokens"),
                            _int_field(rec[idx["rep"]], path, n, "rep")))
    return done


def measure_once(runner: Runner, past_len: int, new_tokens: int, warmup: int) -> float:
    """One sweep repetition: warm-up runs and the timed run in one bound call, keep the last.

    Keeping them in one time_step call matters: the first run after (re)binding pays extra, so a
    timed run in a separate call after a rebind would overstate the step by several percent.
    """
    return float(runner.time_step(past_len, new_tokens, warmup + 1)[-1])


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, leave=False, disable=None)


def run_sweep(runner: Runner, key: ConfigKey, plan: Plan, samples_path: str | os.PathLike[str],
              progress: bool = True) -> SweepResult:
    """Measure the rows of ``key``'s sweep missing from ``samples_path`` and append them as measured."""
    path = Path(samples_path)
    tier = plan.tier(key.tier_idx)
    sweep = plan.sweep
    max_new = getattr(runner, "max_new_tokens", None)
    planned = plan_rows(tier, sweep, runner.max_past_len, max_new)
    kv_mode = getattr(runner, "kv_mode", "concat")  # how the KV was bound: part of what was timed
    done = read_done(path, key, runner.backend)
    todo = [r for r in planned if r not in done]
    order = measurement_order(todo, sweep.seed, key)
    t_start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.is_file() or path.stat().st_size == 0
    bar = _progress(len(order), f"sweep tier {key.tier_idx} top_k {key.top_k} blocks {key.num_active_blocks}",
                    progress and bool(order))
    written = 0
    try:
        with path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if new_file:
                writer.writerow(SAMPLES_COLUMNS)
                fh.flush()
            for row in order:
                warmup = sweep.decode.warmup if row.phase == "decode" else sweep.prefill.warmup
                ms = measure_once(runner, row.past_len, row.new_tokens, warmup)
                writer.writerow([key.tier_idx, key.top_k, key.num_active_blocks, BATCH, row.phase, row.past_len,
                                 row.new_tokens, row.rep, f"{ms:.6f}", runner.backend, runner.device, kv_mode,
                                 row.past_len, row.past_len])  # kv_total, kv_max of a batch of one
                fh.flush()
                os.fsync(fh.fileno())
                written += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    positions = tuple(sorted({r.past_len for r in planned if r.phase == "decode"}))
    lengths = tuple(sorted({r.new_tokens for r in planned if r.phase == "prefill"}))
    return SweepResult(path=path, key=key, rows_planned=len(planned), rows_written=written,
                       rows_skipped=len(planned) - len(todo), seconds=time.perf_counter() - t_start,
                       positions=positions, prefill_lengths=lengths)
