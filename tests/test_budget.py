"""--time-budget over the whole calibrate (trt_latency/budget.py): the pilot on a real ONNX Runtime runner,
the allocation's arithmetic on the packaged plan, the replay stopping at its deadline and resuming, the
summary's closing lines, --threads and the ONNX Runtime build in provenance, plain progress lines in a log.
Timing targets are not asserted here (benchmarks are for that): what is asserted is what the budget decides."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from trt_latency.budget import (
    FIT_RESERVE_S,
    MIN_LINEAR_POINTS,
    MIN_LOG_POINTS,
    MIN_LOOP_REQUESTS,
    MIN_PREFILL_LENGTHS,
    Ledger,
    Prices,
    allocate,
    pilot,
    target_end,
)
from trt_latency.cli import main
from trt_latency.engines.config import load_plan

TINY_PLAN = """\
schema_version: 1
tiers:
  - {tier_idx: 0, name: tiny, hidden: 64, layers: 2, heads: 2, kv_heads: 1, head_dim: 32, intermediate: 128,
     vocab: 128, experts: 1, dtype: float32, max_past_len: 256, max_prefill_len: 64}
configs:
  - {tier_idx: 0, top_k: 1, num_active_blocks: 2}
runtime: {intra_op_threads: 1, inter_op_threads: 1}
sweep:
  decode: {log_points: 4, linear_points: 3, reps: 2, warmup: 1}
  prefill: {lengths: [4, 16, 48], reps: 2}
  seed: 0
replay:
  requests: 6
  vision_tokens: [0, 8]
  text_tokens: [4, 48]
  output_tokens: [2, 200]
  seed: 0
