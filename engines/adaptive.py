"""Sequential sampling for the sweep: which positions still need rounds, and why each one stopped.

A position (decode past_len, or prefill length) stays in the rotation until the standard error of its
median, relative to the median, is under its target. The standard error is
trt_latency.stats.median_se_rel (the distribution-free order-statistic interval of the median; the fit
judges its held-out misses with the same function), one sort of <= a few hundred values per position
and round.

Targets start at the plan's precision and only ever tighten: a `Refiner` (a fit, supplied by the
caller: engines/ knows nothing of estimator/) looks at the per-position medians and standard errors
and asks for a tighter target where the fit says a position matters (a leave-one-position-out residual
large compared with its standard error, a knot being decided there). Tightening is monotone and
bounded by max_reps, so the loop ends.

Resume state is derived from samples.csv itself (rows per position and their spread); the targets a
refiner set are kept in a small side file written atomically (`state_path`), so an interrupted sweep
continues with the same positions done and the same re-entered ones pending.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from trt_latency.engines.config import AdaptiveSpec
from trt_latency.stats import drift_adjusted, median_se, median_se_rel

# Stop reasons (samples' side file and calibration.yaml carry them verbatim).
STOP_PRECISION = "precision"  # the median's relative SE reached its target
STOP_MAX_REPS = "max_reps"  # the plan's round cap was reached first
STOP_TIME = "time_budget"  # --time-budget ran out first
STOP_FIXED = "fixed_plan"  # non-adaptive sweep: every position gets the plan's rounds


class Refiner(Protocol):
    """The fit's say on which positions matter (built by the caller, e.g. from estimator.fit)."""

    def targets(self, phase: str, x: np.ndarray, median: np.ndarray, se_rel: np.ndarray,
                precision: float) -> tuple[np.ndarray, list[str]]:
        """Per position (x sorted ascending): the relative SE it must reach (inf = no opinion) and why
        ("" or a short reason such as "lopo_residual", "knot")."""
        ...


@dataclass
class PositionState:
    phase: str
    past_len: int
    new_tokens: int
    values: list[float] = field(default_factory=list)
    next_rep: int = 0
    target: float = math.inf  # tightest target asked for so far (the plan's precision until a refit)
    why: str = ""  # why the target is tighter than the plan's ("" = plan precision)
    stop: str = ""
    se_drift: float | None = None  # SE of the median with the machine's drift divided out (set at finish)
    warmup: int | None = None  # None = the plan's; 0 once the first run proved as fast as a warmed one
    cold_log_ratio: list[float] = field(default_factory=list)  # log(first run / timed run), per visit

    def note_warmup(self, runs: np.ndarray, min_reps: int, tolerance: float) -> None:
        """Warm-up proportional to need: once ``min_reps`` visits show the first (cold) run within
        ``tolerance`` of the timed one (|median log ratio| + 1 SE of that median), this shape stops
        paying for warm-up runs. Shapes where the first run is slower (small decode steps here: x1.3-2)
        keep them for good."""
        if (self.warmup == 0 or runs.shape[0] < 2 or runs[0] <= 0 or runs[-1] <= 0
                or len(self.cold_log_ratio) >= 4 * min_reps):  # judged long enough: keep the warm-up
            return
        self.cold_log_ratio.append(math.log(float(runs[0]) / float(runs[-1])))
        if len(self.cold_log_ratio) < min_reps:
            return
        v = np.asarray(self.cold_log_ratio)
        se = median_se(v)  # absolute: a log ratio's median may be <= 0
        if abs(float(np.median(v))) + se <= tolerance:
            self.warmup = 0

    @property
    def x(self) -> int:
        return self.past_len if self.phase == "decode" else self.new_tokens

    @property
    def n(self) -> int:
        return len(self.values)

    def se_rel(self) -> float:
        return median_se_rel(self.values)

    def median(self) -> float:
        return float(np.median(self.values)) if self.values else math.nan


