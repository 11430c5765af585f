"""benchmarks/realsize/compare.py's scoring (the README's real-size table): the errors as calibrated, and the
same requests as a serving process's AdmissionController corrects them online. CI never runs the benchmark
itself (it needs onnxruntime-genai and a 300-MB model); this checks the arithmetic its figures come from on
genai-shaped runs made from the committed calibration."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from trt_latency import Estimator

ROOT = Path(__file__).resolve().parents[1]
CAL = ROOT / "tests" / "data" / "calibration" / "calibration.yaml"


@pytest.fixture(scope="module")
def compare() -> Any:
    spec = importlib.util.spec_from_file_location("realsize_compare", ROOT / "benchmarks" / "realsize" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(est: Estimator, level: list[float]) -> dict[str, Any]:
    """A genai process whose i-th request runs at ``level[i]`` x the prediction (TTFT and total alike), and
    whose steps at KV 16 run at the last level."""
    key = est.configs()[0]
    ks = (key.tier_idx, key.top_k, key.num_active_blocks)
    requests = []
    for i, f in enumerate(level):
        prompt, output = 32 + 37 * i, 2 + 5 * (i % 4)
        p = est.predict(0, prompt, output, *ks)
        requests.append({"prompt": prompt, "output": output, "ttft_ms": p.prefill_ms * f, "total_ms": p.total_ms * f})
    step = est.decode_step_ms(16, *ks)
    return {"requests": requests, "sweep": [{"kv": 16, "step_kv": [16, 16], "step_ms": [step * level[-1]] * 2,
                                             "first_step_ms": step * level[-1]}]}


def test_a_process_level_offset_is_an_error_as_calibrated_and_followed_online(compare: Any) -> None:
    est = Estimator.load(CAL)
    s = compare.score(est, _run(est, [1.10] * 12))
    assert s["total_median"] == pytest.approx(1 - 1 / 1.10, rel=1e-6)  # predicted 9.1% low, every request
    assert s["ttft_median"] == pytest.approx(1 - 1 / 1.10, rel=1e-6)
    assert s["steps"][16]["err"] == pytest.approx(1 / 1.10 - 1, rel=1e-6)
    assert s["online_n"] == 12 - s["online_after"] and s["online_after"] == 4
    assert s["online_total_max"] < 1e-6 and s["online_ttft_median"] < 1e-6  # the controller found the level


def test_online_scoring_feeds_only_what_ended_before_the_request(compare: Any) -> None:
    """A step in the level at request 8: the online error of request 8 is the step's (its own time is not fed
    before it is predicted), and the window follows it within a few requests."""
    est = Estimator.load(CAL)
    s = compare.score(est, _run(est, [1.0] * 8 + [1.25] * 8))
    assert s["online_n"] == 12
    errs = [abs(p["predicted_ms"] - p["measured_ms"]) for p in s["requests"]]
    assert errs[8] > 0  # as calibrated, the second half misses
    assert s["online_total_max"] == pytest.approx(1 - 1 / 1.25, rel=1e-6)  # request 8, before anything at 1.25
    assert s["online_total_median"] < s["total_median"]


def test_a_run_too_short_for_the_controller_scores_nothing_online(compare: Any) -> None:
    est = Estimator.load(CAL)
    run = {"versions": {"onnxruntime-genai": "0.18.0", "onnxruntime": "1.32.0"}, "backing": "ordinary", "thp": "madvise",
           "threads": 1, **_run(est, [1.0] * 4)}
    s = compare.score(est, run)
    assert s["online_n"] == 0 and s["online_total_median"] != s["online_total_median"]  # nan: nothing scored
    text = compare.table(Path("model"), {}, [s], [run], "2 CPUs")
    assert "request total, median abs. error" in text
    assert "online (" not in text and "Online:" not in text
