"""Request log CSV: one row per end-to-end request (replay output, production traces).

Columns (REQUEST_COLUMNS) plus free metadata columns. Required: vision_tokens, text_tokens,
output_tokens, ttft_ms, total_ms. Optional with defaults: request_id (0, 1, 2, ... in file order),
tier_idx (0), top_k (1), num_active_blocks (0 = "the tier's largest measured config"), images (how many
images the vision tokens came as; 1, what logs written before the column mean; 0 without vision tokens),
first_step_ms (the first decode step after the prefill, alone; empty = not timed: NaN).

Decode ms/token of a request = (total_ms - ttft_ms) / (output_tokens - 1): the first output token
comes out of the prefill (TTFT), each later one costs one decode step.

Pure stdlib + numpy: a serving process may read logs without the engine stack.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from trt_latency.errors import RequestLogError
from trt_latency.formats import REQUEST_COLUMNS, REQUESTS_REQUIRED, append_requests, request_records

__all__ = ["REQUEST_COLUMNS", "RequestLog", "append_requests", "read_requests"]  # the writer lives in schema

REQUIRED_COLUMNS: tuple[str, ...] = REQUESTS_REQUIRED
_INT_COLUMNS = ("request_id", "vision_tokens", "text_tokens", "output_tokens", "tier_idx", "top_k", "num_active_blocks",
                "images")
_FLOAT_COLUMNS = ("ttft_ms", "total_ms")
_DEFAULTS = {"tier_idx": 0, "top_k": 1, "num_active_blocks": 0, "images": 1}
_NULLABLE_COLUMNS = ("first_step_ms",)  # float columns whose empty cell means "not measured"


@dataclass(frozen=True)
class RequestLog:
    """Columns of a request log (numpy arrays, one entry per request) and its free metadata."""

    path: str
    request_id: np.ndarray
    vision_tokens: np.ndarray
    text_tokens: np.ndarray
    output_tokens: np.ndarray
    tier_idx: np.ndarray
    top_k: np.ndarray
    num_active_blocks: np.ndarray
    ttft_ms: np.ndarray
    total_ms: np.ndarray
    metadata: dict[str, list[str]] = field(default_factory=dict)
    rows: np.ndarray | None = None  # file line of each entry, 1 = header (for error messages)
    images: np.ndarray | None = None  # images per request (read_requests fills it: 1 where the file has none)
    first_step_ms: np.ndarray | None = None  # the first decode step alone (NaN: not timed; None: no column)

    def images_of(self, i: int) -> int:
        """Images of request i: the column, else 1 (logs written before it sent one image per request)."""
        return 1 if self.images is None else max(int(self.images[i]), 1)

    def __len__(self) -> int:
        return int(self.output_tokens.shape[0])

    @property
    def prompt_tokens(self) -> np.ndarray:
        """P = vision + text tokens: the prefill length and the KV length at the first decode step."""
        return self.vision_tokens + self.text_tokens

    def decode_ms_per_token(self) -> np.ndarray:
        """(total - ttft) / (output_tokens - 1); NaN where a request has fewer than 2 output tokens."""
        steps = (self.output_tokens - 1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (self.total_ms - self.ttft_ms) / steps
        out[steps < 1] = np.nan
        return out

    def row_of(self, index: int) -> int:
        return int(self.rows[index]) if self.rows is not None else index + 2


def _parse_number(text: str, *, path: str, row: int, column: str, integer: bool) -> float | int:
    expected = "an integer >= 0" if integer else "a finite number >= 0"
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        raise RequestLogError(path=path, row=row, field=column, expected=expected, got=text) from None
    if not math.isfinite(value) or value < 0:
        raise RequestLogError(path=path, row=row, field=column, expected=expected, got=text)
    if integer:
        if value != int(value):
            raise RequestLogError(path=path, row=row, field=column, expected=expected, got=text)
        return int(value)
    return value


def read_requests(path: str | os.PathLike[str], *, require_decode: bool = False) -> RequestLog:
    """Read and validate a request log.

    Every problem raises RequestLogError naming the file, the row (file line: 1 = header) and the
    column. With ``require_decode`` every request must have output_tokens >= 2 (needed
    for decode ms/token).
    """
    spath = os.fspath(path)
    records = request_records(spath)  # the one reader and version policy (trt_latency/formats.py)
    _, header = next(records)
    index = {name: i for i, name in enumerate(header)}
    numeric = [c for c in REQUEST_COLUMNS if c in index and c not in _NULLABLE_COLUMNS]
    nullable = [c for c in _NULLABLE_COLUMNS if c in index]
    meta_cols = [c for c in header if c not in REQUEST_COLUMNS]
    values: dict[str, list[float | int]] = {c: [] for c in numeric}
    metadata: dict[str, list[str]] = {c: [] for c in meta_cols}
    rows: list[int] = []
    for row, record in records:  # row: the file line (1 = header), as samples.csv errors count
        for column in numeric:
            values[column].append(_parse_number(record[index[column]], path=spath, row=row,
                                                column=column, integer=column in _INT_COLUMNS))
        for column in nullable:  # empty: not timed
            text = record[index[column]]
            values.setdefault(column, []).append(
                math.nan if not text.strip() else _parse_number(text, path=spath, row=row, column=column, integer=False))
        for column in meta_cols:
            metadata[column].append(record[index[column]])
        out_tokens = values["output_tokens"][-1]
        if out_tokens < 1:
            raise RequestLogError(path=spath, row=row, field="output_tokens",
                                  expected="an integer >= 1", got=record[index["output_tokens"]])
        if require_decode and out_tokens < 2:
            raise RequestLogError(
                "decode ms/token = (total_ms - ttft_ms) / (output_tokens - 1) needs a decode step",
                path=spath, row=row, field="output_tokens", expected="an integer >= 2",
                got=record[index["output_tokens"]])
        if values["total_ms"][-1] < values["ttft_ms"][-1]:
            raise RequestLogError("total_ms includes the TTFT", path=spath, row=row, field="total_ms",
                                  expected=f">= ttft_ms ({record[index['ttft_ms']]})",
                                  got=record[index["total_ms"]])
        rows.append(row)
    if not rows:
        raise RequestLogError("no requests", path=spath, expected="at least one data row")
    n = len(rows)
    cols: dict[str, np.ndarray] = {}
    for column in _INT_COLUMNS:
        if column in values:
            cols[column] = np.asarray(values[column], dtype=np.int64)
        elif column == "request_id":
            cols[column] = np.arange(n, dtype=np.int64)
        else:
            cols[column] = np.full(n, _DEFAULTS[column], dtype=np.int64)
    for column in _FLOAT_COLUMNS:
        cols[column] = np.asarray(values[column], dtype=np.float64)
    for column in nullable:
        cols[column] = np.asarray(values[column], dtype=np.float64)
    return RequestLog(path=spath, metadata=metadata, rows=np.asarray(rows, dtype=np.int64), **cols)
