"""Put the serving process on the memory backing its calibration was timed on: one call, no onnxruntime.

A calibration times one process, and the pages under the weights are part of it: on a host with THP
``madvise`` an ordinary process runs on 4 KiB pages, a ``calibrate --huge-pages`` one on 2 MiB pages, and
the same decode step differs by up to tens of percent between them (benchmarks/realsize/backing_ab.py).
calibration.yaml's provenance ``memory`` says which backing it was (engines/hugepages.py writes and reads
that line). The serving process calls, once, after its model is loaded and warmed up (so that the weights
and the first buffers exist)::

    import trt_latency
    trt_latency.apply_backing("calibration.yaml")   # or an Estimator / a Calibration

On a huge-page calibration it advises and collapses the process's large anonymous regions onto 2 MiB
pages (what the sweep did to its own process); on an ordinary one it changes nothing. Memory the process
maps later (a new request's buffers in a fresh mapping) is not covered: start the process with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` to have glibc's malloc advise every mapping it makes.
``backing_warning`` is the one-line check that ``loadtest`` prints when the backings differ.
"""

from __future__ import annotations

import os
from typing import Any

from trt_latency.engines.hugepages import (
    HUGE_PAGES,
    SMALL_PAGES,
    Backing,
    back_with_huge_pages,
    ordinary_backing,
    page_backing,
    process_backing,
)


def calibration_memory(calibration: Any) -> str:
    """The provenance ``memory`` line of a calibration given as a path, an Estimator or a Calibration."""
    if isinstance(calibration, (str, os.PathLike)):
        from trt_latency.estimator.calibration import load_calibration

        calibration = load_calibration(calibration)
    calibration = getattr(calibration, "calibration", calibration)  # an Estimator holds its Calibration
    return str(getattr(calibration, "provenance", {}).get("memory", "") or "")


def calibrated_huge_pages(calibration: Any, default: bool = False) -> bool:
    """Whether the calibration's process asked for huge pages (calibrate --huge-pages / runtime.huge_pages);
    ``default`` for a calibration without the record (older, or made elsewhere)."""
    memory = calibration_memory(calibration)
    return memory.startswith("huge pages") if memory else default


def apply_backing(calibration: Any) -> Backing:
    """Give this process the calibration's backing (see the module doc); returns what backs it now."""
    if calibrated_huge_pages(calibration):
        return back_with_huge_pages()
    return ordinary_backing()


def backing_warning(calibration: Any) -> str | None:
    """One line when this process's pages differ from the calibration's (None when they agree or either
    is unknown, e.g. a device calibration or one older than the record)."""
    memory = calibration_memory(calibration)
    want, have = page_backing(memory), process_backing()
    if want not in (HUGE_PAGES, SMALL_PAGES) or want == have:
        return None
    how = ("call trt_latency.apply_backing(calibration) after loading the model" if want == HUGE_PAGES else
           "recalibrate with --huge-pages to time this backing")
    return (f"warning: the calibration was timed on {want} (provenance memory: {memory}) and this process runs "
            f"on {have}: steps may differ by tens of percent; {how}")

