"""Sweep: grid, interleaved order, rows appended as measured, resume after SIGKILL and partial lines; replay."""

from __future__ import annotations

import csv
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from helpers.kill import kill_at_rows  # noqa: E402
from helpers.plans import write_plan  # noqa: E402

from trt_latency.engines.backends import open_runner  # noqa: E402
from trt_latency.engines.config import ConfigKey, load_plan  # noqa: E402
from trt_latency.engines.export import export_decoder  # noqa: E402
from trt_latency.engines.replay import draw_requests, run_replay  # noqa: E402
from trt_latency.engines.sweep import (  # noqa: E402
    SAMPLES_COLUMNS,
    decode_positions,
    measurement_order,
    plan_rows,
    run_sweep,
)
from trt_latency.errors import SamplesError  # noqa: E402

KEY = ConfigKey(0, 1, 2)


def _rows(path: Path) -> list[tuple[str, ...]]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        assert tuple(next(reader)) == SAMPLES_COLUMNS
        return [tuple(r) for r in reader]


def _keys(rows: list[tuple[str, ...]]) -> Counter[tuple[str, ...]]:
    return Counter(r[:8] for r in rows)  # config + batch + phase, past_len, new_tokens, rep


def test_decode_positions_grid() -> None:
    pos = decode_positions(4096, 10, 10)
    assert pos == sorted(set(pos)) and pos[0] == 1 and pos[-1] == 4096
    assert {1, 2, 4, 410, 4096} <= set(pos) and len(pos) >= 18
    assert decode_positions(3, 10, 10) == [1, 2, 3]
    assert len(decode_positions(4096, 8, 6)) >= 12  # the --quick grid still gives >= 12 positions


