"""Packaging: what the base install needs, the extras, one version, the wheel rule, the missing-extra line,
the ONNX Runtime flavour recorded, and the packaged plan from a zipped install."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import trt_latency
from trt_latency.cli import main
from trt_latency.engines.ort import runtime_info

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ORT_FLAVOURS = re.compile(r"^(onnxruntime|ort-nightly)")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_base_install_is_what_loading_and_admission_need() -> None:
    base = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert base == {"numpy", "pyyaml", "tqdm"}  # tqdm: calibrate's progress, pure Python, no dependencies
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(ORT_FLAVOURS.match(n) for n in base)  # never an ONNX Runtime over the user's
    ort = {_name(r) for r in extras["ort"]}
    assert ort == {"onnx", "onnxruntime-gpu", "onnxruntime"}  # one of the two per platform (markers)
    assert [_name(r) for r in extras["plots"]] == ["matplotlib"] and [_name(r) for r in extras["cluster"]] == ["ray"]


@pytest.mark.parametrize(("extra", "cuda"), [("tensorrt-cu12", "12"), ("tensorrt-cu13", "13")])
def test_tensorrt_extras_pin_their_majors(extra: str, cuda: str) -> None:
    reqs = PYPROJECT["project"]["optional-dependencies"][extra]
    assert sorted(_name(r) for r in reqs) == ["cuda-bindings", f"tensorrt-cu{cuda}"]
    trt = next(r for r in reqs if r.startswith("tensorrt"))
    bindings = next(r for r in reqs if r.startswith("cuda-bindings"))
    assert trt.endswith(",<11")  # type-checked against tensorrt-stubs 10.x (tests/test_trt_mypy.py)
    assert bindings.endswith(f",<{int(cuda) + 1}") and f">={cuda}" in bindings


def test_test_extra_is_everything_cpu_with_pinned_linters() -> None:
    test = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert "trt-latency[ort,plots,cluster,serve]" in test
    pins = {_name(r): r for r in test}
    for linter in ("ruff", "mypy"):
        assert re.fullmatch(rf"{linter}==[0-9.]+", pins[linter]), pins[linter]
        installed = importlib.metadata.version(linter)
        assert pins[linter] == f"{linter}=={installed}", "test_quality runs the pinned linter"
    assert re.search(r"<\d+", pins["cuda-bindings"]) and not any(_name(r).startswith("tensorrt") for r in test)


def test_version_is_written_once() -> None:
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "trt_latency.__version__"}
    assert importlib.metadata.version("trt-latency") == trt_latency.__version__


def test_ort_build_names_the_flavour_that_imports() -> None:
    ort = pytest.importorskip("onnxruntime")
    info = runtime_info.ort_build()
    assert info["version"] == ort.__version__ and "CPUExecutionProvider" in info["providers"]
    assert info["package"] in info["distributions"] and info["distributions"][info["package"]] == ort.__version__
    assert Path(info["library"]) == Path(ort.__file__).parent
    assert "warning" not in info


def test_ort_build_warns_when_flavours_overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second flavour's metadata beside the first: both install `onnxruntime/`, so one overwrote the other
    # (issue 24: onnxruntime-gpu laid over the onnxruntime that genai uses).
    pytest.importorskip("onnxruntime")
    info = tmp_path / "onnxruntime_openvino-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-openvino\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text("onnxruntime\n")
    genai = tmp_path / "onnxruntime_genai-0.18.0.dist-info"  # provides onnxruntime_genai, not onnxruntime
    genai.mkdir()
    (genai / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-genai\nVersion: 0.18.0\n")
    (genai / "top_level.txt").write_text("onnxruntime_genai\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = dict(runtime_info.ort_distributions())
    assert found["onnxruntime-openvino"] == "1.2.3" and "onnxruntime-genai" not in found and len(found) == 2
    built = runtime_info.ort_build()
    assert "several ONNX Runtime distributions" in built["warning"] and "onnxruntime-openvino 1.2.3" in built["warning"]


def test_ort_build_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    info = runtime_info.ort_build()
    assert info["package"] is None and info["version"] is None and info["providers"] == []
    assert info["warning"]


@pytest.mark.parametrize(
    ("argv", "blocked", "line"),
    [
        (["calibrate", "--quick"], "onnxruntime", "trt-latency calibrate needs an ONNX Runtime: pip install "
         "'trt-latency[ort]' (or keep the onnxruntime your runtime uses)"),
        (["sweep", "--onnx", "m.onnx"], "onnxruntime", "trt-latency sweep needs an ONNX Runtime: pip install "
         "'trt-latency[ort]' (or keep the onnxruntime your runtime uses)"),
        (["inspect", "m.onnx"], "onnx", "trt-latency inspect needs onnx (to read the model's graph): pip install onnx "
         "(or pip install 'trt-latency[ort]' on a fresh machine)"),
    ],
)
def test_a_verb_names_its_missing_extra_in_one_line(argv: list[str], blocked: str, line: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, blocked, None)
    assert main(argv) == 1  # a failure (exit 1), as the CLI's other errors; nothing was written
    assert capsys.readouterr().err == line + "\n" and list(tmp_path.iterdir()) == []


def test_tensorrt_needs_no_onnx_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from trt_latency.cli import _extras, build_parser

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    args = build_parser().parse_args(["calibrate", "--engine", "x.plan"])
    assert _extras.needed(args) == () and _extras.missing_line(args) is None
    args = build_parser().parse_args(["calibrate", "--onnx", "m.onnx", "--backend", "tensorrt"])
    assert _extras.needed(args) == ("onnx",)
    assert _extras.message("compare", "matplotlib.pyplot") == (
        "trt-latency compare needs matplotlib (for plots): pip install 'trt-latency[plots]'")
    assert _extras.message("compare", "scipy") is None  # not an extra's module: the traceback stands


def test_default_plan_path_outlives_a_zipped_resource(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.resources

    from trt_latency.engines import config

    archive = tmp_path / "site.zip"
    text = (REPO / "configs" / "default.yaml").read_text()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("trt_latency/configs/default.yaml", text)
    real = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files",
                        lambda pkg: zipfile.Path(archive, "trt_latency/configs/") if pkg == "trt_latency.configs"
                        else real(pkg))
    path = config.default_plan_path.__wrapped__()  # uncached: through the zip
    assert path.is_file() and path.read_text() == text  # as_file's temporary copy is still there
    assert not str(path).startswith(str(REPO))


def _tree_without_kernels(dst: Path) -> Path:
    """The package's sources with the kernels replaced by one that cannot compile (a broken toolchain)."""
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    for folder in ("trt_latency", "engines", "estimator", "serving", "diagnostics", "ext", "configs"):
        shutil.copytree(REPO / folder, dst / folder,
                        ignore=shutil.ignore_patterns("*.pyx", "*.c", "*.so", "__pycache__", "_layout.pxi"))
    (dst / "ext" / "_kernels.pyx").write_text("cdef int broken = \n")  # a Cython syntax error
    return dst


