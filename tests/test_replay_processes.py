"""The replay in fresh processes (engines/replay_processes.py, ``runtime.replay_processes``).

Real worker processes (spawn) open a real ONNX Runtime session on the committed genai-built fixture; the
parent's ReplayProcesses must hand back what the runner itself would, from processes that are not this
one, and report a worker that fails or dies instead of hanging.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from trt_latency.engines.backends import open_runner
from trt_latency.engines.replay_processes import ReplayProcesses
from trt_latency.errors import BackendUnavailable, ConfigError, InputError

MODEL = Path(__file__).parent / "data" / "thirdparty" / "genai-llama-int4" / "model.onnx"
OPEN = partial(open_runner, MODEL, backend="ort-cpu", threads=1, max_past_len=64, max_new_tokens=32)


def test_requests_go_round_robin_to_fresh_processes_and_match_the_runner() -> None:
    rng = np.random.default_rng(5)
    with OPEN() as runner:
        prompts = [runner.random_prompt(n, rng) for n in (5, 9, 12)]
        expected = [runner.generate(p, 4).tokens for p in prompts]
        surface = (runner.backend, runner.device, runner.token_input, runner.hidden, runner.dims.vocab)
    with ReplayProcesses(OPEN, 2) as pool:
        assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
        assert (pool.backend, pool.device, pool.token_input, pool.hidden, pool.vocab) == surface
        results = [pool.generate(p, 4) for p in prompts]
        # the prompt draw is the runner's own (same ids from the same rng state)
        assert np.array_equal(pool.random_prompt(7, np.random.default_rng(1)),
                              OPEN().random_prompt(7, np.random.default_rng(1)))
        assert "fresh replay processes" in pool.memory
    assert [r.tokens for r in results] == expected  # greedy tokens identical, whichever process ran them
    assert all(len(r.step_ms) == 3 and r.total_ms >= r.ttft_ms > 0 for r in results)


def test_a_worker_that_cannot_open_the_model_raises_its_error_here() -> None:
    missing = partial(open_runner, MODEL.parent / "nope.onnx", backend="ort-cpu")
    with pytest.raises(InputError, match="nope.onnx") as info:
        ReplayProcesses(missing, 1)
    assert any("in replay process 0" in note for note in getattr(info.value, "__notes__", []))


def test_a_worker_that_dies_is_reported_not_waited_for() -> None:
    with pytest.raises(BackendUnavailable, match="exited with code 3"):
        ReplayProcesses(partial(os._exit, 3), 2)


def test_processes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="processes must be >= 1"):
        ReplayProcesses(OPEN, 0)


def test_plan_key_and_flag_are_checked(tmp_path: Path) -> None:
    from helpers.plans import write_plan

    from trt_latency.engines.config import load_plan
    from trt_latency.pipeline import CalibrateOptions, with_adaptive_flags

    path = write_plan(tmp_path)
    plan = load_plan(path)
    assert plan.runtime.replay_processes == 3  # the default: three draws
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("inter_op_threads: 1}", "inter_op_threads: 1, replay_processes: -1}"))
    with pytest.raises(ConfigError, match="runtime.replay_processes"):
        load_plan(bad)
    assert with_adaptive_flags(plan, CalibrateOptions(replay_processes=0)).runtime.replay_processes == 0
    with pytest.raises(ConfigError, match="--replay-processes"):
        with_adaptive_flags(plan, CalibrateOptions(replay_processes=-2))


def test_calibrate_replays_in_fresh_processes_and_records_how_many(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.plans import CALIBRATE_PLAN

    from trt_latency.cli import main
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.requests import read_requests

    plan = tmp_path / "plan.yaml"
    plan.write_text(CALIBRATE_PLAN)
    out = tmp_path / "cal"
    assert main(["calibrate", str(plan), "--quick", "--out", str(out), "--backend", "ort-cpu", "--no-progress",
                 "--requests", "6", "--replay-processes", "2", "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "in 2 fresh processes (runtime.replay_processes)" in text
    assert len(read_requests(out / "requests.csv")) == 6
    cal = load_calibration(out / "calibration.yaml")
    assert cal.provenance["replay_processes"] == 2 and cal.provenance["loop"] == "ort"