class Scheduler:
    """Per-position state of one config's adaptive sweep and the decision what to visit next."""

    def __init__(self, shapes: Iterable[tuple[str, int, int]], spec: AdaptiveSpec, max_reps: dict[str, int]) -> None:
        self.spec = spec
        self.max_reps = max_reps
        self.positions: dict[tuple[str, int, int], PositionState] = {}
        # Decode repetitions in measuring order (past_len, ms): the machine's drift is read off their sequence.
        self.decode_log: list[tuple[int, float]] = []
        for phase, past_len, new_tokens in shapes:
            st = PositionState(phase, past_len, new_tokens)
            st.target = spec.target(phase)
            self.positions[(phase, past_len, new_tokens)] = st
        self.refits = 0

    def add(self, shape: tuple[str, int, int], rep: int, value: float) -> None:
        st = self.positions.get(shape)
        if st is None:
            return
        st.values.append(value)
        st.next_rep = max(st.next_rep, rep + 1)
        if st.phase == "decode":
            self.decode_log.append((st.past_len, value))

    def needs_more(self, st: PositionState) -> bool:
        if st.n >= self.max_reps[st.phase]:
            return False
        if st.n < min(self.spec.min_reps, self.max_reps[st.phase]):
            return True
        return st.se_rel() > st.target

    def active(self) -> list[PositionState]:
        return [st for st in self.positions.values() if self.needs_more(st)]

    def refine(self, refiner: Refiner) -> int:
        """Ask the refiner for tighter targets; returns how many positions re-entered the rotation."""
        self.refits += 1
        reentered = 0
        for phase in ("decode", "prefill"):
            sts = sorted((s for s in self.positions.values() if s.phase == phase and s.n >= 3), key=lambda s: s.x)
            if len(sts) < 3:
                continue
            x = np.array([s.x for s in sts], dtype=np.float64)
            med = np.array([s.median() for s in sts])
            se = np.array([s.se_rel() for s in sts])
            targets, why = refiner.targets(phase, x, med, se, self.spec.target(phase))
            for st, tgt, reason in zip(sts, targets, why, strict=True):
                if math.isfinite(float(tgt)) and float(tgt) < st.target:
                    was = self.needs_more(st)
                    st.target = float(tgt)
                    st.why = reason
                    if not was and self.needs_more(st):
                        reentered += 1
        return reentered

    def finish(self, out_of_time: bool) -> None:
        """Stop reasons for every position, and each decode position's SE once the drift is divided out."""
        decode = [st for st in self.positions.values() if st.phase == "decode"]
        if self.decode_log and decode:
            keys = np.array([k for k, _ in self.decode_log])
            adjusted, _ = drift_adjusted(keys, np.array([v for _, v in self.decode_log]), len(decode))
            for st in decode:
                mine = adjusted[keys == st.past_len]
                st.se_drift = median_se_rel(mine) if mine.size >= 3 else None
        for st in self.positions.values():
            if st.n >= self.max_reps[st.phase]:
                st.stop = STOP_MAX_REPS
            elif self.needs_more(st):
                st.stop = STOP_TIME if out_of_time else "incomplete"
            else:
                st.stop = STOP_PRECISION


STATE_COLUMNS = ("tier_idx", "top_k", "num_active_blocks", "phase", "past_len", "new_tokens", "n", "median_ms",
                 "se_rel", "target_rel", "target_why", "stop", "warmup")


def state_path(samples_path: Path) -> Path:
    """The side file beside samples.csv: one row per (config, shape) with the achieved SE and why it stopped."""
    return samples_path.with_name(samples_path.stem + ".positions.csv")


def read_state(path: Path, key: tuple[int, int, int]) -> dict[tuple[str, int, int], tuple[float, str]]:
    """(target, why) per shape of config ``key`` from the side file; {} when absent or unreadable (it only
    carries refiner targets: losing it costs at most a re-derivation, never a row)."""
    out: dict[tuple[str, int, int], tuple[float, str]] = {}
    if not path.is_file():
        return out
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                if (int(rec["tier_idx"]), int(rec["top_k"]), int(rec["num_active_blocks"])) != tuple(key):
                    continue
                shape = (rec["phase"], int(rec["past_len"]), int(rec["new_tokens"]))
                out[shape] = (float(rec["target_rel"]), rec["target_why"])
    except (OSError, ValueError, KeyError, csv.Error):
        return {}
    return out