"""


@pytest.fixture()
def plan_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PLAN)
    return path


def _prices(step_ms: float, prefill_ms: float) -> Prices:
    return Prices(decode=[(1, step_ms), (4096, step_ms * 2)], prefill=[(8, prefill_ms / 50), (1024, prefill_ms)])


def test_allocation_keeps_the_plan_when_it_is_affordable_and_trims_it_when_not() -> None:
    plan = load_plan(None)
    tier = plan.tier(0)
    cheap = allocate(_prices(0.01, 1.0), plan, tier, 60.0, requests=80, exact=False, batch=True, vision=False)
    assert cheap.requests == 80 and not cheap.notes
    assert cheap.plan.sweep.decode == plan.sweep.decode and cheap.plan.sweep.prefill == plan.sweep.prefill
    assert cheap.batch_s == pytest.approx(0.15 * 60.0) and cheap.vision_s == 0.0
    # A 0.5B-class model: 30-60 ms steps, a 1-s prefill at 1024. Fewer requests (never under the minimum),
    # a thinner grid, fewer prefill reps, and each change said in a note.
    dear = allocate(_prices(30.0, 1000.0), plan, tier, 60.0, requests=80, exact=False, batch=True, vision=True)
    assert MIN_LOOP_REQUESTS <= dear.requests < 80 and dear.requests % 2 == 0
    d = dear.plan.sweep.decode
    assert (d.log_points, d.linear_points) == (MIN_LOG_POINTS, MIN_LINEAR_POINTS)
    assert dear.plan.sweep.prefill.reps < plan.sweep.prefill.reps
    assert len(dear.plan.sweep.prefill.lengths) < len(plan.sweep.prefill.lengths)
    assert dear.vision_s > 0
    said = " | ".join(dear.notes)
    for change in ("position grid", "prefill grid", "replay", "prefill reps"):
        assert change in said, said
    # --requests N is kept as asked (the deadline still stops the replay).
    exact = allocate(_prices(30.0, 1000.0), plan, tier, 60.0, requests=80, exact=True, batch=False, vision=False)
    assert exact.requests == 80
    # No budget: the plan as written.
    assert allocate(_prices(30.0, 1000.0), plan, tier, None, requests=80, exact=False, batch=True,
                    vision=False).plan is plan


def test_target_windows_share_what_is_left() -> None:
    assert target_end(0.0, None, 3) is None
    end = target_end(100.0, 60.0, 3, now=110.0)
    assert end == pytest.approx(110.0 + (60.0 - FIT_RESERVE_S - 10.0) / 3)
    assert target_end(0.0, 10.0, 1, now=50.0) == 50.0  # spent: no window, never a negative one


def test_ledger_records_phases_and_overruns() -> None:
    ledger = Ledger()
    with ledger.phase("sweep", deadline=None):
        pass
    with ledger.phase("replay", deadline=0.0, slack_s=0.0):  # a deadline long past
        pass
    assert set(ledger.seconds) == {"sweep", "replay"}
    assert [o.phase for o in ledger.overruns] == ["replay"]


@pytest.mark.slow
def test_pilot_prices_a_real_runner(tmp_path: Path, plan_path: Path) -> None:
    from trt_latency.engines.backends import open_runner
    from trt_latency.engines.export import export_decoder
    from trt_latency.engines.replay import random_prompt

    plan = load_plan(plan_path)
    tier = plan.tier(0)
    model = tmp_path / "m.onnx"
    export_decoder(tier, 1, 2, model, seed=0)
    import numpy as np

    with open_runner(model, "ort-cpu", threads=1, max_past_len=256, max_new_tokens=64) as runner:
        def one(prices: Prices) -> float:
            res = runner.generate(random_prompt(runner, 16, np.float32, np.random.default_rng(0)), 8)
            return float(res.total_ms) / (prices.prefill_ms(16) + 7 * prices.decode_ms(20))

        prices = pilot(runner, 256, [4, 16, 48], one)
    assert [p for p, _ in prices.decode] == [1, 16, 256] and [s for s, _ in prices.prefill] == [4, 16, 48]
    assert all(ms > 0 for _, ms in prices.decode + prices.prefill)
    assert 1.0 <= prices.request_overhead <= 3.0 and prices.seconds > 0
    assert prices.request_s(16, 8) > 0


@pytest.mark.slow
def test_replay_stops_at_the_budget_keeps_its_rows_and_a_rerun_continues(
        tmp_path: Path, plan_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    cmd = ["calibrate", str(plan_path), "--out", str(out), "--no-progress", "--no-plot", "--requests", "4000",
           "--time-budget", "15", "--threads", "1"]
    assert main(cmd) == 0
    text = capsys.readouterr().out
    with (out / "requests.csv").open() as fh:
        first = len(list(csv.DictReader(fh)))
    assert 0 < first < 4000, first
    assert "--time-budget reached after" in text and "a rerun into the same --out replays the rest" in text
    assert "Where the time went: " in text and "replay" in text.split("Where the time went: ")[1]
    assert "A larger --time-budget would buy:" in text and "the replay's other" in text
    assert "  budget       " in text  # held, or EXCEEDED with where
    assert "threads      1 intra-op" in text
    assert main(cmd) == 0  # resumable: the same requests, more of them
    with (out / "requests.csv").open() as fh:
        ids = [int(r["request_id"]) for r in csv.DictReader(fh)]
    assert len(ids) > first and len(ids) == len(set(ids)) and sorted(ids) == list(range(len(ids)))

    from trt_latency.estimator.calibration import load_calibration

    prov = load_calibration(out / "calibration.yaml").provenance
    assert prov["threads"] == {"intra_op": 1, "inter_op": 1}
    ort = prov["onnxruntime"]
    assert ort["package"].startswith("onnxruntime") and ort["version"] and "CPUExecutionProvider" in ort["providers"]


def test_threads_flag_is_validated(tmp_path: Path, plan_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(plan_path), "--out", str(tmp_path / "o"), "--threads", "0"]) == 1
    assert "--threads" in capsys.readouterr().err


def test_prefill_grid_reaches_the_usable_prompt_length(plan_path: Path) -> None:
    from trt_latency.engines.sweep import prefill_lengths

    plan = load_plan(plan_path)
    tier = plan.tier(0)
    assert prefill_lengths(tier, plan.sweep) == [4, 16, 48, 64]  # the tier's max_prefill_len, 64, is reached
    assert prefill_lengths(tier, plan.sweep, max_new_tokens=32) == [4, 16, 32]
    assert prefill_lengths(replace(tier, max_prefill_len=48), plan.sweep) == [4, 16, 48]


def test_plain_progress_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.engines.sweep import PlainProgress, progress_bar

    assert isinstance(progress_bar(10, "sweep t0.k1.b2", True), PlainProgress)  # pytest's stderr: no terminal
    assert progress_bar(10, "sweep", False) is None
    bar = PlainProgress(10, "replay t0.k1.b2", "request", every=0.0)
    bar.set_postfix_str("3 positions active")
    bar.update(4)
    bar.close()
    assert capsys.readouterr().err.strip() == "replay t0.k1.b2: 4 of 10 requests, 0 s, 3 positions active"


def test_a_real_size_window_keeps_the_loop_terms_and_drops_the_batch_sweep() -> None:
    """0.5B-class prices in the default window (benchmarks/realsize: 30-50 ms steps, a 4-s prefill at 1024): the
    sweep's floor and MIN_LOOP_REQUESTS replayed requests come first; the batch sweep, whose own floor would
    leave no replay at all, is skipped and says so; the replay's deadline never falls before its floor."""
    plan = load_plan(None)
    tier = plan.tier(0)
    alloc = allocate(_prices(30.0, 4000.0), plan, tier, 80.0, requests=80, exact=False, batch=True, vision=False)
    assert alloc.plan.batch is None and alloc.batch_s == 0.0
    assert any(n.startswith("batch sweep skipped") for n in alloc.notes), alloc.notes
    assert alloc.requests >= MIN_LOOP_REQUESTS and alloc.replay_floor_s > 0
    assert max(alloc.plan.sweep.prefill.lengths) == max(plan.sweep.prefill.lengths)  # the longest is kept
    assert len(alloc.plan.sweep.prefill.lengths) >= MIN_PREFILL_LENGTHS
    # A fixture-sized model in the same window keeps everything.
    cheap = allocate(_prices(0.5, 20.0), plan, tier, 80.0, requests=80, exact=False, batch=True, vision=False)
    assert cheap.plan.batch is plan.batch and cheap.batch_s > 0


