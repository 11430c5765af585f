"""Hardening: garbage requests never raise, the loader only raises CalibrationError."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers.admission import make_calibration
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trt_latency.errors import CalibrationError
from trt_latency.estimator.calibration import load_calibration, save_calibration
from trt_latency.estimator.model import Estimator
from trt_latency.ext.layout import TOKEN_MAX
from trt_latency.serving.admission import AdmissionController, Request

FIELDS = ("vision_tokens", "text_tokens", "max_new_tokens", "tier_idx", "top_k", "num_active_blocks", "budget_ms")

GARBAGE: list[Any] = [
    None, float("nan"), float("inf"), float("-inf"), -1, -(10**30), 10**30, 2**63, 2**64 + 1, 1e308, -0.0, 0.5,
    64.0, "64", "", b"64", [], {}, (1,), object(), True, False, complex(1, 1), np.float64("nan"), np.int64(-5),
    np.uint64(2**64 - 1), np.array([1, 2]), 1e-320,
]  # fmt: skip
GOOD: dict[str, Any] = {"vision_tokens": 64, "text_tokens": 40, "max_new_tokens": 16, "tier_idx": 0, "top_k": 1,
                        "num_active_blocks": 4, "budget_ms": 100.0}


def _estimator_admit(est: Estimator, fields: dict[str, Any]) -> Any:
    return est.admit(fields.get("budget_ms"), fields.get("vision_tokens"), fields.get("text_tokens"),
                     max_new_tokens=fields.get("max_new_tokens"), tier_idx=fields.get("tier_idx"),
                     top_k=fields.get("top_k"), num_active_blocks=fields.get("num_active_blocks"), alpha=0.05)


def _fixed_corpus() -> list[dict[str, Any]]:
    corpus = []
    for name in FIELDS:
        for value in GARBAGE:
            corpus.append({**GOOD, name: value})
        corpus.append({k: v for k, v in GOOD.items() if k != name})  # missing key
    return corpus


def _is_garbage(fields: dict[str, Any], estimator: bool = False) -> bool:
    """Whether a request is malformed: for the controller (strict), or for Estimator.admit, which
    also takes max_new_tokens None ("how many fit"), a budget of 0 and counts up to 2**31 - 1."""
    top = TOKEN_MAX  # one limit: the controller and Estimator.admit take the same counts
    # The controller takes a missing config field as its default (like Request); admit gets None.
    defaults = {} if estimator else {"tier_idx": 0, "top_k": 1, "num_active_blocks": None}
    for name in FIELDS:
        v = fields.get(name, defaults.get(name, "missing" if not estimator else None))
        if v is None and (name == "num_active_blocks" or (estimator and name == "max_new_tokens")):
            continue
        if name == "budget_ms":
            ok = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) \
                and math.isfinite(float(v)) and (float(v) >= 0 if estimator else float(v) > 0)
        else:
            ok = isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= int(v) <= top
            if name == "max_new_tokens":
                ok = ok and int(v) >= 1  # type: ignore[arg-type]
        if not ok:
            return True
    return False


def test_fixed_corpus_of_garbage_is_rejected_with_a_reason() -> None:
    est = Estimator(make_calibration())
    ctl = AdmissionController(est, alpha=None)
    corpus = _fixed_corpus()
    for fields in corpus:
        d = ctl.decide(fields)
        if _is_garbage(fields):
            assert not d.admit and d.max_new_tokens == 0 and d.reason, fields
        e = _estimator_admit(est, fields)
        assert isinstance(e.reason, str)
        if _is_garbage(fields, estimator=True):
            assert not e.admit and e.reason, fields
    assert ctl.counters()["decisions"] == len(corpus)


def test_five_thousand_random_garbage_requests_raise_nothing() -> None:
    est = Estimator(make_calibration())
    ctl = AdmissionController(est)
    rng = random.Random(5)
    garbage_rejected = 0
    for _ in range(5000):
        fields = dict(GOOD)
        for name in rng.sample(FIELDS, rng.randint(1, 3)):
            if rng.random() < 0.15:
                fields.pop(name)
            else:
                fields[name] = rng.choice(GARBAGE)
        as_request = rng.random() < 0.5 and all(k in fields for k in FIELDS)
        d = ctl.decide(Request(**fields) if as_request else fields)
        e = _estimator_admit(est, fields)
        if _is_garbage(fields):
            assert not d.admit and d.reason
            garbage_rejected += 1
        if _is_garbage(fields, estimator=True):
            assert not e.admit and e.reason
    assert garbage_rejected > 4000
    assert ctl.counters()["decisions"] == 5000


anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.binary(max_size=3), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), anything, max_size=7))
def test_hypothesis_fields_never_raise(fields: dict[str, Any]) -> None:
    est = Estimator(make_calibration())
    ctl = AdmissionController(est)
    merged = {**GOOD, **fields}
    d = ctl.decide(merged)
    e = _estimator_admit(est, merged)
    ctl.observe(merged, merged.get("budget_ms"), merged.get("budget_ms"))  # type: ignore[arg-type]
    if _is_garbage(merged):
        assert not d.admit and d.reason
    if _is_garbage(merged, estimator=True):
        assert not e.admit and e.reason


def test_decide_rejects_non_requests() -> None:
    ctl = AdmissionController(Estimator(make_calibration()))
    for thing in (None, 3, "request", [1, 2, 3], (1, 2), object()):
        d = ctl.decide(thing)
        assert not d.admit and "invalid request" in d.reason


# --- the calibration loader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cal") / "calibration.yaml"
    save_calibration(make_calibration({"alphas": [0.05, 0.5], "factors": [1.1, 1.0], "n": 40}), path)
    return path.read_text()


def _load_or_calibration_error(path: Path) -> None:
    try:
        load_calibration(path)
    except CalibrationError as exc:
        assert str(path) in str(exc)


def _mutate_tree(node: Any, rng: random.Random) -> Any:
    """Replace one random leaf/branch of a YAML tree with something wrong."""
    replacements: list[Any] = [None, -1, 0, 1e400, "x", [], {}, [1], {"a": 1}, True, 2**70, -1e-9, float("nan")]
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
        if rng.random() < 0.2:
            return {k: v for k, v in node.items() if k != key}
        return {**node, key: _mutate_tree(node[key], rng) if rng.random() < 0.7 else rng.choice(replacements)}
    if isinstance(node, list) and node:
        i = rng.randrange(len(node))
        if rng.random() < 0.2:
            return node[:i] + node[i + 1:]
        return node[:i] + [_mutate_tree(node[i], rng) if rng.random() < 0.7 else rng.choice(replacements)] + node[i + 1:]
    return rng.choice(replacements)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=2**32))
def test_loader_fuzz_structure(valid_text: str, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    tree = yaml.safe_load(valid_text)
    for _ in range(rng.randint(1, 3)):
        tree = _mutate_tree(tree, rng)
    path = tmp_path / f"mut{seed}.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    _load_or_calibration_error(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_loader_fuzz_bytes(valid_text: str, tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(valid_text.encode())
    for _ in range(data.draw(st.integers(min_value=1, max_value=6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(min_value=0, max_value=max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] = data.draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[pos:pos + data.draw(st.integers(min_value=1, max_value=20))]
        elif op == "truncate":
            del raw[pos:]
    path = tmp_path / "mutated.yaml"
    path.write_bytes(bytes(raw))
    _load_or_calibration_error(path)


@pytest.mark.parametrize("text", [
    "", "\x00\x01", "[]", "- 1\n- 2", "schema_version: 1", "schema_version: 1\nconfigs: []",
    "a: &a [*a]", "configs: !!python/object:os.system {}", ": :", "{" * 200, "schema_version: 2\nconfigs: [{}]",
    "x: 2001-13-45T99:99:99", "? [a, b]\n: c",
])  # fmt: skip
def test_loader_corpus(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CalibrationError) as info:
        load_calibration(path)
    assert str(path) in str(info.value)


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError):
        load_calibration(tmp_path / "nope.yaml")
