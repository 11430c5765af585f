"""The batch axis: plan block, batched sweep (rows appended as measured, resume after a partial line and
after SIGKILL), the batch fit (schema-2 section, held-out errors), T(B, X) semantics and calibrate."""

from __future__ import annotations

import csv
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from helpers.kill import kill_at_rows  # noqa: E402
from helpers.plans import TINY_PLAN  # noqa: E402

from trt_latency.engines.backends import open_runner  # noqa: E402
from trt_latency.engines.batch_sweep import batch_shapes, plan_batch_rows, run_batch_sweep  # noqa: E402
from trt_latency.engines.config import BatchSweep, ConfigKey, load_plan  # noqa: E402
from trt_latency.engines.export import export_decoder  # noqa: E402
from trt_latency.engines.sweep import run_sweep  # noqa: E402
from trt_latency.errors import CalibrationError, ConfigError  # noqa: E402
from trt_latency.estimator.batch_model import batch_step, batch_step_ms, section_from_decode  # noqa: E402
from trt_latency.estimator.calibration import (  # noqa: E402
    dump_calibration,
    load_calibration,
    save_calibration,
    with_batch,
)
from trt_latency.estimator.fit import fit_samples  # noqa: E402
from trt_latency.estimator.model import Estimator  # noqa: E402
from trt_latency.estimator.samples import read_samples  # noqa: E402
from trt_latency.schema import SAMPLES_COLUMNS  # noqa: E402

KEY = ConfigKey(0, 1, 2)
BATCH_BLOCK = """
batch:
  sizes: [1, 2, 4]
  past_lens: [1, 32, 96, 160, 256]
  ragged: 2
  reps: REPS
  warmup: 0
"""


def write_batch_plan(directory: Path, reps: int = 2, extra: str = "") -> Path:
    path = directory / "plan.yaml"
    text = (TINY_PLAN.replace("LOG", "4").replace("LIN", "2").replace("REPS", "2")
            + BATCH_BLOCK.replace("REPS", str(reps)) + extra)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("batch_sweep")
    plan = load_plan(write_batch_plan(d))
    return export_decoder(plan.tier(0), 1, 2, d / "model.onnx")


def _runner(model: Path) -> object:
    return open_runner(model, "ort-cpu", threads=1, max_batch=4)


def _batched(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        assert tuple(next(reader)) == SAMPLES_COLUMNS
        return [r for r in reader if int(r[3]) > 1]


def test_plan_block_and_shapes(tmp_path: Path) -> None:
    plan = load_plan(write_batch_plan(tmp_path, extra="  max_kv_tokens: 512\n"))
    assert plan.batch == BatchSweep(sizes=(1, 2, 4), past_lens=(1, 32, 96, 160, 256), ragged=2, reps=2, warmup=0,
                                    max_kv_tokens=512)
    shapes = batch_shapes(plan.batch, 256, max_batch=4, seed=0)
    assert shapes == batch_shapes(plan.batch, 256, max_batch=4, seed=0)  # seeded
    assert all(s.batch * s.kv_max <= 512 for s in shapes) and {s.batch for s in shapes} == {2, 4}
    assert sum(s.ragged for s in shapes) == 4 and all(len(set(s.kv_lens)) > 1 for s in shapes if s.ragged)
    assert {s.batch for s in batch_shapes(plan.batch, 256, max_batch=2)} == {2}  # the runner's max_batch caps
    for bad, field in (("  sizes: [1, 2, 4]\n", "batch.sizes"),):
        p = tmp_path / "bad.yaml"
        p.write_text(write_batch_plan(tmp_path).read_text().replace(bad, "  sizes: [2, 4]\n"))
        with pytest.raises(ConfigError, match=field):
            load_plan(p)
    p = tmp_path / "quick.yaml"
    p.write_text(TINY_PLAN.replace("LOG", "4").replace("LIN", "2").replace("REPS", "2").replace(
        "  replay: {requests: 3}", "  replay: {requests: 3}\n  batch: {reps: 1}"))
    with pytest.raises(ConfigError, match="quick.batch"):
        load_plan(p)
    assert load_plan(write_batch_plan(tmp_path, extra=""), quick=True).batch is not None


def test_batch_sweep_appends_and_resumes(model: Path, tmp_path: Path) -> None:
    plan = load_plan(write_batch_plan(tmp_path, reps=2))
    samples = tmp_path / "samples.csv"
    runner = _runner(model)
    planned = plan_batch_rows(plan.batch, runner.max_past_len, runner.max_batch, plan.sweep.seed)  # type: ignore[attr-defined]
    res = run_batch_sweep(runner, KEY, plan, samples, progress=False)
    rows = _batched(samples)
    assert res.rows_written == len(planned) == len(rows) and res.sizes == (2, 4)
    for r in rows:  # batch metadata: past_len = kv_max, kv_total between kv_max and B * kv_max
        b, past, total, kmax = int(r[3]), int(r[5]), int(r[12]), int(r[13])
        assert r[4] == "decode" and r[6] == "1" and past == kmax and kmax <= total <= b * kmax
    assert run_batch_sweep(runner, KEY, plan, samples, progress=False).rows_written == 0
    # A killed writer leaves half a row: it is cut and measured again, never duplicated.
    data = samples.read_bytes()
    samples.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + b"0,1,2,4,dec")
    res = run_batch_sweep(runner, KEY, plan, samples, progress=False)
    rows = _batched(samples)
    assert res.rows_written == 1 and len(rows) == len(planned)
    assert max(Counter((r[3], r[5], r[12], r[7]) for r in rows).values()) == 1