def test_floors_over_the_window_are_said_up_front() -> None:
    """A model whose floors (MIN_ROUNDS of the thinned grids, MIN_LOOP_REQUESTS replayed requests) cannot fit
    the window (the 0.5B fp32 export: 4.5-s step rounds, 14-s prefill rounds, 6-s requests in an 81-s
    window) is told how late it will end before it starts; a window that holds them says nothing."""
    plan = load_plan(None)
    tier = plan.tier(0)
    alloc = allocate(_prices(100.0, 9000.0), plan, tier, 81.0, requests=80, exact=False, batch=True, vision=False)
    note = [n for n in alloc.notes if n.startswith("floors over the window")]
    assert len(note) == 1 and "past --time-budget" in note[0], alloc.notes
    late = float(note[0].split("expect to finish about ")[1].split(" s past")[0])
    assert late > 0 and late == pytest.approx(alloc.sweep_floor_s + alloc.replay_floor_s - 81.0, abs=0.5)
    fits = allocate(_prices(30.0, 4000.0), plan, tier, 115.0, requests=80, exact=False, batch=True, vision=False)
    assert not any(n.startswith("floors over the window") for n in fits.notes), fits.notes


def test_a_real_size_model_gets_the_real_size_default_budget(tmp_path: Path) -> None:
    """The packaged plan's 115 s is for small models; a model with >= 100 MiB of files (its external weights
    included) gets 240 s and the reason, unless the user set the budget, brought a plan or asked --quick."""
    from trt_latency.pipeline import REAL_SIZE_BUDGET_S, CalibrateOptions, Target, model_files, sized_budget

    plan = load_plan(None)
    small = plan.sweep.adaptive.time_budget_s
    assert small is not None and small < REAL_SIZE_BUDGET_S
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x" * 1000)
    (tmp_path / "other.onnx").write_bytes(b"x")  # another model's file does not count
    targets = [Target(plan.primary, plan.tier(plan.primary.tier_idx), model)]
    opts = CalibrateOptions(onnx=str(model))
    assert sized_budget(opts, plan, targets) == (plan, "")  # 1000 bytes: a small model
    with open(tmp_path / "model.onnx.data", "wb") as f:  # genai's external weights, sparse: 150 MiB
        f.truncate(150 << 20)
    assert [p.name for p in model_files(model)] == ["model.onnx", "model.onnx.data"]
    sized, why = sized_budget(opts, plan, targets)
    assert sized.sweep.adaptive.time_budget_s == REAL_SIZE_BUDGET_S and "150 MiB of weights" in why
    for kept in (replace(opts, time_budget=60.0), replace(opts, config="my.yaml"), replace(opts, quick=True)):
        assert sized_budget(kept, plan, targets) == (plan, ""), kept


