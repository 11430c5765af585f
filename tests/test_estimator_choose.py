"""Estimator.choose: the first config in preference order whose prediction fits (issue 11, item 2).

The rule itself is property-tested against admit per candidate, both implementations, in
test_estimator_kernels.py; here: the order (candidates, calibration.yaml's preference, else most
expensive first), the optional `preference` schema, and the `choose` verb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_latency.cli import main
from trt_latency.errors import CalibrationError
from trt_latency.estimator import _reference
from trt_latency.estimator.calibration import (
    Calibration,
    ConfigCalibration,
    load_calibration,
    save_calibration,
)
from trt_latency.estimator.model import Estimator
from trt_latency.schema import ConfigKey


def _config(blocks: int, step_ms: float) -> ConfigCalibration:
    return ConfigCalibration(tier_idx=0, top_k=1, num_active_blocks=blocks, decode_knots=[0.0, 1000.0],
                             decode_values_ms=[step_ms, step_ms * 1.5], prefill_coeffs=[1.0, 0.01 * blocks, 0.0],
                             residual_quantiles={0.5: 1.0, 0.99: 1.1}, valid_past_len=[0.0, 1000.0],
                             valid_prefill_len=[1.0, 1000.0])  # fmt: skip


def _cal(preference: list[ConfigKey] | None = None) -> Calibration:
    return Calibration(1, {}, [_config(2, 0.5), _config(8, 2.0), _config(4, 1.0)], preference=preference or [])


@pytest.mark.parametrize("impl", [None, _reference])
def test_default_order_is_most_expensive_first_and_choose_walks_it(impl: object) -> None:
    est = Estimator(_cal(), implementation=impl)
    assert est.preference == (ConfigKey(0, 1, 8), ConfigKey(0, 1, 4), ConfigKey(0, 1, 2))
    costs = {k: est.predict(10, 90, 32, *k).total_ms for k in est.preference}
    budget = (costs[ConfigKey(0, 1, 4)] + costs[ConfigKey(0, 1, 8)]) / 2  # the 8-block config misses, 4 fits
    d = est.choose(budget, 10, 90, 32)
    assert d.admit and d.config == ConfigKey(0, 1, 4) and d.max_new_tokens == 32
    assert tuple(d) == tuple(est.admit(budget, 10, 90, 32, 0, 1, 4))
    none = est.choose(1.0, 10, 90, 32)  # nothing fits: the first candidate's decision
    assert not none.admit and none.config == ConfigKey(0, 1, 8)
    assert tuple(none)[:2] == tuple(est.admit(1.0, 10, 90, 32, 0, 1, 8))[:2]
    given = est.choose(budget, 10, 90, 32, candidates=[(0, 1, 2), (0, 1, 8)])
    assert given.admit and given.config == (0, 1, 2)


def test_preference_from_the_file_round_trips_and_orders(tmp_path: Path) -> None:
    pref = [ConfigKey(0, 1, 2), ConfigKey(0, 1, 8)]
    path = tmp_path / "calibration.yaml"
    save_calibration(_cal(pref), path)
    assert "preference:" in path.read_text()
    assert load_calibration(path).preference == pref
    assert Estimator.load(path).preference == tuple(pref)
    save_calibration(_cal(), tmp_path / "plain.yaml")  # without one, no key: older files stay byte identical
    assert "preference" not in (tmp_path / "plain.yaml").read_text()
    assert load_calibration(tmp_path / "plain.yaml").preference == []


@pytest.mark.parametrize("entry, needle", [
    ("[{tier_idx: 0, top_k: 1, num_active_blocks: 3}]", "a measured config"),
    ("[{tier_idx: 0, top_k: 1}]", "missing key"),
    ("[{tier_idx: 0, top_k: 1, num_active_blocks: 2}, {tier_idx: 0, top_k: 1, num_active_blocks: 2}]", "listed once"),
    ("{tier_idx: 0}", "a list of"),
])
def test_bad_preference_is_a_calibration_error(tmp_path: Path, entry: str, needle: str) -> None:
    path = tmp_path / "calibration.yaml"
    save_calibration(_cal(), path)
    path.write_text(path.read_text() + f"preference: {entry}\n")
    with pytest.raises(CalibrationError, match="preference") as err:
        load_calibration(path)
    assert needle in str(err.value)


def test_choose_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "calibration.yaml"
    save_calibration(_cal(), path)
    est = Estimator.load(path)
    budget = est.predict(0, 100, 16, 0, 1, 4).total_ms * 1.01
    capsys.readouterr()
    argv = ["choose", "-c", str(path), "--budget-ms", f"{budget:.6f}", "--text", "100", "--max-new-tokens", "16"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("CHOOSE: config (tier_idx, top_k, num_active_blocks) = (0, 1, 4)")
    assert main([*argv, "--json", "--candidates", "0,1,-", "0,1,2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == [0, 1, 2] and out["admit"]  # '-' = the tier's largest measured (8 blocks): misses
    assert main([*argv[:4], "0.5", *argv[5:]]) == 0  # nothing fits: a REJECT decision, not an error
    assert capsys.readouterr().out.startswith("REJECT: config (tier_idx, top_k, num_active_blocks) = (0, 1, 8)")