def test_deadline_keeps_min_rounds_and_a_rerun_adds_the_rest(model: Path, tmp_path: Path) -> None:
    from trt_latency.engines.sweep import MIN_ROUNDS

    plan = load_plan(write_batch_plan(tmp_path, reps=MIN_ROUNDS + 3))
    samples = tmp_path / "samples.csv"
    runner = _runner(model)
    planned = plan_batch_rows(plan.batch, runner.max_past_len, runner.max_batch, plan.sweep.seed)  # type: ignore[attr-defined]
    shapes = len({r.shape for r in planned})
    res = run_batch_sweep(runner, KEY, plan, samples, progress=False, deadline=time.perf_counter())  # already due
    rows = _batched(samples)
    assert res.out_of_time and res.rows_written == len(rows) == MIN_ROUNDS * shapes  # coverage, not precision
    assert {int(r[7]) for r in rows} == set(range(MIN_ROUNDS))
    res = run_batch_sweep(runner, KEY, plan, samples, progress=False)  # no deadline: the rest of the rounds
    rows = _batched(samples)
    assert not res.out_of_time and res.rows_written == len(planned) - MIN_ROUNDS * shapes
    assert len(rows) == len(planned) and max(Counter((r[3], r[5], r[12], r[7]) for r in rows).values()) == 1


def test_sigkill_midway_then_rerun_gives_exactly_the_planned_rows(model: Path, tmp_path: Path) -> None:
    plan_path = write_batch_plan(tmp_path, reps=30)
    samples = tmp_path / "samples.csv"
    script = textwrap.dedent(f"""
        from trt_latency.engines.backends import open_runner
        from trt_latency.engines.batch_sweep import run_batch_sweep
        from trt_latency.engines.config import ConfigKey, load_plan
        plan = load_plan({str(plan_path)!r})
        runner = open_runner({str(model)!r}, "ort-cpu", threads=1, max_batch=4)
        print("ready", flush=True)
        run_batch_sweep(runner, ConfigKey(0, 1, 2), plan, {str(samples)!r}, progress=False)
    """)
    plan = load_plan(plan_path)
    planned = plan_batch_rows(plan.batch, 256, 4, plan.sweep.seed)  # type: ignore[arg-type]
    stop = len(planned) // 4
    kill_at_rows(script, stop, torn=samples)
    assert samples.read_bytes().count(b"\n") - 1 == stop  # the header, the stopped-at rows, a torn row
    res = run_batch_sweep(_runner(model), KEY, plan, samples, progress=False)
    rows = _batched(samples)
    assert res.rows_written == len(planned) - res.rows_skipped and len(rows) == len(planned)
    assert {(int(r[3]), int(r[5]), int(r[12]), int(r[7])) for r in rows} == {p.key for p in planned}


