"""File schemas and a config's identity: the names every layer agrees on, defined once.

engines/ (writes samples.csv and request logs), estimator/ (reads them, keys its tables) and
serving/ (keys its per-config state) all import this module; it imports nothing of theirs.
Pure stdlib + numpy (numbers in rows are formatted exactly).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from trt_latency.errors import RequestLogError


class ConfigKey(NamedTuple):
    """A configuration: which tier, how many experts per token, how many blocks executed.

    num_active_blocks 0 in a request log (None in a request) means the tier's largest measured config."""

    tier_idx: int
    top_k: int
    num_active_blocks: int


# samples.csv: one row per timed repetition (engines/sweep.py writes it, estimator/samples.py reads it).
SAMPLES_COLUMNS: tuple[str, ...] = ("tier_idx", "top_k", "num_active_blocks", "batch", "phase", "past_len",
                                    "new_tokens", "rep", "latency_ms", "backend", "device", "kv_mode",
                                    "kv_total", "kv_max")  # fmt: skip
# kv_total / kv_max: the batch's sum and max of past lengths (a batched decode row has past_len = kv_max);
# files written before them load with kv_max = past_len, kv_total = batch * past_len.

# requests.csv: one row per end-to-end request (engines/replay.py and loadtest write it,
# estimator/requests.py reads it), plus free metadata columns.
REQUEST_COLUMNS: tuple[str, ...] = ("request_id", "vision_tokens", "text_tokens", "output_tokens", "tier_idx",
                                    "top_k", "num_active_blocks", "ttft_ms", "total_ms", "images")  # fmt: skip
# Columns added later, with the value a file written before them means (images: a request's vision
# tokens came as this many images; before the column, replay sent one image per request).
OPTIONAL_REQUEST_COLUMNS: dict[str, int] = {"images": 1}


def append_requests(path: str | os.PathLike[str], rows: Iterable[Mapping[str, object]]) -> int:
    """Append request rows to a log, creating it with a header if needed; returns rows written.

    A new file gets REQUEST_COLUMNS followed by the rows' extra (metadata) keys in first-seen order;
    an existing file keeps its header, and a key it lacks is an error (except an OPTIONAL_REQUEST_COLUMNS
    key at the value a file without it means: that row is written without it). The data is flushed and
    fsync'ed before returning, so a replay killed later keeps every row appended so far.
    """
    p = Path(path)
    spath = str(p)
    batch = [dict(r) for r in rows]
    if not batch:
        return 0
    exists = p.is_file() and p.stat().st_size > 0
    if exists:
        with p.open(newline="", encoding="utf-8") as handle:
            header = [h.strip() for h in next(csv.reader(handle), [])]
        with p.open("rb") as raw:
            raw.seek(-1, os.SEEK_END)
            needs_newline = raw.read(1) not in (b"\n", b"\r")
    else:
        header = list(REQUEST_COLUMNS)
        for r in batch:
            for key in r:
                if key not in header:
                    header.append(key)
        needs_newline = False
    for i, r in enumerate(batch):
        for key in [k for k in r if k not in header and k in OPTIONAL_REQUEST_COLUMNS]:
            if r[key] == OPTIONAL_REQUEST_COLUMNS[key]:
                del r[key]  # an older log: the column's absence already says this value
        for key in r:
            if key not in header:
                raise RequestLogError("row has a column the file lacks", path=spath, field=key,
                                      expected="one of " + ",".join(header), got=f"appended row {i + 1}")
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", newline="", encoding="utf-8") as handle:
        if needs_newline:
            handle.write("\n")
        writer = csv.writer(handle, lineterminator="\n")
        if not exists:
            writer.writerow(header)
        for r in batch:
            writer.writerow([_format(r.get(key, OPTIONAL_REQUEST_COLUMNS.get(key, ""))) for key in header])
        handle.flush()
        os.fsync(handle.fileno())
    return len(batch)


def _format(value: object) -> str:
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)
