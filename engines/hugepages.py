"""Back a CPU runner's memory with transparent huge pages, as a tuned CPU serving process runs.

Why: a small decode step of the reference tier reads ~17 MB of weights, and a CPU serving process that is
tuned at all runs on huge pages (THP ``always``, or ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``); the
sweep should time the engine that way, and calibration.yaml records which backing the timings had. It is
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
import sys
from dataclasses import dataclass
from pathlib import Path

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
HUGE = 2 << 20


@dataclass(frozen=True)
class Backing:
    """What ``back_with_huge_pages`` did: regions advised, bytes collapsed, and the process's huge total."""

    mode: str  # THP system mode: always / madvise / never / unavailable
    regions: int = 0
    collapsed_bytes: int = 0
    anon_huge_bytes: int = 0

    def describe(self) -> str:
        if self.mode in ("never", "unavailable"):
            return f"4 KiB pages (transparent huge pages {self.mode})"
        return f"huge pages ({self.anon_huge_bytes >> 20} MiB of the process on 2 MiB pages; THP {self.mode})"


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
    for start, end in regions:
        madvise(start, end - start, MADV_HUGEPAGE)
        if madvise(start, end - start, MADV_COLLAPSE) == 0:  # EINVAL before 6.1, EAGAIN when busy: fine
            collapsed += end - start
    return Backing(mode, len(regions), collapsed, anon_huge_bytes())
