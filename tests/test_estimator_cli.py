"""CLI verbs of the estimator: fit (samples.csv and trtexec files), predict, admit, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.fitted import fit_calibration, write_samples_csv

from trt_latency.cli import main
from trt_latency.estimator.model import Estimator

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fit_data import export_times as _export_times  # noqa: E402


@pytest.fixture(scope="module")
def samples_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_samples_csv(tmp_path_factory.mktemp("fit"))


@pytest.fixture(scope="module")
def cal_path(samples_csv: Path) -> Path:
    return fit_calibration(samples_csv)


def test_fit_writes_loadable_calibration_for_every_config(cal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    est = Estimator.load(cal_path)
    assert sorted(est.configs()) == [(0, 1, 2), (0, 1, 4)]
    for key in est.configs():
        d = est.admit(1e4, 64, 100, 32, *key)
        assert d.admit and d.max_new_tokens == 32
    assert est.calibration.provenance["backend"] == "ort-cpu"


def test_predict_and_admit_json(cal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["predict", "-c", str(cal_path), "--vision-tokens", "64", "--text-tokens", "100",
                 "--output-tokens", "32", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    est = Estimator.load(cal_path)
    assert pred["total_ms"] == est.predict(64, 100, 32).total_ms
    assert main(["admit", "-c", str(cal_path), "--budget-ms", str(pred["total_ms"]), "--vision-tokens", "64",
                 "--text-tokens", "100", "--max-new-tokens", "32", "--json"]) == 0
    dec = json.loads(capsys.readouterr().out)
    assert dec == {"admit": True, "max_new_tokens": 32, "predicted_ms": pred["total_ms"], "reason": "fits the budget"}
    assert main(["admit", "-c", str(cal_path), "--budget-ms", "1", "--text-tokens", "100", "--tier", "5"]) == 0
    assert "REJECT" in capsys.readouterr().out


def test_fit_from_trtexec_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(_export_times(tmp_path / f"decode_L{L}.json", [1.0 + 1e-4 * L] * 5)) for L in (16, 256, 1024, 4096)]
    files.append(str(_export_times(tmp_path / "prefill_S64.json", [0.8] * 3)))
    out = tmp_path / "trt.yaml"
    assert main(["fit", "--trtexec-times", *files, "-o", str(out)]) == 0
    assert "LOPO" in capsys.readouterr().out
    assert Estimator.load(out).calibration.provenance["backend"] == "tensorrt"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fit", "{tmp}/missing.csv"], "not found"),
        (["fit"], "SAMPLES.csv"),
        (["predict", "-c", "{tmp}/missing.yaml", "--text-tokens", "5", "--output-tokens", "3"], "not found"),
        (["predict", "-c", "{cal}", "--text-tokens", "5", "--output-tokens", "0"], "output_tokens"),
        (["predict", "-c", "{cal}", "--text-tokens", "5", "--output-tokens", "3", "--tier", "9"], "unknown config"),
        (["bench", "-c", "{tmp}/bad.yaml"], "schema_version"),
    ],
)
def test_bad_inputs_exit_1_with_one_line(argv: list[str], needle: str, tmp_path: Path, cal_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "bad.yaml").write_text("schema_version: 7\nconfigs: []\n")
    argv = [a.format(tmp=tmp_path, cal=cal_path) for a in argv]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_bench_reports_all_figures(cal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["bench", "-c", str(cal_path), "--rounds", "1", "--number", "2000", "--batch", "20000", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("reference_ns", "bare_python_ns", "batch_decisions_per_s", "reference_batch_decisions_per_s"):
        assert res[key] > 0
    if res["kernels"] == "cython":
        assert res["cython_ns"] > 0 and res["reference_over_cython"] > 0


@pytest.mark.parametrize("verb", ["fit", "predict", "admit", "bench"])
def test_help_has_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    assert "example" in capsys.readouterr().out
