"""Huge-page backing of a CPU runner (engines/hugepages.py): what it reports, that the runner and the plan
carry the switch, and that a bad plan value is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trt_latency.engines.hugepages import Backing, anon_huge_bytes, back_with_huge_pages, thp_mode
from trt_latency.errors import ConfigError

FIXTURE = Path(__file__).parent / "data" / "thirdparty" / "genai-llama-fp32" / "model.onnx"


def test_backing_reports_what_the_system_allows() -> None:
    mode = thp_mode()
    assert mode in ("always", "madvise", "never", "unavailable")
    buf = np.ones(16 << 20, dtype=np.uint8)  # 16 MiB of touched anonymous memory: something to back
    got = back_with_huge_pages()
    assert isinstance(got, Backing) and got.mode == mode
    if mode in ("never", "unavailable"):
        assert got.regions == 0 and got.describe().startswith("4 KiB pages")
    else:
        assert got.regions >= 1  # the 16 MiB buffer at least
        assert got.describe().startswith("huge pages")
        if got.collapsed_bytes:  # Linux >= 6.1 collapsed synchronously: the process now holds huge pages
            assert anon_huge_bytes() >= 2 << 20 and got.anon_huge_bytes >= 2 << 20
    assert int(buf[-1]) == 1  # contents untouched by the advice


@pytest.mark.parametrize("huge", [False, True])
def test_runner_says_how_its_memory_was_backed(huge: bool) -> None:
    pytest.importorskip("onnxruntime")
    from trt_latency.engines.backends import open_runner

    with open_runner(FIXTURE, "ort-cpu", threads=1, huge_pages=huge) as runner:
        memory = runner.memory  # type: ignore[attr-defined]
        assert runner.time_step(8, 1, 2).shape == (2,)
    if not huge:
        assert memory == "4 KiB pages (huge pages off)"
    else:
        assert memory.startswith("huge pages") or "transparent huge pages" in memory


def test_plan_switch_is_validated(tmp_path: Path) -> None:
    from helpers.plans import TINY_PLAN

    from trt_latency.engines.config import load_plan

    def load_plan_text(path: Path, text: str) -> Any:
        path.write_text(text)
        return load_plan(path)

    base = TINY_PLAN.replace("LOG", "4").replace("LIN", "2").replace("REPS", "2")
    line = "runtime: {intra_op_threads: 1, inter_op_threads: 1}"
    assert line in base and load_plan_text(tmp_path / "default.yaml", base).runtime.huge_pages is True
    good = load_plan_text(tmp_path / "good.yaml", base.replace(line, line[:-1] + ", huge_pages: false}"))
    assert good.runtime.huge_pages is False
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.replace(line, line[:-1] + ", huge_pages: 'yes'}"))
    with pytest.raises(ConfigError, match="runtime.huge_pages"):
        load_plan(bad)
