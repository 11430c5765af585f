"""The README's Python API block runs as written against a real calibration (tiny plan, real sweep)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trt_latency.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    api = [b for b in blocks if "Estimator.load(" in b]
    assert api, "README has no Python API block"
    return api[0]


@pytest.mark.slow
def test_readme_api_block_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.plans import write_plan

    plan = write_plan(tmp_path)
    out = tmp_path / "cal"
    assert main(["calibrate", str(plan), "--quick", "--out", str(out), "--no-progress", "--requests", "8"]) == 0
    code = _python_block().replace("trt-latency-out/calibration.yaml", str(out / "calibration.yaml"))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    counters = namespace["ctl"].counters()  # type: ignore[attr-defined]
    assert counters["decisions"] == 1
    # n is the largest output length whose predicted total fits 150 ms
    est, n, d = namespace["est"], namespace["n"], namespace["d"]
    assert isinstance(n, int) and n >= 1
    assert est.predict(256, 40, n).total_ms <= 150.0 < est.predict(256, 40, n + 1).total_ms  # type: ignore[attr-defined]
    # d: admitted iff the 64 tokens fit 150 ms times the alpha factor; else max_new_tokens is what fits
    fits = est.max_new_tokens(150.0, 256, 40, alpha=0.05)  # type: ignore[attr-defined]
    assert d.admit == (fits >= 64) and d.max_new_tokens == (64 if fits >= 64 else fits)  # type: ignore[attr-defined]