def test_fit_writes_a_schema_2_section_that_round_trips(model: Path, tmp_path: Path) -> None:
    plan = load_plan(write_batch_plan(tmp_path, reps=3))
    samples_path = tmp_path / "samples.csv"
    runner = _runner(model)
    run_sweep(runner, KEY, plan, samples_path, progress=False)
    run_batch_sweep(runner, KEY, plan, samples_path, progress=False)
    samples = read_samples(samples_path)
    cal = fit_samples(samples, batch_kv_read=runner.batch_kv_read)  # type: ignore[attr-defined]
    cfg = cal.configs[0]
    section = cfg.batch
    assert cal.schema_version == 2 and section is not None and section["kv_read"] == "padded"
    assert section["sizes"] == [1, 2, 4] and [c["batch"] for c in section["curves"]] == [1, 2, 4]
    for c in section["curves"]:
        assert np.all(np.diff(c["values_ms"]) >= 0) and np.all(np.diff(c["knots_x"]) > 0)
    err = section["fit_error"]
    assert {"lopo_median_rel", "lobo_median_rel", "lobo_max_rel", "ragged_median_rel", "ragged_max_rel"} <= set(err)
    assert err["n_ragged_shapes"] == 4 and np.isfinite(err["lobo_median_rel"]) and np.isfinite(err["ragged_max_rel"])
    # B = 1 is the single-request decode model, unchanged.
    est = Estimator(cal)
    for past in (1, 40, 200, 256):
        assert batch_step_ms(section, [past]) == pytest.approx(est.decode_step_ms(past, 0, 1, 2, serving=False))
    # Round trip exact; the single-request part alone is still written as (and loads as) version 1.
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    save_calibration(cal, a)
    save_calibration(load_calibration(a), b)
    assert a.read_bytes() == b.read_bytes() and load_calibration(a) == cal
    single = fit_samples(samples.__class__(**{**samples.__dict__, "batch": np.ones_like(samples.batch)}))
    assert single.schema_version == 1 and "batch:" not in dump_calibration(single)
    assert with_batch(single, {cfg.key: section}).schema_version == 2
    # The serving side's optional factors from a batched replay survive a round trip.
    conf = with_batch(cal, {cfg.key: {**section, "conformal": {"alphas": [0.05, 0.1], "factors": [1.3, 1.1]}}})
    save_calibration(conf, b)
    assert load_calibration(b).configs[0].batch["conformal"] == {"alphas": [0.05, 0.1], "factors": [1.3, 1.1]}  # type: ignore[index]
    text = a.read_text()
    for old, new, field in (("kv_read: padded", "kv_read: dense", "configs[0].batch.kv_read"),
                            ("sizes: [1, 2, 4]", "sizes: [2, 4, 8]", "configs[0].batch.sizes[0]"),
                            ("schema_version: 2", "schema_version: 1", "configs[0].batch")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(CalibrationError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_calibration(bad)


def test_step_cost_semantics() -> None:
    """Linear between knots, first/last segment extended (flagged), linear in B between sizes and beyond."""
    section = {"kv_read": "padded", "prefill_with_batch": "separate", "sizes": [1, 2, 4],
               "curves": [{"batch": 1, "knots_x": [0.0, 100.0], "values_ms": [1.0, 2.0]},
                          {"batch": 2, "knots_x": [0.0, 200.0], "values_ms": [1.5, 3.5]},
                          {"batch": 4, "knots_x": [0.0, 400.0], "values_ms": [2.0, 6.0]}]}
    assert batch_step_ms(section, [50]) == pytest.approx(1.5)
    assert batch_step_ms(section, [50, 10]) == pytest.approx(2.5)  # padded: X = 2 * 50
    step = batch_step(section, [20, 20, 20])  # X = 60, halfway between sizes 2 and 4
    assert step.ms == pytest.approx((2.1 + 2.6) / 2) and not step.extrapolated
    big = batch_step(section, [10] * 8)  # beyond the largest size: from sizes 2 and 4
    assert big.ms == pytest.approx(2.3 + (2.8 - 2.3) * 3) and big.extrapolated
    assert batch_step({**section, "kv_read": "packed"}, [50, 10]).x == 60.0
    assert batch_step(section, [500]).extrapolated and batch_step(section, [500]).ms == pytest.approx(6.0)
    one = section_from_decode([1.0, 64.0, 256.0], [1.0, 1.5, 3.0])
    assert batch_step_ms(one, [0]) == pytest.approx(1.0)  # constant below the first knot like T(L)


def test_calibrate_runs_the_batch_sweep(tmp_path: Path) -> None:
    from trt_latency.pipeline import CalibrateOptions, calibrate

    lines: list[str] = []
    res = calibrate(CalibrateOptions(config=str(write_batch_plan(tmp_path, reps=2)), out=str(tmp_path / "out"),
                                     quick=True, no_replay=True, no_progress=True), say=lines.append)
    cal = load_calibration(res.calibration)
    assert cal.configs[0].batch is not None and cal.configs[0].batch["sizes"] == [1, 2, 4]
    text = "\n".join(lines)
    assert "batch sweep t0.k1.b2: batch sizes 2, 4" in text and "batched decode step" in text
    assert "leave-one-batch-size-out" in text
    pytest.importorskip("matplotlib")
    assert res.batch_plot is not None and res.batch_plot.stat().st_size > 0
    assert res.plot is not None  # decode.png as before
