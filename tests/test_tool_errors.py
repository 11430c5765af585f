"""Bad input to `calibrate` and `analyze`: exit 1 with one line naming file and field (2 for usage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trt_latency.cli import main

GOOD_LOG = ("vision_tokens,text_tokens,output_tokens,tier_idx,top_k,num_active_blocks,ttft_ms,total_ms\n"
            "0,16,3,0,1,2,1.0,3.0\n8,16,12,0,1,2,1.5,13.5\n")


def _fail(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 1) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _usage(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_calibrate_missing_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fail(capsys, ["calibrate", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert line.startswith("trt-latency calibrate: error: ")
    assert f"{tmp_path / 'nope.yaml'}: file not found" in line


def test_calibrate_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("tiers:\n  - tier_idx: 0\n    hidden: [64\n")
    line = _fail(capsys, ["calibrate", str(plan), "--out", str(tmp_path / "o")])
    assert str(plan) in line and "malformed YAML" in line and "line " in line


def test_calibrate_unknown_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trt_latency.engines.config import default_plan_path

    text = default_plan_path().read_text().replace("- {tier_idx: 0, top_k: 1, num_active_blocks: 4}",
                                                   "- {tier_idx: 7, top_k: 1, num_active_blocks: 4}", 1)
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    line = _fail(capsys, ["calibrate", str(plan), "--out", str(tmp_path / "o")])
    assert str(plan) in line and "field 'configs[0].tier_idx'" in line and "got 7" in line


def test_calibrate_missing_onnx_and_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fail(capsys, ["calibrate", "--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o")])
    assert f"{tmp_path / 'm.onnx'}: file not found" in line
    line = _fail(capsys, ["calibrate", "--engine", str(tmp_path / "m.plan"), "--out", str(tmp_path / "o")])
    assert f"{tmp_path / 'm.plan'}: file not found" in line


def test_calibrate_not_an_onnx_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "m.onnx"
    bogus.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    line = _fail(capsys, ["calibrate", "--onnx", str(bogus), "--out", str(tmp_path / "o")])
    assert str(bogus) in line


def test_calibrate_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'cuda'" in _usage(capsys, ["calibrate", "--backend", "cuda"])
    err = _usage(capsys, ["calibrate", "--onnx", "a.onnx", "--engine", "b.plan"])
    assert "not allowed with argument" in err
    assert "invalid int value" in _usage(capsys, ["calibrate", "--requests", "many"])


def test_analyze_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fail(capsys, ["analyze", str(tmp_path / "r.csv")])
    assert line.startswith("trt-latency analyze: error: ") and f"{tmp_path / 'r.csv'}: file not found" in line


def test_analyze_wrong_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "r.csv"
    log.write_text(GOOD_LOG.replace("total_ms", "e2e_ms"))
    line = _fail(capsys, ["analyze", str(log)])
    assert f"{log}: field 'total_ms': missing column" in line


def test_analyze_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "r.csv"
    log.write_text(GOOD_LOG + "0,16,4,0,1,2,NaN,4.0\n")
    line = _fail(capsys, ["analyze", str(log)])
    assert f"{log}: row 4, field 'ttft_ms': expected a finite number >= 0, got 'NaN'" in line


def test_analyze_single_output_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "r.csv"
    log.write_text(GOOD_LOG + "0,16,1,0,1,2,1.0,1.0\n")
    line = _fail(capsys, ["analyze", str(log)])
    assert f"{log}: row 4, field 'output_tokens'" in line and "expected an integer >= 2" in line


def test_analyze_bad_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "r.csv"
    log.write_text(GOOD_LOG)
    cal = tmp_path / "cal.yaml"
    cal.write_text("schema_version: 1\nconfigs: [\n")
    line = _fail(capsys, ["analyze", str(log), "-c", str(cal)])
    assert str(cal) in line and "malformed YAML" in line
    line = _fail(capsys, ["analyze", str(log), "-c", str(tmp_path / "none.yaml")])
    assert f"{tmp_path / 'none.yaml'}: file not found" in line


def test_analyze_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert "required: REQUESTS.csv" in _usage(capsys, ["analyze"])
    assert "unrecognized arguments" in _usage(capsys, ["analyze", "r.csv", "--bins", "3"])


@pytest.mark.parametrize("verb", ["calibrate", "analyze"])
def test_help_has_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"trt-latency {verb} " in out and "example" in out
