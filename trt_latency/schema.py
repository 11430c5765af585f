"""A config's identity, and the file columns: the names every layer agrees on, defined once.

engines/ (writes samples.csv and request logs), estimator/ (reads them, keys its tables) and
serving/ (keys its per-config state) all import this module; it imports nothing of theirs. The file
columns, their version policy, readers, writers and repair are trt_latency/formats.py's (re-exported here).
"""

from __future__ import annotations

from typing import NamedTuple

from trt_latency.formats import OPTIONAL_REQUEST_COLUMNS, REQUEST_COLUMNS, SAMPLES_COLUMNS, append_requests

__all__ = ["OPTIONAL_REQUEST_COLUMNS", "REQUEST_COLUMNS", "SAMPLES_COLUMNS", "ConfigKey", "append_requests"]


class ConfigKey(NamedTuple):
    """A configuration: which tier, how many experts per token, how many blocks executed.

    num_active_blocks 0 in a request log (None in a request) means the tier's largest measured config."""

    tier_idx: int
    top_k: int
    num_active_blocks: int
