"""export / sweep / replay verbs: help with an example, real runs on a tiny plan, one-line errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from helpers.plans import write_plan  # noqa: E402

from trt_latency.cli import main  # noqa: E402
from trt_latency.engines.export import model_metadata  # noqa: E402


@pytest.mark.parametrize("verb", ["export", "sweep", "replay"])
def test_help_has_options_and_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"trt-latency {verb}" in out and "--out" in out


def test_export_sweep_replay_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = str(write_plan(tmp_path, log=3, lin=2, reps=2))
    model = tmp_path / "m.onnx"
    assert main(["export", plan, "--tier", "1", "--top-k", "2", "--blocks", "1", "-o", str(model)]) == 0
    assert (model_metadata(model)["top_k"], model_metadata(model)["num_active_blocks"]) == (2, 1)
    samples = tmp_path / "run" / "samples.csv"
    args = ["sweep", plan, "--all", "--backend", "ort-cpu", "--threads", "1", "--no-progress", "--out", str(samples)]
    assert main(args) == 0
    with samples.open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["tier_idx"], r["top_k"], r["num_active_blocks"]) for r in rows} == {("0", "1", "2"), ("1", "2", "1")}
    assert (tmp_path / "run" / "model.t0.k1.b2.onnx").is_file()  # one naming scheme with calibrate
    assert main(args) == 0 and "0 rows measured" in capsys.readouterr().out  # resume: nothing left
    log = tmp_path / "run" / "requests.csv"
    assert main(["replay", plan, "--onnx", str(model), "--tier", "1", "--top-k", "2", "--blocks", "1",
                 "-n", "2", "--no-progress", "--backend", "ort-cpu", "--out", str(log)]) == 0
    assert len(log.read_text().splitlines()) == 3


@pytest.mark.parametrize("argv,needle", [
    (["export", "--tier", "0", "--top-k", "3"], "'--top-k': expected 1 .. 1"),
    (["export", "--index", "99"], "'--index'"),
    (["sweep", "missing.yaml"], "missing.yaml: file not found"),
    (["sweep", "--onnx", "nope.onnx", "--backend", "ort-cpu"], "nope.onnx: file not found"),
])
def test_errors_are_one_line_exit_1(argv: list[str], needle: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith(f"trt-latency {argv[0]}: error:")
