"""Type-check the TensorRT backend and the CUDA layer against tensorrt-stubs (TensorRT cannot be installed here).

tensorrt-stubs 10.x ships `tensorrt/` and `tensorrt_bindings/` .pyi files without py.typed and with
a few lines that are not valid Python (parameters named `in`, a required parameter after defaulted
ones), so mypy cannot read them as installed. The test copies them to a temporary MYPYPATH folder,
repairs only those signatures, silences errors *inside* the stubs, and checks our modules. A canary
file calling an API TensorRT 10 removed must fail, proving the stubs are really in use.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["engines/trt", "engines/cuda.py"]


def _stub_root() -> Path:
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed")
    root = Path(str(dist.locate_file("")))
    if not (root / "tensorrt" / "__init__.pyi").is_file() or not (root / "tensorrt_bindings").is_dir():
        pytest.skip(f"tensorrt-stubs layout not found under {root}")
    return root


def _repair_signature(line: str) -> str:
    if not line.lstrip().startswith("def ") or ") ->" not in line:
        return line
    line = re.sub(r"([(,]\s*)in:", r"\1in_:", line)  # `in` is a keyword
    head, _, rest = line.partition("(")
    params, sep, tail = rest.rpartition(") ->")
    parts = re.split(r",\s*(?![^\[]*\])", params)
    seen_default = False
    for i, part in enumerate(parts):
        if "=" in part:
            seen_default = True
        elif seen_default and ":" in part and not part.strip().startswith("*"):
            parts[i] = part + " = ..."
    return head + "(" + ", ".join(parts) + sep + tail


def _prepare(tmp: Path) -> tuple[Path, Path]:
    root = _stub_root()
    stubs = tmp / "stubs"
    for package in ("tensorrt", "tensorrt_bindings"):
        (stubs / package).mkdir(parents=True)
        for pyi in (root / package).glob("*.pyi"):
            text = "\n".join(_repair_signature(line) for line in pyi.read_text().splitlines())
            (stubs / package / pyi.name).write_text(text + "\n")
    config = tmp / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nwarn_unused_ignores = False\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n"
    )
    return stubs, config


def _mypy(stubs: Path, config: Path, cache: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(cache), *targets]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_trt_backend_type_checks_against_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed")
    stubs, config = _prepare(tmp_path)
    cache = tmp_path / "cache"

    canary = tmp_path / "canary.py"
    canary.write_text(
        "import tensorrt as trt\n"
        "def build(b: trt.Builder, n: trt.INetworkDefinition, c: trt.IBuilderConfig) -> None:\n"
        "    b.build_engine(n, c)\n"  # removed in TensorRT 10: must be reported
    )
    # One run (the stubs are the slow part): errors may only come from the canary.
    result = _mypy(stubs, config, cache, str(canary), *TARGETS)
    error_lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert any("canary.py" in line and "build_engine" in line for line in error_lines), result.stdout
    ours = [line for line in error_lines if "canary.py" not in line]
    assert not ours, "\n".join(ours)
    assert "Found" in result.stdout and result.stderr == "", result.stdout + result.stderr
