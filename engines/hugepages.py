"""The memory backing of a CPU process: the ordinary one, or transparent huge pages on request.

Why: a decode step reads the weights (~17 MB on the reference tier, ~300 MB on a 0.5B int4 model), and
the page size under them moves the step: on this host (THP ``madvise``) an ordinary process (genai's, a
serving one) runs on 4 KiB pages, where a 0.5B int4 step read 1.14-1.30x its 2 MiB-page time, interleaved
in one process (benchmarks/realsize/backing_ab.py, results.md); a fixture that fits the caches, 1.00x. A
calibration must describe the process that serves, so the backing is the ordinary one unless asked
(``calibrate --huge-pages``, plan ``runtime.huge_pages``), calibration.yaml's provenance ``memory`` says
which (``describe``; ``page_backing`` reads it back), and the serving process gets the same backing with
one call (trt_latency/backing.py: ``apply_backing``). It is
not a cure for the per-process speed lottery of the shared dev VM (benchmarks/sweep_noise.py: fresh
processes read the same back-to-back KV-1 step at 0.38-0.72 ms on 4 KiB pages and 0.36-0.88 ms on huge
pages over two runs: the host's backing of the VM's memory, not the guest's page size).

How: after the session and the runner's buffers exist, every writable anonymous mapping of at least
``min_bytes`` gets ``madvise(MADV_HUGEPAGE)`` (khugepaged keeps later growth huge) and
``madvise(MADV_COLLAPSE)`` (Linux >= 6.1: collapse now, synchronously), on the 2 MiB-aligned part of each. Nothing here can fail a run: off
Linux, with THP ``never``, or on an older kernel it reports what it could do and the runner goes on.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
HUGE = 2 << 20


HUGE_PAGES, SMALL_PAGES, DEVICE = "2 MiB pages", "4 KiB pages", "device memory"  # page_backing's answers
_applied = False  # back_with_huge_pages ran in this process: it asked for huge pages (process_backing)


@dataclass(frozen=True)
class Backing:
    """What backs the process: huge pages applied (regions advised, bytes collapsed) or the ordinary backing,
    and the process's AnonHugePages total when it was looked at."""

    mode: str  # THP system mode: always / madvise / never / unavailable
    regions: int = 0
    collapsed_bytes: int = 0
    anon_huge_bytes: int = 0
    applied: bool = True  # False: the ordinary backing (nothing advised), see ordinary_backing

    def describe(self) -> str:
        """One line for provenance and the summary; it starts with "huge pages", "ordinary pages" or
        "4 KiB pages" (page_backing reads it back)."""
        huge = f"{self.anon_huge_bytes >> 20} MiB of the process on 2 MiB pages"
        if not self.applied:
            pages = {"always": "2 MiB pages where a region allows", "madvise": "4 KiB pages unless advised"}
            return f"ordinary pages (THP {self.mode}: {pages.get(self.mode, '4 KiB pages')}; {huge}; huge pages off)"
        if self.mode in ("never", "unavailable"):
            return f"4 KiB pages (transparent huge pages {self.mode})"
        return f"huge pages ({huge}; THP {self.mode})"


def ordinary_backing() -> Backing:
    """The backing an ordinary process gets on this host (nothing advised), described."""
    return Backing(thp_mode(), applied=False, anon_huge_bytes=anon_huge_bytes())


def back_memory(huge_pages: bool) -> Backing:
    """The runners' one switch: huge pages when asked (back_with_huge_pages), else the ordinary backing."""
    return back_with_huge_pages() if huge_pages else ordinary_backing()


def page_backing(memory: str) -> str:
    """The pages a backing description (provenance ``memory``) ran on: HUGE_PAGES, SMALL_PAGES, DEVICE or "".

    "ordinary pages (THP always: ...)" ran on 2 MiB pages; with THP madvise or never, on 4 KiB pages."""
    text = memory.strip()
    if text.startswith("huge pages"):
        return HUGE_PAGES
    if text.startswith("4 KiB pages"):
        return SMALL_PAGES
    if text.startswith("device memory"):
        return DEVICE
    if text.startswith("ordinary pages"):
        return HUGE_PAGES if text.startswith("ordinary pages (THP always") else SMALL_PAGES
    return ""


def process_backing() -> str:
    """The pages this process's large allocations get now: HUGE_PAGES after back_with_huge_pages, with THP
    ``always``, or with THP ``madvise`` and glibc's ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; else SMALL_PAGES."""
    mode = thp_mode()
    if mode in ("never", "unavailable"):
        return SMALL_PAGES
    tunable = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
    return HUGE_PAGES if _applied or mode == "always" or tunable else SMALL_PAGES


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def anon_huge_bytes() -> int:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _anonymous_regions(min_bytes: int) -> list[tuple[int, int]]:
    """2 MiB-aligned [start, end) of writable anonymous mappings (and the heap) of at least ``min_bytes``."""
    out = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) < 5 or "w" not in parts[1]:
                continue
            name = parts[5] if len(parts) > 5 else ""
            if name and name != "[heap]":  # files, stacks, vdso: not ours to touch
                continue
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            start, end = (lo + HUGE - 1) & ~(HUGE - 1), hi & ~(HUGE - 1)
            if end - start >= max(min_bytes, HUGE):
                out.append((start, end))
    return out


def back_with_huge_pages(min_bytes: int = HUGE) -> Backing:
    """Advise and collapse this process's large anonymous memory onto 2 MiB pages (see the module doc)."""
    global _applied
    mode = thp_mode()
    if not sys.platform.startswith("linux") or mode in ("never", "unavailable"):
        return Backing(mode)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        regions = _anonymous_regions(min_bytes)
    except (OSError, AttributeError, ValueError):
        return Backing(mode)
    collapsed = 0
    _applied = True
    for start, end in regions:
        madvise(start, end - start, MADV_HUGEPAGE)
        if madvise(start, end - start, MADV_COLLAPSE) == 0:  # EINVAL before 6.1, EAGAIN when busy: fine
            collapsed += end - start
    return Backing(mode, len(regions), collapsed, anon_huge_bytes())