def test_order_is_serpentine_rounds(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path))
    rows = plan_rows(plan.tier(0), plan.sweep)
    order = measurement_order(rows)
    assert sorted(order) == sorted(rows)
    shapes = {(r.phase, r.past_len, r.new_tokens) for r in rows}
    n = len(shapes)
    assert plan.sweep.decode.reps >= 2 and len(order) >= 2 * n
    first, second = order[:n], order[n: 2 * n]
    assert {(r.phase, r.past_len, r.new_tokens) for r in first} == shapes  # every shape before any repeat
    assert {r.rep for r in first} == {0} and {r.rep for r in second} == {1}
    dec1 = [r.past_len for r in first if r.phase == "decode"]
    dec2 = [r.past_len for r in second if r.phase == "decode"]
    assert dec1 == sorted(dec1) and dec2 == sorted(dec2, reverse=True)  # a neighbour before every visit
    assert [r.phase for r in first] == sorted(r.phase for r in first)  # decode walk, then the prefill lengths
    pre1 = [r.new_tokens for r in first if r.phase == "prefill"]
    pre2 = [r.new_tokens for r in second if r.phase == "prefill"]
    assert pre1 == sorted(pre1) and pre2 == sorted(pre2, reverse=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sweep")
    plan_path = write_plan(d, log=8, lin=8, reps=6)
    model = export_decoder(load_plan(plan_path).tier(0), 1, 2, d / "model.onnx")
    return plan_path, model


def test_sweep_writes_planned_rows_and_resumes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    plan_path, model = setup
    plan = load_plan(plan_path)
    runner = open_runner(model, "ort-cpu", threads=1)
    samples = tmp_path / "samples.csv"
    planned = plan_rows(plan.tier(0), plan.sweep)
    res = run_sweep(runner, KEY, plan, samples, progress=False)
    assert res.rows_written == res.rows_planned == len(planned) and res.rows_skipped == 0
    rows = _rows(samples)
    assert len(rows) == len(planned) and max(_keys(rows).values()) == 1
    assert all(float(r[8]) > 0 and r[9] == "ort-cpu" for r in rows)
    again = run_sweep(runner, KEY, plan, samples, progress=False)
    assert again.rows_written == 0 and again.rows_skipped == len(planned)
    # A killed writer leaves half a row: it is cut and measured again, never duplicated.
    data = samples.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n")
    samples.write_bytes(data[: cut + 1] + data[cut + 1: cut + 12])
    fixed = run_sweep(runner, KEY, plan, samples, progress=False)
    assert fixed.rows_written == 1
    rows = _rows(samples)
    assert len(rows) == len(planned) and max(_keys(rows).values()) == 1
    other = ConfigKey(1, 2, 1)  # another config's rows in the same file are independent
    moe = open_runner(export_decoder(plan.tier(1), 2, 1, tmp_path / "moe.onnx"), "ort-cpu", threads=1)
    assert run_sweep(moe, other, plan, samples, progress=False).rows_written == len(planned)


def test_sweep_refuses_a_foreign_header(setup: tuple[Path, Path], tmp_path: Path) -> None:
    plan_path, model = setup
    samples = tmp_path / "samples.csv"
    samples.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(SamplesError, match="header"):
        run_sweep(open_runner(model, "ort-cpu", threads=1), KEY, load_plan(plan_path), samples, progress=False)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_exactly_the_planned_rows(setup: tuple[Path, Path], tmp_path: Path) -> None:
    _, model = setup
    plan_path = write_plan(tmp_path, log=8, lin=8, reps=20)  # ~400 rows: the kill lands well inside the run
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
    planned = plan_rows(plan.tier(0), plan.sweep)
    stop = len(planned) // 4
    kill_at_rows(script, stop, torn=samples)
    assert samples.read_bytes().count(b"\n") - 1 == stop  # the header, the stopped-at rows, a torn row
    res = run_sweep(open_runner(model, "ort-cpu", threads=1), KEY, plan, samples, progress=False)
    rows = _rows(samples)
    assert res.rows_written == len(planned) - res.rows_skipped
    assert len(rows) == len(planned) and max(_keys(rows).values()) == 1
    assert {(r[4], int(r[5]), int(r[6]), int(r[7])) for r in rows} == {tuple(p) for p in planned}


def test_replay_rows_and_resume(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from trt_latency.estimator.requests import read_requests

    plan_path, model = setup
    plan = load_plan(plan_path)
    tier = plan.tier(0)
    runner = open_runner(model, "ort-cpu", threads=1)
    log = tmp_path / "requests.csv"
    res = run_replay(runner, KEY, tier, plan.replay, log, n=3, progress=False)
    assert (res.rows_written, res.rows_skipped) == (3, 0)
    res = run_replay(runner, KEY, tier, plan.replay, log, n=5, progress=False)
    assert (res.rows_written, res.rows_skipped) == (2, 3)
    reqs = read_requests(log)
    drawn = draw_requests(plan.replay, 5, tier)
    assert reqs.request_id.tolist() == [0, 1, 2, 3, 4]
    assert reqs.output_tokens.tolist() == [r.output_tokens for r in drawn]
    assert (reqs.vision_tokens + reqs.text_tokens).min() >= 1
    assert np.all(reqs.total_ms >= reqs.ttft_ms) and np.all(reqs.ttft_ms > 0)
    assert set(reqs.metadata["backend"]) == {"ort-cpu"}
    assert reqs.num_active_blocks.tolist() == [2] * 5
    # The first decode step is timed on its own (the loop fit's c(P) rows): inside the decode total, and
    # empty (NaN) exactly for 1-token requests.
    first = reqs.first_step_ms
    assert first is not None
    two = reqs.output_tokens >= 2
    assert np.all(np.isnan(first[~two])) and np.all(first[two] > 0)
    assert np.all(first[two] <= (reqs.total_ms - reqs.ttft_ms)[two] + 1e-6)


def test_replay_resumes_into_a_log_written_before_first_step_ms(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from trt_latency.estimator.requests import read_requests

    plan_path, model = setup
    plan = load_plan(plan_path)
    runner = open_runner(model, "ort-cpu", threads=1)
    log = tmp_path / "requests.csv"
    run_replay(runner, KEY, plan.tier(0), plan.replay, log, n=2, progress=False)
    lines = log.read_text().splitlines()  # the same rows as an older version wrote them: no first_step_ms
    col = lines[0].split(",").index("first_step_ms")
    log.write_text("\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != col) for line in lines) + "\n")
    res = run_replay(runner, KEY, plan.tier(0), plan.replay, log, n=4, progress=False)
    assert (res.rows_written, res.rows_skipped) == (2, 2)
    reqs = read_requests(log)
    assert reqs.first_step_ms is None and len(reqs) == 4  # the detail is dropped, the rows kept


def test_samples_file_is_what_the_estimator_reads(setup: tuple[Path, Path], tmp_path: Path) -> None:
    samples_mod = pytest.importorskip("trt_latency.estimator.samples")
    assert tuple(samples_mod.SAMPLES_COLUMNS) == SAMPLES_COLUMNS
    plan_path, model = setup
    plan = load_plan(write_plan(tmp_path, log=3, lin=2, reps=2))
    path = tmp_path / "samples.csv"
    res = run_sweep(open_runner(model, "ort-cpu", threads=1), KEY, plan, path, progress=False)
    assert len(samples_mod.read_samples(path).latency_ms) == res.rows_written
