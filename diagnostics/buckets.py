"""The output-token buckets of the production trace (DESIGN.md), defined once for every diagnostic.

A request with n output tokens falls in the bucket whose range holds n: analyze's bucket table and its
prompt-length check, compare's conservative rate (the largest non-empty bucket), and the benchmarks'
seed-like tables all use BUCKETS. A label is written ``2`` (one length), ``3-5`` (a closed range) or
``21+`` (open); parse_bucket reads the same syntax in a user's bucket table (``analyze --table``).
"""

from __future__ import annotations

import re

import numpy as np

LABELS: tuple[str, ...] = ("2", "3-5", "6-10", "11-20", "21+")
OPEN_END = 2**62  # the inclusive upper end that stands for an open bucket's "no end"
# |difference| between two bucket means (or tercile means) must exceed this many standard errors to count.
SIGNIFICANCE_SE = 2.0

_LABEL = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d+)|(\+))?\s*$")


def parse_bucket(text: str) -> tuple[int, int | None]:
    """``2`` -> (2, 2), ``3-5`` -> (3, 5), ``21+`` -> (21, None); ValueError otherwise."""
    m = _LABEL.match(text)
    if not m:
        raise ValueError(text)
    lo = int(m.group(1))
    if m.group(4):
        return lo, None
    hi = int(m.group(3)) if m.group(2) else lo
    if hi < lo:
        raise ValueError(text)
    return lo, hi


def _closed(label: str) -> tuple[str, int, int]:
    lo, hi = parse_bucket(label)
    return label, lo, OPEN_END if hi is None else hi


# (label, lo, hi) inclusive, in ascending order; the last bucket is open (hi = OPEN_END).
BUCKETS: tuple[tuple[str, int, int], ...] = tuple(_closed(label) for label in LABELS)


def in_bucket(output_tokens: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Mask of the requests whose output-token count lies in lo..hi (inclusive)."""
    n = np.asarray(output_tokens)
    return (n >= lo) & (n <= hi)
