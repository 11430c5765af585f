"""Runner + plan's batch block -> batched decode rows in samples.csv: appended as measured, resumable.

The batch axis of the sweep (in-flight batching). For every batch size B > 1 of the plan it times ONE
batched decode step (``runner.time_batch_step``) at uniform batches (every row at each planned past
length) and at seeded ragged batches (row lengths drawn in [1, cap]). Size 1 is the decode sweep's own
curve (engines/sweep.py), so single-request calibration is unchanged.

Rows: ``batch`` = B, phase decode, past_len = max L (kv_max), new_tokens 1, and the batch's kv_total
(sum L) and kv_max as metadata. Order and resume work as in the decode sweep: repetition rounds, a
seeded shuffle over shapes inside each round (drift spreads over every B and X), each row flushed and
fsync'ed as measured; a rerun repairs a partial last line and measures only the missing
(B, kv_max, kv_total, rep) rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trt_latency.engines.config import BatchSweep, Plan
from trt_latency.engines.sweep import (
    SAMPLES_INDEX,
    RowSink,
    as_sink,
    check_backend,
    int_field,
    interleaved_rounds,
    past_deadline,
    progress_bar,
    resume_records,
)
from trt_latency.errors import InputError
from trt_latency.schema import ConfigKey


class BatchShape(NamedTuple):
    batch: int
    kv_lens: tuple[int, ...]
    ragged: bool

    @property
    def kv_max(self) -> int:
        return max(self.kv_lens)

    @property
    def kv_total(self) -> int:
        return sum(self.kv_lens)

    @property
    def key(self) -> tuple[int, int, int]:
        """What identifies the shape in samples.csv: (batch, kv_max, kv_total)."""
        return self.batch, self.kv_max, self.kv_total


class PlannedBatchRow(NamedTuple):
    shape: BatchShape
    rep: int

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (*self.shape.key, self.rep)


@dataclass(frozen=True)
class BatchSweepResult:
    path: Path
    key: ConfigKey
    rows_planned: int
    rows_written: int
    rows_skipped: int
    seconds: float
    sizes: tuple[int, ...]  # batch sizes timed here (> 1)
    shapes: int
    out_of_time: bool = False  # the deadline cut the rounds short (a rerun into the folder adds the rest)


def batch_shapes(spec: BatchSweep, max_past_len: int, max_batch: int, seed: int = 0) -> list[BatchShape]:
    """Every batch shape to time: per size B > 1 (up to the runner's max_batch), uniform at each past
    length, then ``spec.ragged`` seeded ragged shapes; shapes with B * max L > max_kv_tokens are left out."""
    shapes: list[BatchShape] = []
    seen: set[tuple[int, int, int]] = set()
    for b in spec.sizes:
        if b < 2 or b > max_batch:
            continue
        cap = max_past_len if not spec.max_kv_tokens else min(max_past_len, spec.max_kv_tokens // b)
        lens = [p for p in spec.past_lens if p <= cap]
        for p in lens:
            shape = BatchShape(b, (p,) * b, False)
            if shape.key not in seen:
                seen.add(shape.key)
                shapes.append(shape)
        top = max(lens) if lens else cap
        rng = np.random.default_rng([seed, b, 7919])
        drawn = tries = 0
        while drawn < spec.ragged and tries < 50 * max(spec.ragged, 1) and top >= 2:
            tries += 1
            row = tuple(int(v) for v in rng.integers(1, top + 1, b))
            shape = BatchShape(b, row, True)
            if len(set(row)) > 1 and shape.key not in seen:
                seen.add(shape.key)
                shapes.append(shape)
                drawn += 1
    return shapes


def plan_batch_rows(spec: BatchSweep, max_past_len: int, max_batch: int, seed: int = 0) -> list[PlannedBatchRow]:
    return [PlannedBatchRow(s, r) for s in batch_shapes(spec, max_past_len, max_batch, seed) for r in range(spec.reps)]


def batch_order(rows: list[PlannedBatchRow], seed: int, key: ConfigKey) -> list[PlannedBatchRow]:
    """Rounds by rep; inside each round a seeded shuffle over shapes (every B and X mixed)."""
    return interleaved_rounds(sorted(rows, key=lambda r: r.key), lambda r: r.rep,
                              [seed, key.tier_idx, key.top_k, key.num_active_blocks, 1])


def read_done_batch(path: Path, key: ConfigKey, backend: str | None = None) -> set[tuple[int, int, int, int]]:
    """(batch, kv_max, kv_total, rep) of the batched rows already in samples.csv for ``key``."""
    idx = SAMPLES_INDEX
    done: set[tuple[int, int, int, int]] = set()
    for n, rec in resume_records(path):
        ints = {c: int_field(rec[idx[c]], path, n, c)
                for c in ("tier_idx", "top_k", "num_active_blocks", "batch", "rep", "kv_max", "kv_total")}
        if (ints["tier_idx"], ints["top_k"], ints["num_active_blocks"]) != tuple(key) or ints["batch"] < 2:
            continue
        check_backend(rec, key, backend, path, n)
        done.add((ints["batch"], ints["kv_max"], ints["kv_total"], ints["rep"]))
    return done


def run_batch_sweep(runner: Any, key: ConfigKey, plan: Plan, samples_path: str | os.PathLike[str] | RowSink,
                    progress: bool = True, deadline: float | None = None) -> BatchSweepResult:
    """Measure the batched rows of ``key`` missing from ``samples_path`` and append them as measured.

    ``samples_path`` may be a ``RowSink`` (engines/sweep.py: a Ray actor streams its rows to the driver),
    as for the decode sweep; a path is ``FileSink(path)``. ``deadline`` (time.perf_counter): no new round
    starts after it once every shape has MIN_ROUNDS (calibrate's --time-budget gives the batch axis its
    share; later rounds are then left for a rerun)."""
    spec = plan.batch
    if spec is None:
        raise InputError("the plan has no batch block", path=str(plan.source), field="batch",
                         expected="a batch block (sizes, past_lens, reps)")
    if not hasattr(runner, "time_batch_step"):
        raise InputError(f"backend {runner.backend} cannot time batched steps", field="batch",
                         expected="an ONNX Runtime backend (ort-cpu, ort-cuda, ort-trt)")
    sink = as_sink(samples_path)
    planned = plan_batch_rows(spec, runner.max_past_len, int(getattr(runner, "max_batch", 1)), plan.sweep.seed)
    done = sink.batch_rows(key, runner.backend)
    todo = [r for r in planned if r.key not in done]
    order = batch_order(todo, plan.sweep.seed, key)
    kv_mode = getattr(runner, "kv_mode", "concat")
    t_start = time.perf_counter()
    bar = progress_bar(len(order), f"batch sweep tier {key.tier_idx} top_k {key.top_k} blocks {key.num_active_blocks}",
                    progress and bool(order))
    written = 0
    out_of_time = False
    try:
        for row in order:
            if past_deadline(deadline, row.rep):
                out_of_time = True
                break
            s = row.shape
            # Warm-up and timed run in one bound call (the first run after a rebind pays extra).
            ms = float(runner.time_batch_step(s.kv_lens, spec.warmup + 1)[-1])
            sink.append([key.tier_idx, key.top_k, key.num_active_blocks, s.batch, "decode", s.kv_max, 1,
                        row.rep, f"{ms:.6f}", runner.backend, runner.device, kv_mode, s.kv_total, s.kv_max])
            written += 1
            if bar is not None:
                bar.update(1)
    finally:
        sink.close()  # rows durable in half-second groups (FileSink), as the decode sweep's
        if bar is not None:
            bar.close()
    sizes = tuple(sorted({r.shape.batch for r in planned}))
    return BatchSweepResult(path=sink.path, key=key, rows_planned=len(planned), rows_written=written,
                            rows_skipped=len(planned) - len(todo), seconds=time.perf_counter() - t_start,
                            sizes=sizes, shapes=len({r.shape for r in planned}), out_of_time=out_of_time)