@pytest.mark.slow
def test_no_wheel_without_kernels_unless_asked(tmp_path: Path) -> None:
    pytest.importorskip("setuptools.command.bdist_wheel", reason="setuptools >= 70.1 (the test extra)")
    src = _tree_without_kernels(tmp_path / "src")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRT_LATENCY_REQUIRE_EXT", "TRT_LATENCY_ALLOW_PURE_PYTHON", "PIP_BUILD_TRACKER", "PIP_REQ_TRACKER")}

    def bdist(extra_env: dict[str, str], out: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "--dist-dir", str(tmp_path / out)],
                              cwd=src, env={**env, **extra_env}, capture_output=True, text=True, timeout=600)

    refused = bdist({}, "refused")
    assert refused.returncode != 0 and "refusing to build a wheel without the compiled Cython kernels" in refused.stderr
    assert "TRT_LATENCY_ALLOW_PURE_PYTHON=1" in refused.stderr and not (tmp_path / "refused").exists()
    for allowed, out in (({"TRT_LATENCY_ALLOW_PURE_PYTHON": "1"}, "asked"), ({"PIP_BUILD_TRACKER": str(tmp_path)}, "pip")):
        built = bdist(allowed, out)
        assert built.returncode == 0, built.stderr[-2000:]
        assert "WARNING: a Cython kernel was NOT built" in built.stderr  # loud, not one quiet line
        assert len(list((tmp_path / out).glob("trt_latency-*.whl"))) == 1
