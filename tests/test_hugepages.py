"""Memory backing (engines/hugepages.py, trt_latency/backing.py): what it reports, that the ordinary backing is
the default of the runner, the plan and calibrate (huge pages opt-in, recorded in provenance and the summary),
that a bad plan value is named, and the serving side's one call and its warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trt_latency.engines import hugepages
from trt_latency.engines.hugepages import (
    HUGE_PAGES,
    SMALL_PAGES,
    Backing,
    anon_huge_bytes,
    back_with_huge_pages,
    page_backing,
    thp_mode,
)
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
    if not huge:  # the ordinary backing, described with the host's THP mode
        assert memory.startswith(f"ordinary pages (THP {thp_mode()}") and memory.endswith("huge pages off)")
        assert page_backing(memory) == (HUGE_PAGES if thp_mode() == "always" else SMALL_PAGES)
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
    assert line in base and load_plan_text(tmp_path / "default.yaml", base).runtime.huge_pages is False
    assert load_plan().runtime.huge_pages is False  # the packaged plan: the ordinary backing
    good = load_plan_text(tmp_path / "good.yaml", base.replace(line, line[:-1] + ", huge_pages: true}"))
    assert good.runtime.huge_pages is True
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.replace(line, line[:-1] + ", huge_pages: 'yes'}"))
    with pytest.raises(ConfigError, match="runtime.huge_pages"):
        load_plan(bad)


@pytest.mark.parametrize("memory, pages", [
    ("huge pages (300 MiB of the process on 2 MiB pages; THP madvise)", HUGE_PAGES),
    ("ordinary pages (THP madvise: 4 KiB pages unless advised; 0 MiB of the process on 2 MiB pages; huge pages off)",
     SMALL_PAGES),
    ("ordinary pages (THP always: 2 MiB pages where a region allows; 8 MiB ...; huge pages off)", HUGE_PAGES),
    ("4 KiB pages (huge pages off)", SMALL_PAGES),  # written before the ordinary backing was described
    ("4 KiB pages (transparent huge pages never)", SMALL_PAGES),
    ("device memory", hugepages.DEVICE),
    ("", ""),
])
def test_page_backing_reads_what_describe_writes(memory: str, pages: str) -> None:
    assert page_backing(memory) == pages
    for mode in ("always", "madvise", "never"):
        for applied in (False, True):
            text = Backing(mode, anon_huge_bytes=4 << 20, applied=applied).describe()
            huge = mode == "always" if not applied else mode != "never"
            assert page_backing(text) == (HUGE_PAGES if huge else SMALL_PAGES), text


@pytest.fixture()
def calibrated(tmp_path: Path) -> dict[bool, Path]:
    """A real calibrate of the genai fixture, once on the default backing and once with --huge-pages."""
    pytest.importorskip("onnxruntime")
    from test_tool_calibrate import TINY_PLAN

    from trt_latency.pipeline import CalibrateOptions, calibrate

    plan = tmp_path / "plan.yaml"
    plan.write_text(TINY_PLAN)
    out = {}
    for huge in (False, True):
        lines: list[str] = []
        opts = CalibrateOptions(config=str(plan), quick=True, onnx=str(FIXTURE), out=str(tmp_path / f"o{huge}"),
                                backend="ort-cpu", no_progress=True, no_plot=True, no_replay=True,
                                huge_pages=True if huge else None)
        result = calibrate(opts, say=lines.append)
        summary = lines[lines.index("Summary"):]
        threads = [i for i, line in enumerate(summary) if line.startswith("  threads ")]
        memory = [i for i, line in enumerate(summary) if line.startswith("  memory ")]
        assert threads and memory and memory[0] == threads[0] + 1, summary  # the backing beside the threads
        assert summary[threads[0]].startswith("  threads      1 intra-op, 1 inter-op"), summary
        assert summary[memory[0]].split(None, 1)[1].startswith("huge pages" if huge else "ordinary pages"), summary
        out[huge] = result.calibration
    return out


@pytest.mark.slow
def test_calibrate_defaults_to_the_ordinary_backing_and_records_it(calibrated: dict[bool, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from trt_latency.backing import backing_warning, calibrated_huge_pages, calibration_memory
    from trt_latency.cli import build_parser
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.pipeline import CalibrateOptions

    parser = build_parser()
    for argv, want in ((["calibrate"], None), (["calibrate", "--huge-pages"], True),
                       (["calibrate", "--no-huge-pages"], False)):
        assert CalibrateOptions.from_namespace(parser.parse_args(argv)).huge_pages is want
    ordinary, huge = (load_calibration(calibrated[h]) for h in (False, True))
    assert ordinary.provenance["memory"].startswith("ordinary pages") and not calibrated_huge_pages(ordinary)
    assert huge.provenance["memory"].startswith("huge pages") and calibrated_huge_pages(calibrated[True])
    # the three ways the serving side holds a calibration read the same record
    assert calibration_memory(Estimator.load(calibrated[True])) == calibration_memory(huge) != ""
    # this process has applied nothing: an ordinary calibration agrees with it, a huge-page one is named
    monkeypatch.setattr(hugepages, "_applied", False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    if thp_mode() == "madvise":
        assert backing_warning(ordinary) is None
        line = backing_warning(huge)
        assert line is not None and "2 MiB pages" in line and "trt_latency.apply_backing" in line


@pytest.mark.slow
def test_the_serving_call_puts_the_process_on_the_calibrations_backing(
        calibrated: dict[bool, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import trt_latency
    from trt_latency.backing import backing_warning

    monkeypatch.setattr(hugepages, "_applied", False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    buf = np.ones(16 << 20, dtype=np.uint8)  # the serving process's weights, already loaded
    got = trt_latency.apply_backing(str(calibrated[False]))  # ordinary: nothing advised
    assert not got.applied and got.describe().startswith("ordinary pages") and not hugepages._applied
    got = trt_latency.apply_backing(calibrated[True])
    mode = thp_mode()
    if mode in ("never", "unavailable"):
        assert got.regions == 0  # nothing to apply: the host has no huge pages to give
    else:
        assert got.applied and got.regions >= 1 and got.describe().startswith("huge pages")
        assert hugepages.process_backing() == HUGE_PAGES and backing_warning(calibrated[True]) is None
        if mode == "madvise":  # now the ordinary calibration is the one that differs
            assert backing_warning(calibrated[False]) is not None
    assert int(buf[-1]) == 1


def test_the_serving_call_imports_no_runtime() -> None:
    """apply_backing is for the serving process: no onnxruntime, onnx, tensorrt (it may serve with another)."""
    import subprocess
    import sys

    code = ("import sys, trt_latency; trt_latency.apply_backing; "
            "print(sorted(m for m in ('onnxruntime', 'onnx', 'tensorrt', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
