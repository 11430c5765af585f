"""Runner + plan -> samples.csv: per-position step timings, appended as measured, resumable.

Order: repetition rounds; inside a round every (phase, past_len, new_tokens) still in the rotation is
visited once, the decode positions walked in order (ascending, then descending the next round: each visit
follows a neighbour, as a serving engine's steps do; ``serpentine``), the prefill lengths after. Every shape
in every round keeps the machine's drift common to all of them (the fit divides it out:
trt_latency/stats.drift_adjusted). Each visit binds its shape once and runs warm-up + timed run in one
``time_step`` call (the first run after a shape change pays for it); the timed region is the engine call.

Fixed plan: every shape gets the plan's rounds. Adaptive (plan ``sweep.adaptive``, engines/adaptive.py):
a shape leaves the rotation once the relative standard error of its median reaches the target, and a
caller-supplied refiner may send it back. Rows are written in groups (flush + fsync every
half-second and at the end), not one fsync per row.

Where rows go: a ``RowSink``. The default is ``FileSink(samples.csv)`` (the group writer below and the
adaptive side file beside it); a caller that is not the file's writer (a Ray actor streaming rows back to
the driver, trt_latency/cluster.py) passes its own sink: the rows already done for the config, and where
new rows and the refiner's targets go.

Resume: a rerun reads samples.csv, repairs a partial trailing line (a run killed mid-write) and
measures only the rows missing for that config: the fixed plan's missing (phase, past_len, new_tokens,
rep) rows, or, adaptive, continues every shape at its next rep with the spread its rows already show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from trt_latency.engines.adaptive import (
    STOP_FIXED,
    STOP_TIME,
    PositionState,
    Refiner,
    Scheduler,
    read_state,
    state_path,
    write_state,
)
from trt_latency.engines.base import Runner
from trt_latency.engines.config import AdaptiveSpec, Plan, SweepSpec, TierSpec
from trt_latency.errors import SamplesError
from trt_latency.formats import SAMPLES_INDEX, int_field, resume_records
from trt_latency.formats import GroupWriter as _GroupWriter
from trt_latency.formats import open_writer as _open_writer
from trt_latency.schema import SAMPLES_COLUMNS, ConfigKey  # noqa: F401 - SAMPLES_COLUMNS re-exported

BATCH = 1


# When a sweep must stop: a time.perf_counter() value, or a function of the shapes' state returning one.
Deadline = float | Callable[[tuple[PositionState, ...]], float] | None


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
    out_of_time: bool = False  # the deadline (--time-budget) stopped it
    states: tuple[PositionState, ...] = ()  # per shape: repetitions, achieved SE, target, stop reason


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
    """The plan's prefill lengths up to the model's usable prompt length, plus that length itself: the
    grid reaches the longest prompt the model (capped by the plan's tier) accepts, so a long prompt is
    interpolated, not extrapolated from the plan's last length."""
    cap = tier.max_prefill_len if max_new_tokens is None else min(tier.max_prefill_len, max_new_tokens)
    lengths = sorted(s for s in sweep.prefill.lengths if s <= cap)
    if lengths and cap > lengths[-1]:
        lengths.append(cap)
    return lengths


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


def measurement_order(rows: list[PlannedRow]) -> list[PlannedRow]:
    """Rounds by rep; inside each round the serpentine visit order (``serpentine``)."""
    by_rep: dict[int, list[PlannedRow]] = {}
    for row in sorted(rows):
        by_rep.setdefault(row.rep, []).append(row)
    ordered: list[PlannedRow] = []
    for rep in sorted(by_rep):
        ordered.extend(serpentine(by_rep[rep], rep, lambda r: (r.phase, r.past_len, r.new_tokens)))
    return ordered


def serpentine(items: list[Any], round_no: int, shape_of: Callable[[Any], tuple[str, int, int]]) -> list[Any]:
    """One round's visit order: decode positions ascending on even rounds and descending on odd ones, then
    the prefill lengths the same way round (so a round ends where the next one starts).

    Why not a shuffle: on a CPU a step's cost depends on what the previous visit left in the caches. After a
    visit at KV 4096 (or a 1024-token prefill) a KV-1 step needs ~8 runs to come back to speed, so one
    warm-up + one timed run in a shuffled round read small positions 1.6-2x their back-to-back time
    (benchmarks/sweep_noise.py, huge pages on), while a serving engine's decode steps run back to back at adjacent
    positions. Walking the grid visits each position right after a neighbour (1.0-1.2x), and reversing the
    direction every round cancels a linear drift over each pair of rounds, which is what the shuffle was for.
    """
    decode = sorted((it for it in items if shape_of(it)[0] == "decode"), key=lambda it: shape_of(it)[1])
    prefill = sorted((it for it in items if shape_of(it)[0] != "decode"), key=lambda it: shape_of(it)[2])
    if round_no % 2:
        decode.reverse()
        prefill.reverse()
    return decode + prefill


def interleaved_rounds(rows: list[Any], rep_of: Callable[[Any], int], seed: list[int]) -> list[Any]:
    """``rows`` (in a fixed order) grouped into rounds by rep, each round in a fresh seeded shuffle: slow
    drift of the machine hits every shape alike instead of masquerading as position dependence."""
    rng = np.random.default_rng(seed)
    by_rep: dict[int, list[Any]] = {}
    for row in rows:
        by_rep.setdefault(rep_of(row), []).append(row)
    ordered: list[Any] = []
    for rep in sorted(by_rep):
        group = by_rep[rep]
        ordered.extend(group[i] for i in rng.permutation(len(group)))
    return ordered


def check_backend(rec: list[str], key: ConfigKey, backend: str | None, path: Path, n: int) -> None:
    """A resumed config's rows must come from the backend timing it now."""
    got = rec[SAMPLES_INDEX["backend"]]
    if backend is not None and got != backend:
        raise SamplesError(f"rows of config {tuple(key)} were measured with backend {got!r}; "
                           "mixing backends in one file would corrupt the fit (use another output)",
                           path=str(path), row=n, field="backend", expected=backend, got=got)


def read_rows(path: Path, key: ConfigKey, backend: str | None = None) -> dict[PlannedRow, float]:
    """Rows already in samples.csv for ``key`` with their latency (after repairing a partial trailing line)."""
    idx = SAMPLES_INDEX
    done: dict[PlannedRow, float] = {}
    for n, rec in resume_records(path):
        cfg = tuple(int_field(rec[idx[c]], path, n, c) for c in ("tier_idx", "top_k", "num_active_blocks", "batch"))
        if cfg != (*key, BATCH):
            continue
        check_backend(rec, key, backend, path, n)
        phase = rec[idx["phase"]]
        if phase not in ("decode", "prefill"):
            raise SamplesError(path=str(path), row=n, field="phase", expected="decode or prefill", got=phase)
        try:
            ms = float(rec[idx["latency_ms"]])
        except ValueError:
            raise SamplesError(path=str(path), row=n, field="latency_ms", expected="a number",
                               got=rec[idx["latency_ms"]]) from None
        done[PlannedRow(phase, int_field(rec[idx["past_len"]], path, n, "past_len"),
                        int_field(rec[idx["new_tokens"]], path, n, "new_tokens"),
                        int_field(rec[idx["rep"]], path, n, "rep"))] = ms
    return done


def read_done(path: Path, key: ConfigKey, backend: str | None = None) -> set[PlannedRow]:
    """Rows already in samples.csv for ``key`` (after repairing a partial trailing line)."""
    return set(read_rows(path, key, backend))


def measure_once(runner: Runner, past_len: int, new_tokens: int, warmup: int) -> float:
    """One sweep repetition: warm-up runs and the timed run in one bound call, keep the last.

    Keeping them in one time_step call matters: the first run after (re)binding pays extra, so a
    timed run in a separate call after a rebind would overstate the step by several percent.
    """
    return float(runner.time_step(past_len, new_tokens, warmup + 1)[-1])


@runtime_checkable
class RowSink(Protocol):
    """Where a sweep's rows go and where its resume state comes from (``FileSink``: samples.csv)."""

    path: Path  # the samples file the rows end up in (reported in SweepResult)

    def rows(self, key: ConfigKey, backend: str) -> dict[PlannedRow, float]:
        """Rows of ``key`` already measured (resume), with their latency."""
        ...

    def append(self, values: list[Any]) -> None:
        """One samples.csv row (SAMPLES_COLUMNS order)."""
        ...

    def close(self) -> None:
        """The sweep is over (or interrupted): make what was appended durable."""
        ...

    def batch_rows(self, key: ConfigKey, backend: str) -> set[tuple[int, int, int, int]]:
        """(batch, kv_max, kv_total, rep) of ``key``'s batched rows already measured (engines/batch_sweep)."""
        ...

    def read_state(self, key: ConfigKey) -> dict[tuple[str, int, int], tuple[float, str]]:
        """The adaptive side file's targets for ``key`` (engines/adaptive.read_state)."""
        ...

    def write_state(self, key: ConfigKey, positions: list[PositionState]) -> None:
        """Replace ``key``'s rows of the adaptive side file (engines/adaptive.write_state)."""
        ...


class FileSink:
    """samples.csv as a RowSink: rows appended in fsync'ed groups, the side file samples.positions.csv."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._writer: _GroupWriter | None = None
        self._opened = False

    def rows(self, key: ConfigKey, backend: str) -> dict[PlannedRow, float]:
        done = read_rows(self.path, key, backend)
        if not self._opened:  # as before the sink existed: the file (and its header) exists once a sweep began
            self._writer, self._opened = _open_writer(self.path), True
        return done

    def append(self, values: list[Any]) -> None:
        if self._writer is None:
            self._writer, self._opened = _open_writer(self.path), True
        self._writer.row(values)

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def batch_rows(self, key: ConfigKey, backend: str) -> set[tuple[int, int, int, int]]:
        from trt_latency.engines.batch_sweep import read_done_batch

        done = read_done_batch(self.path, key, backend)
        if not self._opened:
            self._writer, self._opened = _open_writer(self.path), True
        return done

    def read_state(self, key: ConfigKey) -> dict[tuple[str, int, int], tuple[float, str]]:
        return read_state(state_path(self.path), tuple(key))

    def write_state(self, key: ConfigKey, positions: list[PositionState]) -> None:
        write_state(state_path(self.path), tuple(key), positions)


def as_sink(target: str | os.PathLike[str] | RowSink) -> RowSink:
    """A path becomes its FileSink; a sink is used as given."""
    return target if isinstance(target, RowSink) else FileSink(target)


PLAIN_PROGRESS_SECONDS = 10.0  # a plain progress line at most this often when stderr is not a terminal


class PlainProgress:
    """The bar's stand-in for a log file (stderr not a terminal): one plain line per PLAIN_PROGRESS_SECONDS
    ("sweep t0.k1.b4: 1200 rows, 30 s, 12 positions active"), nothing for a phase shorter than that."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = PLAIN_PROGRESS_SECONDS) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0
        self.note = ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            done = f"{self.n} of {self.total}" if self.total else str(self.n)
            import sys

            print(f"  {self.desc}: {done} {self.unit}s, {now - self.start:.0f} s" + (f", {self.note}" if self.note
                  else ""), file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.note = text

    def close(self) -> None:
        return None


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "row") -> Any:
    """A tqdm bar on a terminal, plain lines at a modest rate otherwise (a log keeps no bar redraws); None
    when disabled (--no-progress)."""
    if not enabled:
        return None
    import sys

    if not sys.stderr.isatty():
        return PlainProgress(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def run_sweep(runner: Runner, key: ConfigKey, plan: Plan, samples_path: str | os.PathLike[str] | RowSink,
              progress: bool = True, *, adaptive: AdaptiveSpec | None = None, refiner: Refiner | None = None,
              deadline: Deadline = None) -> SweepResult:
    """Measure the rows of ``key``'s sweep missing from ``samples_path`` and append them as measured.

    ``adaptive`` (default: the plan's ``sweep.adaptive``) with precision > 0 runs the sequential sampler
    (engines/adaptive.py): positions leave the rotation once their median is pinned down, ``refiner`` may
    send some back. ``deadline`` (a time.perf_counter() value, or a function of the shapes' state so far
    that returns one, re-read every round: the caller may price what follows from the medians measured)
    stops either kind of sweep at a round's
    visit boundary; a rerun continues from what was written.

    ``samples_path`` may be a ``RowSink`` instead of a path: the rows go there (and the resume state comes
    from there); a path is ``FileSink(path)``.
    """
    spec = adaptive if adaptive is not None else plan.sweep.adaptive
    sink = as_sink(samples_path)
    if spec is not None and spec.enabled:
        return _run_adaptive(runner, key, plan, sink, progress, spec, refiner, deadline)
    fixed_deadline = deadline(()) if callable(deadline) else deadline
    return _run_fixed(runner, key, plan, sink, progress, fixed_deadline)


REWARM_RUNS = 3  # untimed runs at a round's first shape, after the round's bookkeeping


def rewarm(runner: Runner, phase: str, past_len: int, new_tokens: int) -> None:
    """Untimed runs before a round's first visit. Between rounds the sweep refits, prices the replay and
    writes rows; that Python work pushes the weights out of the CPU's caches, and the first visit of the
    next round (KV 1 or KV max, the serpentine's turning points) then read 5-26% above the fit at KV 1
    in six default calibrates. A serving engine's steps do not follow a pause like that. A round that
    starts with a prefill (decode all done) runs it cold, as a served prefill runs."""
    if phase == "decode":
        runner.time_step(past_len, new_tokens, REWARM_RUNS)


def past_deadline(deadline: float | None, rep: int) -> bool:
    """A fixed-round loop stops here: every shape has had MIN_ROUNDS and the deadline has passed."""
    return deadline is not None and rep >= MIN_ROUNDS and time.perf_counter() >= deadline


def _row_values(runner: Runner, key: ConfigKey, row: PlannedRow, ms: float) -> list[Any]:
    kv_mode = getattr(runner, "kv_mode", "concat")  # how the KV was bound: part of what was timed
    return [key.tier_idx, key.top_k, key.num_active_blocks, BATCH, row.phase, row.past_len, row.new_tokens,
            row.rep, f"{ms:.6f}", runner.backend, runner.device, kv_mode,
            row.past_len, row.past_len]  # kv_total, kv_max of a batch of one


def _run_fixed(runner: Runner, key: ConfigKey, plan: Plan, sink: RowSink, progress: bool,
               deadline: float | None) -> SweepResult:
    tier = plan.tier(key.tier_idx)
    sweep = plan.sweep
    max_new = getattr(runner, "max_new_tokens", None)
    planned = plan_rows(tier, sweep, runner.max_past_len, max_new)
    done = set(sink.rows(key, runner.backend))
    todo = [r for r in planned if r not in done]
    order = measurement_order(todo)
    t_start = time.perf_counter()
    bar = progress_bar(len(order), f"sweep tier {key.tier_idx} top_k {key.top_k} blocks {key.num_active_blocks}",
                    progress and bool(order))
    written = 0
    out_of_time = False
    warmups = sweep.warmups()
    try:
        last_rep = -1
        for row in order:
            if past_deadline(deadline, row.rep):
                out_of_time = True
                break
            if row.rep != last_rep:  # a new round
                rewarm(runner, row.phase, row.past_len, row.new_tokens)
                last_rep = row.rep
            ms = measure_once(runner, row.past_len, row.new_tokens, warmups[row.phase])
            sink.append(_row_values(runner, key, row, ms))
            written += 1
            if bar is not None:
                bar.update(1)
    finally:
        sink.close()
        if bar is not None:
            bar.close()
    positions = tuple(sorted({r.past_len for r in planned if r.phase == "decode"}))
    lengths = tuple(sorted({r.new_tokens for r in planned if r.phase == "prefill"}))
    stop = STOP_TIME if out_of_time else STOP_FIXED
    return SweepResult(path=sink.path, key=key, rows_planned=len(planned), rows_written=written,
                       rows_skipped=len(planned) - len(todo), seconds=time.perf_counter() - t_start,
                       positions=positions, prefill_lengths=lengths, out_of_time=out_of_time,
                       states=_fixed_states(sink, key, runner.backend, planned, stop))


def _fixed_states(sink: RowSink, key: ConfigKey, backend: str, planned: list[PlannedRow],
                  stop: str) -> tuple[PositionState, ...]:
    """Per-shape summary of a fixed sweep (the same record the adaptive one keeps)."""
    states: dict[tuple[str, int, int], PositionState] = {}
    for r in planned:
        states.setdefault((r.phase, r.past_len, r.new_tokens), PositionState(r.phase, r.past_len, r.new_tokens))
    for r, ms in sink.rows(key, backend).items():
        st = states.get((r.phase, r.past_len, r.new_tokens))
        if st is not None:
            st.values.append(ms)
    for st in states.values():
        st.stop = stop
    return tuple(states.values())


MIN_ROUNDS = 3  # rounds every shape gets even past the deadline: a config is never left without a fit
REFIT_COST_SHARE = 0.05  # a refit may take at most this share of the sweep's time
WARMUP_EVIDENCE = 5  # visits with a warm-up before a shape's need for it is judged
WARMUP_TOLERANCE = 1.0  # drop a shape's warm-up when its cold run is within this share of the SE target


def _progress_note(sched: Scheduler, active: int, deadline: float | None) -> str:
    """What the bar shows after a round: how many positions still need rounds, the worst one, time left."""
    ses = [(st.se_rel() / st.target, st) for st in sched.positions.values() if st.n >= 3]
    note = f"{active} positions active"
    if ses:
        _, worst = max(ses, key=lambda t: t[0])
        unit = "past_len" if worst.phase == "decode" else "prefill"
        note += f", worst SE {worst.se_rel():.2%} at {unit} {worst.x} (target {worst.target:.2%})"
    if deadline is not None:
        note += f", {max(deadline - time.perf_counter(), 0.0):.0f} s left"
    return note


def _run_adaptive(runner: Runner, key: ConfigKey, plan: Plan, sink: RowSink, progress: bool, spec: AdaptiveSpec,
                  refiner: Refiner | None, deadline_at: Deadline) -> SweepResult:
    tier = plan.tier(key.tier_idx)
    sweep = plan.sweep
    max_new = getattr(runner, "max_new_tokens", None)
    cap = min(tier.max_past_len, runner.max_past_len)
    shapes = [("decode", p, 1) for p in decode_positions(cap, sweep.decode.log_points, sweep.decode.linear_points)]
    shapes += [("prefill", 0, s) for s in prefill_lengths(tier, sweep, max_new)]
    max_reps = {"decode": sweep.decode.reps, "prefill": sweep.prefill.reps}
    warmups = sweep.warmups()
    sched = Scheduler(shapes, spec, max_reps)
    done = sink.rows(key, runner.backend)
    for r in done:  # file order = measuring order (the drift is read off the sequence)
        sched.add((r.phase, r.past_len, r.new_tokens), r.rep, done[r])
    for shape, (target, why) in sink.read_state(key).items():  # targets a refit set before a kill
        st = sched.positions.get(shape)
        if st is not None and target < st.target:
            st.target, st.why = target, why
    t_start = time.perf_counter()
    desc = f"sweep tier {key.tier_idx} top_k {key.top_k} blocks {key.num_active_blocks}"
    # No total: how many rows the precision needs is what the sweep finds out; the postfix says how far it is.
    bar = progress_bar(None, desc, progress)
    if bar is not None:
        bar.update(len(done))
    written = 0
    out_of_time = False
    deadline: float | None = None
    round_no = 0
    refit_pending = bool(done)
    refit_cost = 0.0
    last_refit = t_start

    def refit() -> None:
        nonlocal refit_cost, last_refit, refit_pending
        if refiner is None:
            return
        t0 = time.perf_counter()
        if sched.refine(refiner):
            sink.write_state(key, list(sched.positions.values()))
        last_refit = time.perf_counter()
        refit_cost = last_refit - t0
        refit_pending = False

    try:
        while True:
            active = sched.active()
            deadline = deadline_at(tuple(sched.positions.values())) if callable(deadline_at) else deadline_at
            now = time.perf_counter()
            # Every shape has its first rounds (the SE estimates mean something) before the fit is asked.
            warmed = all(st.n >= min(spec.min_reps, max_reps[st.phase]) for st in sched.positions.values())
            # Refit when the rotation empties (the last word on who is done), and meanwhile as often as
            # its cost allows, so re-entered positions get their rounds spread over the run (drift).
            if refiner is not None and refit_pending and warmed and (
                    not active or now - last_refit >= refit_cost / REFIT_COST_SHARE):
                refit()
                active = sched.active()
            if not active:
                break
            floor = any(st.n < MIN_ROUNDS for st in active)  # every shape gets a median, budget or not
            if deadline is not None and not floor and time.perf_counter() >= deadline:
                out_of_time = True
                break
            round_start = written
            order = serpentine(active, round_no, lambda s: (s.phase, s.past_len, s.new_tokens))
            rewarm(runner, order[0].phase, order[0].past_len, order[0].new_tokens)
            for st in order:
                warmup = warmups[st.phase] if st.warmup is None else st.warmup
                runs = runner.time_step(st.past_len, st.new_tokens, warmup + 1)  # as measure_once, keep all
                ms = float(runs[-1])
                if warmup > 0:
                    st.note_warmup(runs, WARMUP_EVIDENCE, WARMUP_TOLERANCE * spec.target(st.phase))
                row = PlannedRow(st.phase, st.past_len, st.new_tokens, st.next_rep)
                sink.append(_row_values(runner, key, row, ms))
                sched.add((st.phase, st.past_len, st.new_tokens), row.rep, ms)
                written += 1
                if deadline is not None and not floor and time.perf_counter() >= deadline:
                    break
            round_no += 1
            refit_pending = True  # rows reach the disk in half-second groups (the writer), not per round
            if bar is not None:
                bar.update(written - round_start)
                bar.set_postfix_str(_progress_note(sched, len(active), deadline))
    finally:
        sink.close()
        if bar is not None:
            bar.close()
    sched.finish(out_of_time)
    sink.write_state(key, list(sched.positions.values()))
    positions = tuple(sorted(p for ph, p, _ in shapes if ph == "decode"))
    lengths = tuple(sorted(s for ph, _, s in shapes if ph == "prefill"))
    planned = sum(max(st.n, 0) for st in sched.positions.values())
    return SweepResult(path=sink.path, key=key, rows_planned=planned, rows_written=written, rows_skipped=len(done),
                       seconds=time.perf_counter() - t_start, positions=positions, prefill_lengths=lengths,
                       out_of_time=out_of_time, states=tuple(sched.positions.values()))