def test_the_longest_prompt_of_a_model_you_bring_and_a_grid_of_no_fewer_than_four_lengths() -> None:
    """A user's decoder (here a genai export with an 8192 context) is timed to --max-prompt, else the plan's
    sweep.prefill.model_max_len (1024 packaged: docs/decisions.md 18), capped by its context; the grid ends
    there. Under 0.5B-class prices a grid to 2048 thins to 8 / 64 / 256 / 1024 / 2048 and never on to three."""
    import argparse

    from trt_latency.engines.sweep import prefill_lengths
    from trt_latency.pipeline import CalibrateOptions, tier_from_onnx

    model = Path(__file__).parent / "data" / "thirdparty" / "genai-llama-fp32" / "model.onnx"
    plan = load_plan(None)
    assert plan.sweep.prefill.model_max_len == 1024
    assert tier_from_onnx(model, plan, argparse.Namespace())[0].max_prefill_len == 1024
    assert tier_from_onnx(model, plan, CalibrateOptions(max_prompt=100_000))[0].max_prefill_len == 8192  # context
    longer = replace(plan, sweep=replace(plan.sweep, prefill=replace(plan.sweep.prefill, model_max_len=2048)))
    tier, _, _ = tier_from_onnx(model, longer, argparse.Namespace())
    assert tier == tier_from_onnx(model, plan, CalibrateOptions(max_prompt=2048))[0]
    assert tier.max_prefill_len == 2048 and prefill_lengths(tier, plan.sweep)[-2:] == [1024, 2048]
    real = Prices(decode=[(1, 30.0), (4096, 60.0)], prefill=[(8, 90.0), (256, 2250.0), (1024, 10100.0),
                                                             (2048, 20900.0)])
    alloc = allocate(real, plan, tier, 240.0, requests=80, exact=False, batch=True, vision=False)
    assert prefill_lengths(tier, alloc.plan.sweep) == [8, 64, 256, 1024, 2048], alloc.notes
    assert any(n.startswith("prefill grid 5 lengths, not 8") for n in alloc.notes), alloc.notes


class _CurveRunner:
    """time_step(0, S, n) returns n runs of a known prefill curve (the pilot's arithmetic, not a timing)."""

    def __init__(self, ms_per_token: float) -> None:
        self.ms_per_token = ms_per_token
        self.asked: list[int] = []

    def time_step(self, past_len: int, new_tokens: int, reps: int) -> Any:
        import numpy as np

        self.asked.append(new_tokens)
        return np.full(reps, self.ms_per_token * new_tokens)


def test_the_pilot_prices_a_slow_longest_prefill_from_the_two_below_it() -> None:
    """A real-size model's longest prefill (21 s at 2048 tokens on the 0.5B int4, one thread) is priced from
    the next-to-longest and the middle (log-log slope, linear to quadratic), not run in the pilot; a fixture's
    cheap longest is measured."""
    from trt_latency.budget import _price_prefill

    grid = [8, 32, 64, 128, 256, 512, 1024, 2048]
    slow = _CurveRunner(10.0)  # 10 ms per token: 1024 tokens take 10 s
    priced = dict(_price_prefill(slow, grid))
    assert 2048 not in slow.asked and sorted(priced) == [8, 256, 1024, 2048]
    assert priced[2048] == pytest.approx(20480.0)  # linear growth read off 256 -> 1024
    cheap = _CurveRunner(0.01)
    assert dict(_price_prefill(cheap, grid))[2048] == pytest.approx(20.48) and 2048 in cheap.asked
