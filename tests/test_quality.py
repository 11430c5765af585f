"""Static checks over the whole tree: ruff (lint + import order) and mypy (types), as CI runs them.

The TensorRT backend is additionally checked against tensorrt-stubs in test_trt_mypy.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{module} {version(module)}"
    except PackageNotFoundError:
        return f"{module} (version unknown)"


def test_ruff_clean() -> None:
    """The ruff of this environment (the one the `test` extra pins), never another one found on PATH."""
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -e '.[test]')")
    result = _run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."])
    assert result.returncode == 0, _version("ruff") + "\n" + result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_clean() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    result = _run([sys.executable, "-m", "mypy", "engines", "estimator", "trt_latency", "benchmarks"])
    assert result.returncode == 0, _version("mypy") + "\n" + result.stdout + result.stderr
