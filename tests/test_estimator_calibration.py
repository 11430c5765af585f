"""calibration.yaml: exact round trip, atomic save, and loader errors that name file + field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_latency.errors import CalibrationError
from trt_latency.estimator.calibration import (
    Calibration,
    ConfigCalibration,
    FactorisedModel,
    calibration_to_dict,
    load_calibration,
    save_calibration,
    with_conformal,
)


def sample_cal() -> Calibration:
    return Calibration(
        schema_version=1,
        provenance={"backend": "ort-cpu", "device": "cpu", "engine_sha256": "ab" * 32,
                    "versions": {"trt_latency": "0.1.0"}, "date": "2026-11-26T23:00:00+00:00"},
        configs=[
            ConfigCalibration(0, 1, 4, [1.0, 512.0, 4096.0], [0.1 + 1e-17, 0.30000000000000004, 2.5],
                              [0.25, 1e-3, 1.5e-07], {0.5: 1.0, 0.9: 1.0123456789012345, 0.99: 1.2},
                              [1.0, 4096.0], [8.0, 1024.0],
                              {"loo_median_rel": 0.004, "loo_max_rel": 0.02, "n_positions": 19},
                              {"alphas": [0.01, 0.1], "factors": [1.4, 1.1], "n": 80}, 4096),
            ConfigCalibration(1, 2, 4, [1.0, 4096.0], [1.0, 1.0], [0.0, 0.0, 0.0], {}, [1.0, 4096.0], [0.0, 0.0]),
        ],
        factorised=[FactorisedModel(0, 0.1, 0.2, 0.0, 1e-5, [1.0, 4096.0], 1)],
    )


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    cal = sample_cal()
    save_calibration(cal, a)
    loaded = load_calibration(a)
    assert loaded == cal
    save_calibration(loaded, b)
    assert a.read_bytes() == b.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("text", ["\x85", "a\x85b", "\u2028", "\u2029 end", "é ü"])
def test_strings_with_yaml_line_breaks_round_trip(tmp_path: Path, text: str) -> None:
    """NEL / LS / PS are line breaks to YAML 1.1: written raw they came back as a space (found by the
    random-corruption test below); they are written escaped now."""
    from dataclasses import replace

    cal = replace(sample_cal(), provenance={**sample_cal().provenance, text: text, "note": text})
    path = tmp_path / "cal.yaml"
    save_calibration(cal, path)
    assert load_calibration(path) == cal


def test_save_is_atomic_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "cal.yaml"
    save_calibration(sample_cal(), target)
    before = target.read_bytes()
    bad = sample_cal()
    bad.configs[0].decode_values_ms[1] = math.nan
    with pytest.raises(CalibrationError):
        save_calibration(bad, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.yaml"]


def test_with_conformal_updates_one_config() -> None:
    cal = with_conformal(sample_cal(), (1, 2, 4), [0.05, 0.2], [1.3, 1.05], 50)
    assert cal.config(1, 2, 4).conformal == {"alphas": [0.05, 0.2], "factors": [1.3, 1.05], "n": 50}
    assert sample_cal().config(1, 2, 4).conformal is None
    with pytest.raises(CalibrationError, match="factors"):
        with_conformal(cal, (1, 2, 4), [0.05, 0.2], [1.0, 1.3], 50)  # factor must not grow with alpha
    with pytest.raises(CalibrationError):
        with_conformal(cal, (9, 9, 9), [0.05], [1.3], 50)


def _mutated(tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    data = calibration_to_dict(sample_cal())
    mutate(data)
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _set(path: list, value):  # type: ignore[no-untyped-def]
    def mutate(data):  # type: ignore[no-untyped-def]
        node = data
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set(["schema_version"], 4), "schema_version"),  # 1, 2 and 3 load (2: batch sections, 3: a first-step slope)
        (_set(["schema_version"], KeyError), "schema_version"),
        (_set(["configs"], []), "configs"),
        (_set(["configs"], "x"), "configs"),
        (_set(["configs", 0, "tier_idx"], "zero"), "configs[0].tier_idx"),
        (_set(["configs", 0, "tier_idx"], True), "configs[0].tier_idx"),
        (_set(["configs", 0, "top_k"], -1), "configs[0].top_k"),
        (_set(["configs", 0, "num_active_blocks"], 10**9), "configs[0].num_active_blocks"),
        (_set(["configs", 0, "decode_knots"], [1.0, 1.0, 5.0]), "configs[0].decode_knots[1]"),
        (_set(["configs", 0, "decode_knots"], [1.0]), "configs[0].decode_knots"),
        (_set(["configs", 0, "decode_values_ms"], [1.0, 0.5, 2.0]), "configs[0].decode_values_ms[1]"),
        (_set(["configs", 0, "decode_values_ms"], [1.0, float("nan"), 2.0]), "configs[0].decode_values_ms[1]"),
        (_set(["configs", 0, "decode_values_ms"], [0.0, 1.0, 2.0]), "configs[0].decode_values_ms[0]"),
        (_set(["configs", 0, "decode_values_ms"], [1.0, 2.0]), "configs[0].decode_values_ms"),
        (_set(["configs", 0, "prefill_coeffs"], [1.0, float("inf"), 0.0]), "configs[0].prefill_coeffs[1]"),
        (_set(["configs", 0, "residual_quantiles"], [1, 2]), "configs[0].residual_quantiles"),
        (_set(["configs", 0, "residual_quantiles"], {1.5: 1.0}), "configs[0].residual_quantiles"),
        (_set(["configs", 0, "valid_past_len"], [10.0, 1.0]), "configs[0].valid_past_len"),
        (_set(["configs", 0, "conformal", "n"], 0), "configs[0].conformal.n"),
        (_set(["configs", 0, "conformal", "alphas"], [0.1, 0.01]), "configs[0].conformal.alphas[1]"),
        (_set(["configs", 0, "conformal", "factors"], [1.0]), "configs[0].conformal.factors"),
        (_set(["configs", 0, "fit_error"], "bad"), "configs[0].fit_error"),
        (_set(["configs", 0, "kv_bytes_per_token"], 1.5), "configs[0].kv_bytes_per_token"),
        (_set(["configs", 1, "tier_idx"], 0), "configs[1]"),  # duplicate key after the change
        (_set(["factorised", 0, "v"], "fast"), "factorised[0].v"),
        (_set(["factorised"], {"a": 1}), "factorised"),
        (_set(["provenance"], [1, 2]), "provenance"),
    ],
)
def test_loader_names_file_and_field(tmp_path: Path, mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    if field == "configs[1]":
        mutate = _chain(mutate, _set(["configs", 1, "top_k"], 1), _set(["configs", 1, "num_active_blocks"], 4))
    path = _mutated(tmp_path, mutate)
    with pytest.raises(CalibrationError) as info:
        load_calibration(path)
    message = str(info.value)
    assert str(path) in message
    assert f"field '{field}'" in message
    assert "expected" in message


def _chain(*fns):  # type: ignore[no-untyped-def]
    def mutate(data):  # type: ignore[no-untyped-def]
        for f in fns:
            f(data)

    return mutate


@pytest.mark.parametrize(
    "content",
    [b"", b"just a string\n", b"- 1\n- 2\n", b"\x00\x01\x02garbage\xff\xfe", b"configs: [\n", b"a: b: c\n",
     b"schema_version: 1\nconfigs: [{tier_idx: 0}]\n", b"\xef\xbb\xbf\x89PNG\r\n\x1a\n"],
)
def test_malformed_files_raise_calibration_error_only(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cal.yaml"
    path.write_bytes(content)
    with pytest.raises(CalibrationError) as info:
        load_calibration(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "nope.yaml")
    with pytest.raises(CalibrationError):
        load_calibration(tmp_path)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=4))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=12)


_FIELD_PATHS = [("schema_version",), ("provenance",), ("configs",), ("factorised",), ("configs", 0),
                ("factorised", 0), ("provenance", "versions")]
_FIELD_PATHS += [("configs", 0, k) for k in calibration_to_dict(sample_cal())["configs"][0]]
_FIELD_PATHS += [("factorised", 0, k) for k in calibration_to_dict(sample_cal())["factorised"][0]]
_FIELD_PATHS += [("configs", 0, "conformal", k) for k in ("alphas", "factors", "n")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_FIELD_PATHS), _values), min_size=1, max_size=3))
def test_random_corruption_raises_only_calibration_error(tmp_path_factory: pytest.TempPathFactory,
                                                         edits: list[tuple[tuple, object]]) -> None:
    """Any value put anywhere: either a valid file or a CalibrationError, never another exception."""
    doc = calibration_to_dict(sample_cal())
    for keys, value in edits:
        node = doc
        try:
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced the container: nothing to edit here
    path = tmp_path_factory.mktemp("fuzz") / "cal.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        cal = load_calibration(path)
    except CalibrationError as exc:
        assert str(path) in str(exc)
    else:
        save_calibration(cal, path)  # a file that loads also saves and round-trips
        assert load_calibration(path) == cal
