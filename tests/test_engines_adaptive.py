"""Adaptive sweep: SE of the median, positions leave / re-enter the rotation, the side file, kill-and-resume."""

from __future__ import annotations

import csv
import math
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers.kill import kill_at_rows

from trt_latency.engines.adaptive import (
    STOP_MAX_REPS,
    STOP_PRECISION,
    STOP_TIME,
    PositionState,
    Scheduler,
    describe,
    median_se_rel,
    read_state,
    state_path,
    time_to_target,
)
from trt_latency.engines.config import AdaptiveSpec, ConfigKey, load_plan
from trt_latency.errors import ConfigError

KEY = ConfigKey(0, 1, 2)

ADAPTIVE_PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 32, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, intermediate: 48,
     vocab: 64, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 5, linear_points: 4, reps: DREPS, warmup: 1}
  prefill: {lengths: [4, 16], reps: PREPS}
  seed: 0
  adaptive: {precision: PREC, prefill_precision: 0.9, min_reps: 5}
quick:
  adaptive: {precision: 0.05, time_budget_s: 20}
replay: {requests: 2, vision_tokens: [0], text_tokens: [1, 8], output_tokens: [1, 4], seed: 0}
"""


def _plan(tmp: Path, precision: float, dreps: int, preps: int = 6) -> Path:
    path = tmp / f"adaptive_{precision}_{dreps}_{preps}.yaml"
    path.write_text(ADAPTIVE_PLAN.replace("PREC", f"{precision:.9f}").replace("DREPS", str(dreps))
                    .replace("PREPS", str(preps)))
    return path


def _rows(path: Path) -> list[tuple[str, ...]]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [tuple(r) for r in reader]


def _reps_by_shape(rows: list[tuple[str, ...]]) -> dict[tuple[str, int, int], list[int]]:
    out: dict[tuple[str, int, int], list[int]] = {}
    for r in rows:
        out.setdefault((r[4], int(r[5]), int(r[6])), []).append(int(r[7]))
    return out


def _stop_at(values: list[float], target: float, min_reps: int, cap: int) -> int:
    """The stopping rule replayed on a position's values in rep order: first n >= min_reps whose median SE
    is under the target, else the cap."""
    for n in range(min_reps, cap):
        if n <= len(values) and median_se_rel(values[:n]) <= target:
            return n
    return cap


def _values(rows: list[tuple[str, ...]]) -> dict[tuple[str, int, int], list[float]]:
    out: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    for r in rows:
        out.setdefault((r[4], int(r[5]), int(r[6])), []).append((int(r[7]), float(r[8])))
    return {k: [v for _, v in sorted(pairs)] for k, pairs in out.items()}


def _assert_contiguous(rows: list[tuple[str, ...]]) -> None:
    keys = Counter(r[:8] for r in rows)
    assert max(keys.values()) == 1  # no (config, phase, past_len, new_tokens, rep) twice
    for shape, reps in _reps_by_shape(rows).items():
        assert sorted(reps) == list(range(len(reps))), shape  # no rep lost in the middle


# ---- pure parts ------------------------------------------------------------------------------------


def test_median_se_matches_the_normal_theory_and_resists_outliers() -> None:
    rng = np.random.default_rng(0)
    sigma, n = 0.05, 400
    ses = [median_se_rel(1.0 + sigma * rng.standard_normal(n)) for _ in range(40)]
    theory = math.sqrt(math.pi / 2) * sigma / math.sqrt(n)  # 1.2533 sigma / sqrt(n)
    assert 0.8 * theory < float(np.median(ses)) < 1.25 * theory
    clean = 1.0 + sigma * rng.standard_normal(n)
    dirty = clean.copy()
    dirty[:20] = 50.0  # 5% absurd visits move the median's SE a little, never by orders of magnitude
    assert median_se_rel(dirty) < 1.5 * median_se_rel(clean)
    assert median_se_rel([1.0, 2.0]) == math.inf


def test_scheduler_leaves_and_reenters() -> None:
    spec = AdaptiveSpec(precision=0.01, min_reps=5)
    shapes = [("decode", p, 1) for p in (1, 2, 4)]
    sched = Scheduler(shapes, spec, {"decode": 50, "prefill": 5})
    rng = np.random.default_rng(1)
    for rep in range(5):
        sched.add(shapes[0], rep, 1.0 + 1e-4 * rng.standard_normal())  # tight: done at min_reps
        sched.add(shapes[1], rep, 1.0 + 0.2 * rng.standard_normal())  # noisy: stays
    assert [s.past_len for s in sched.active()] == [2, 4]  # 4 has no rows yet

    class Tighten:  # a refiner that wants past_len 1 pinned far tighter
        def targets(self, phase: str, x: np.ndarray, median: np.ndarray, se_rel: np.ndarray,
                    precision: float) -> tuple[np.ndarray, list[str]]:
            out = np.where(x == 1, precision / 1e4, np.inf)
            return out, ["knot" if v == 1 else "" for v in x]

    for rep in range(5):
        sched.add(shapes[2], rep, 1.0 + 1e-4 * rng.standard_normal())
    assert sched.refine(Tighten()) == 1
    assert 1 in [s.past_len for s in sched.active()] and sched.positions[shapes[0]].why == "knot"
    sched.finish(out_of_time=False)
    assert sched.positions[shapes[2]].stop == STOP_PRECISION


def test_plan_adaptive_section_and_quick_preset(tmp_path: Path) -> None:
    plan = load_plan(_plan(tmp_path, 0.004, 30))
    assert plan.sweep.adaptive == AdaptiveSpec(0.004, 5, 0.9, None)
    quick = load_plan(_plan(tmp_path, 0.004, 30), quick=True)
    assert quick.sweep.adaptive == AdaptiveSpec(0.05, 5, 0.9, 20.0)
    assert quick.sweep.decode == plan.sweep.decode  # a preset, not another grid
    default = load_plan()
    assert default.sweep.adaptive is not None and default.sweep.adaptive.enabled
    assert load_plan(quick=True).sweep.decode == default.sweep.decode
    bad = tmp_path / "bad.yaml"
    bad.write_text(ADAPTIVE_PLAN.replace("PREC", "1.5").replace("DREPS", "3").replace("PREPS", "2"))
    with pytest.raises(ConfigError, match="sweep.adaptive.precision"):
        load_plan(bad)


# ---- real ONNX Runtime sweeps ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from trt_latency.engines.export import export_decoder

    d = tmp_path_factory.mktemp("adaptive")
    return export_decoder(load_plan(_plan(d, 0.01, 10)).tier(0), 1, 2, d / "model.onnx")


def test_adaptive_sweep_stops_positions_and_keeps_refiner_targets_across_runs(model: Path, tmp_path: Path) -> None:
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.sweep import run_sweep

    # precision 50%: every position done at min_reps (5); prefill capped below min_reps (3), as the default
    # plan does: the refiner must still be asked.
    plan = load_plan(_plan(tmp_path, 0.5, 12, preps=3))
    samples = tmp_path / "samples.csv"

    class PinLast:  # asks for the largest past_len at a precision no run reaches: it goes to the cap
        def targets(self, phase: str, x: np.ndarray, median: np.ndarray, se_rel: np.ndarray,
                    precision: float) -> tuple[np.ndarray, list[str]]:
            out = np.where(x == x.max(), 1e-9, np.inf) if phase == "decode" else np.full(x.shape, np.inf)
            return out, ["lopo_residual" if v else "" for v in np.isfinite(out)]

    with open_runner(model, "ort-cpu", threads=1) as runner:
        res = run_sweep(runner, KEY, plan, samples, progress=False, refiner=PinLast())
        rows = _rows(samples)
        _assert_contiguous(rows)
        values = _values(rows)
        last = max(p for ph, p, _ in values if ph == "decode")
        assert len(values.pop(("decode", last, 1))) == 12
        for shape, v in values.items():  # the others stop by the rule (most at min_reps under load-free runs)
            target = 0.5 if shape[0] == "decode" else 0.9
            cap = 12 if shape[0] == "decode" else 3
            assert len(v) == _stop_at(v, target, min(5, cap), cap), shape
        assert res.rows_written == len(rows)
        stops = {(s.phase, s.x): s.stop for s in res.states}
        assert stops[("decode", last)] == STOP_MAX_REPS
        assert all(stops[(ph, x if ph == "decode" else s)] in (STOP_PRECISION, STOP_MAX_REPS)
                   for ph, x, s in values)
        side = read_state(state_path(samples), tuple(KEY))
        assert side[("decode", last, 1)] == (1e-9, "lopo_residual")
        # A later run with a higher cap and no refiner resumes with that state: only the pinned position
        # gets rows; the positions already done stay done.
        more = load_plan(_plan(tmp_path, 0.5, 20, preps=3))
        again = run_sweep(runner, KEY, more, samples, progress=False)
    rows2 = _rows(samples)
    assert rows2[: len(rows)] == rows
    _assert_contiguous(rows2)
    grown = {(r[4], int(r[5]), int(r[6])) for r in rows2[len(rows):]}
    assert again.rows_written == len(rows2) - len(rows)
    assert ("decode", last, 1) in grown and len(_values(rows2)[("decode", last, 1)]) == 20
    for shape in grown - {("decode", last, 1)}:  # only positions the rule had stopped at the old cap
        assert len(_values(rows)[shape]) == 12 and shape[0] == "decode"


def test_fixed_plan_deadline_stops_early_and_resumes(model: Path, tmp_path: Path) -> None:
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.sweep import MIN_ROUNDS, plan_rows, run_sweep

    plan = load_plan(_plan(tmp_path, 0.01, 10))
    fixed = replace(plan, sweep=replace(plan.sweep, adaptive=None))
    samples = tmp_path / "samples.csv"
    with open_runner(model, "ort-cpu", threads=1) as runner:
        planned = plan_rows(plan.tier(0), plan.sweep)
        cut = run_sweep(runner, KEY, fixed, samples, progress=False, deadline=time.perf_counter())
        # A spent deadline still leaves every shape MIN_ROUNDS rounds: no config goes unfitted.
        assert cut.out_of_time and cut.rows_written == sum(1 for r in planned if r.rep < MIN_ROUNDS)
        full = run_sweep(runner, KEY, fixed, samples, progress=False)
        assert full.rows_written == len(planned) - cut.rows_written and not full.out_of_time
        adaptive = run_sweep(runner, KEY, plan, tmp_path / "adaptive.csv", progress=False,
                             deadline=time.perf_counter())
        seen: list[int] = []

        def priced(states: tuple) -> float:  # a deadline re-read every round, from the state so far
            seen.append(min(st.n for st in states))
            return time.perf_counter() - 1.0

        again = run_sweep(runner, KEY, plan, tmp_path / "priced.csv", progress=False, deadline=priced)
    assert adaptive.out_of_time and {s.n for s in adaptive.states} == {MIN_ROUNDS}
    assert {s.stop for s in adaptive.states} == {"time_budget"}
    assert again.out_of_time and seen == list(range(MIN_ROUNDS + 1))


@pytest.mark.slow
def test_adaptive_sigkill_then_rerun_loses_and_duplicates_nothing(model: Path, tmp_path: Path) -> None:
    from trt_latency.engines.adaptive import Scheduler as Sched
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.sweep import read_rows, run_sweep

    # Prefill positions are done at min_reps (precision 0.9); decode ones never (1e-6) and go to the cap.
    plan_path = _plan(tmp_path, 1e-6, 60)
    samples = tmp_path / "samples.csv"
    script = textwrap.dedent(f"""
        from trt_latency.engines.backends import open_runner
        from trt_latency.engines.config import ConfigKey, load_plan
        from trt_latency.engines.sweep import run_sweep
        plan = load_plan({str(plan_path)!r})
        runner = open_runner({str(model)!r}, "ort-cpu", threads=1)
        print("ready", flush=True)
        run_sweep(runner, ConfigKey(0, 1, 2), plan, {str(samples)!r}, progress=False)
    """)
    plan = load_plan(plan_path)
    n_decode = 9 + 3  # grid positions incl. 1, 2, 4, max (checked below)
    kill_at_rows(script, 15 * n_decode, torn=samples)
    before = _rows(samples)[:-1]  # the torn last row is cut on resume
    assert len(before) == 15 * n_decode
    # What the killed run had finished, derived from samples.csv alone.
    done_rows = read_rows(samples, KEY)
    spec = plan.sweep.adaptive
    assert spec is not None
    sched = Sched({(r.phase, r.past_len, r.new_tokens) for r in done_rows}, spec,
                  {"decode": plan.sweep.decode.reps, "prefill": plan.sweep.prefill.reps})
    for r, ms in sorted(done_rows.items()):
        sched.add((r.phase, r.past_len, r.new_tokens), r.rep, ms)
    finished = {k for k, st in sched.positions.items() if not sched.needs_more(st)}
    assert any(k[0] == "prefill" for k in finished)
    with open_runner(model, "ort-cpu", threads=1) as runner:
        res = run_sweep(runner, KEY, plan, samples, progress=False)
    rows = _rows(samples)
    assert rows[: len(before)] == before  # nothing written before the kill is lost or rewritten
    _assert_contiguous(rows)
    reps = {k: len(v) for k, v in _reps_by_shape(rows).items()}
    decode = [k for k in reps if k[0] == "decode"]
    assert len(decode) == len(res.positions) and all(reps[k] == 60 for k in decode)
    for k in finished:  # positions done before the kill get no row after it
        assert reps[k] == sum(1 for r in before if (r[4], int(r[5]), int(r[6])) == k)
    assert res.rows_written == len(rows) - len(done_rows)


def test_warmup_is_dropped_only_where_the_first_run_is_as_fast() -> None:
    from trt_latency.engines.adaptive import PositionState

    rng = np.random.default_rng(2)
    same, slow = PositionState("prefill", 0, 512), PositionState("decode", 1, 1)
    for _ in range(12):
        t = 10.0 * (1 + 0.001 * rng.standard_normal())
        same.note_warmup(np.array([t * (1 + 0.001 * rng.standard_normal()), t]), min_reps=10, tolerance=0.01)
        slow.note_warmup(np.array([1.5 * t, t]), min_reps=10, tolerance=0.01)
    assert same.warmup == 0 and slow.warmup is None


def test_time_to_target_follows_the_square_root_law() -> None:
    rng = np.random.default_rng(3)
    st = PositionState("decode", 512, 1, values=list(2.0 * np.exp(rng.normal(0.0, 0.2, 100))), target=0.005)
    se, med = st.se_rel(), st.median()
    assert se > 0.01  # 20% per-visit noise over 100 visits: well short of 0.5%
    want = 100 * ((se / 0.005) ** 2 - 1) * 2 * med * 1e-3  # visits still needed x (warm-up + timed) x median
    assert time_to_target([st], plan_warmup=1) == pytest.approx(want)
    assert time_to_target([st], plan_warmup=0) == pytest.approx(want / 2)
    done = PositionState("decode", 1, 1, values=[1.0] * 50, target=0.005)  # SE 0: no more time
    assert time_to_target([done]) == 0.0
    assert time_to_target([PositionState("decode", 2, 1, values=[1.0], target=0.005)]) == math.inf  # no SE yet
    st.stop = STOP_TIME
    text = describe([st], AdaptiveSpec(precision=0.005), {"decode": 1, "prefill": 0})
    assert f"the target needs about {want:.0f} s more" in text


def test_finish_reports_the_se_with_the_drift_divided_out() -> None:
    positions = [1, 4, 16, 64, 256, 512, 1024, 2048, 4096]
    sched = Scheduler([("decode", p, 1) for p in positions], AdaptiveSpec(precision=0.005), {"decode": 400})
    rng = np.random.default_rng(5)
    level = 0.0
    for r in range(80):  # serpentine rounds on a machine whose speed wanders (~25% over the sweep)
        for p in positions if r % 2 == 0 else positions[::-1]:
            level += rng.normal(0.0, 0.02)
            sched.add(("decode", p, 1), r, (0.3 + 1e-3 * p) * math.exp(level + rng.normal(0.0, 0.05)))
    assert [k for k, _ in sched.decode_log[: len(positions)]] == positions  # measuring order kept
    sched.finish(out_of_time=True)
    sts = list(sched.positions.values())
    raw = np.array([st.se_rel() for st in sts])
    drift = np.array([st.se_drift for st in sts], dtype=float)
    assert np.isfinite(drift).all() and np.median(drift) < 0.7 * np.median(raw)
    text = describe(sts, AdaptiveSpec(precision=0.005), {"decode": 1, "prefill": 0})
    assert "with the machine's drift divided out" in text
    # The time still needed is priced from the drift-free SE (the one the fit's medians have).
    assert time_to_target(sts) < time_to_target([replace(st, se_drift=None) for st in sts])