def write_state(path: Path, key: tuple[int, int, int], positions: Iterable[PositionState]) -> None:
    """Replace config ``key``'s rows in the side file (other configs' rows kept); atomic (tmp + rename)."""
    keep: list[list[str]] = []
    if path.is_file():
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader, [])
                if tuple(header) == STATE_COLUMNS:
                    keep = [r for r in reader if r and tuple(int(v) for v in r[:3]) != tuple(key)]
        except (OSError, ValueError, csv.Error):
            keep = []
    rows = []
    for st in sorted(positions, key=lambda s: (s.phase, s.x)):
        se = st.se_rel()
        rows.append([*(str(int(v)) for v in key), st.phase, str(st.past_len), str(st.new_tokens), str(st.n),
                     f"{st.median():.6f}", f"{se:.6g}" if math.isfinite(se) else "inf",
                     f"{st.target:.6g}" if math.isfinite(st.target) else "inf", st.why, st.stop,
                     "plan" if st.warmup is None else str(st.warmup)])
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(STATE_COLUMNS)
        writer.writerows(keep)
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def sweep_record(states: Iterable[PositionState], spec: AdaptiveSpec | None) -> dict[str, object]:
    """Plain-typed per-position record for calibration.yaml (fit_error): positions in ascending order."""
    sts = list(states)
    dec = sorted((s for s in sts if s.phase == "decode"), key=lambda s: s.x)
    pre = sorted((s for s in sts if s.phase == "prefill"), key=lambda s: s.x)
    counts: dict[str, int] = {}
    for st in sts:
        counts[st.stop or "unknown"] = counts.get(st.stop or "unknown", 0) + 1
    return {
        "sweep_precision_target": spec.precision if spec is not None and spec.enabled else None,
        "sweep_stop_counts": counts,
        "positions": [s.past_len for s in dec],
        "position_reps": [s.n for s in dec],
        "position_se_rel": [_finite(s.se_rel()) for s in dec],  # order-statistic SE of the median / median
        "position_se_rel_drift": [None if s.se_drift is None else _finite(s.se_drift) for s in dec],
        "position_target_rel": [_finite(s.target) for s in dec],
        "position_stop": [s.stop for s in dec],
        "prefill_lengths": [s.new_tokens for s in pre],
        "prefill_reps": [s.n for s in pre],
        "prefill_se_rel": [_finite(s.se_rel()) for s in pre],
        "prefill_stop": [s.stop for s in pre],
        "prefill_warmup_dropped": [s.warmup == 0 for s in pre],
        "position_warmup_dropped": [s.warmup == 0 for s in dec],
    }


def time_to_target(states: Iterable[PositionState], plan_warmup: int = 1) -> float:
    """Seconds of further visits until every position reaches its target SE, from the 1/sqrt(n) law:
    n_i (se_i / target_i)^2 visits in all, each costing (warm-up + timed) runs of its median. What the
    deadline cut short is reported as time, the unit a user sets (--time-budget)."""
    total = 0.0
    for st in states:
        se = st.se_rel() if st.se_drift is None else st.se_drift
        if not (math.isfinite(se) and math.isfinite(st.target) and st.target > 0 and st.n):
            return math.inf
        runs = 1 + (plan_warmup if st.warmup is None else st.warmup)
        total += max(st.n * (se / st.target) ** 2 - st.n, 0.0) * runs * st.median() * 1e-3
    return total


def describe(states: Iterable[PositionState], spec: AdaptiveSpec | None,
             warmups: dict[str, int] | None = None) -> str:
    """One or two lines: what precision was reached where and why the sweep stopped (and, where the
    deadline stopped it, about how much more time the target needs; ``warmups``: the plan's per phase)."""
    sts = list(states)
    if not sts:
        return "    precision: nothing measured"
    lines = []
    for phase, unit in (("decode", "past_len"), ("prefill", "length")):
        group = [s for s in sts if s.phase == phase]
        if not group:
            continue
        se = np.array([s.se_rel() for s in group])
        finite = np.isfinite(se)
        worst = group[int(np.argmax(np.where(finite, se, -1.0)))] if finite.any() else group[0]
        reached = sum(1 for s in group if math.isfinite(s.se_rel()) and s.se_rel() <= s.target)
        stops: dict[str, int] = {}
        for s in group:
            stops[s.stop] = stops.get(s.stop, 0) + 1
        refit = sum(1 for s in group if s.why)
        cold = sum(1 for s in group if s.warmup == 0)
        target = f"target {spec.target(phase):.2%}, " if spec is not None and spec.enabled else ""
        med = f"{float(np.median(se[finite])):.2%}" if finite.any() else "n/a"
        drift = np.array([s.se_drift for s in group if s.se_drift is not None and math.isfinite(s.se_drift)])
        divided = (f"; {float(np.median(drift)):.2%} median, {float(drift.max()):.2%} max with the machine's drift "
                   "divided out (what the fit uses)" if drift.size else "")
        short = [s for s in group if s.stop == STOP_TIME]
        more = time_to_target(short, (warmups or {}).get(phase, 1))
        need = (f"; the target needs about {more:.0f} s more of this phase at this machine's noise "
                f"(--time-budget)" if short and math.isfinite(more) else "")
        lines.append(f"    {phase} precision: {target}SE of the median {med} median, {worst.se_rel():.2%} max "
                     f"(at {unit} {worst.x}){divided}; target reached at {reached} of {len(group)}; reps "
                     f"{min(s.n for s in group)}-{max(s.n for s in group)}; stops: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(stops.items()))
                     + (f"; {refit} tightened by the fit" if refit else "")
                     + (f"; warm-up dropped at {cold} (first run as fast)" if cold else "") + need)
    return "\n".join(lines)
