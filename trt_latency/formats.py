"""One owner for the two measurement files, samples.csv and requests.csv: their version policy (which
headers may be read, which may be appended to), the trailing-line repair after a killed writer, the
resume readers the sweeps and the replay use, and samples.csv's writer.

Neutral like schema.py (which keeps the column names, SAMPLES_COLUMNS / REQUEST_COLUMNS, and the
request-log appender): engines/ and estimator/ both import it, it imports no layer. The numpy readers
(estimator/samples.py ``read_samples``, estimator/requests.py ``read_requests``) and the resume readers
here check headers through the same two functions, so a file one side accepts the other does too.

Version policy: a reader accepts any header holding the required columns (older files lack later
optional columns, which then take their documented defaults); a writer appends only to a file whose
header is this version's (samples.csv: exactly SAMPLES_COLUMNS; requests.csv: every REQUEST_COLUMNS
column but the optional ones), since rows under another header would be misread.

Test hook: TRT_LATENCY_TEST_STOP_AFTER_ROWS=N makes samples.csv's writer, once it has written N rows in
this process, make them durable and stop the process (SIGSTOP), so a test kills it at a known row count
(tests/helpers/kill.py) instead of polling the file. Never set it outside tests.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trt_latency.errors import RequestLogError, SamplesError
from trt_latency.schema import OPTIONAL_REQUEST_COLUMNS, REQUEST_COLUMNS, SAMPLES_COLUMNS

STOP_AFTER_ROWS_ENV = "TRT_LATENCY_TEST_STOP_AFTER_ROWS"

# samples.csv: what fit needs; the config columns default to 0 and batch to 1 when absent.
SAMPLES_REQUIRED = ("phase", "past_len", "new_tokens", "latency_ms")
SAMPLES_INDEX = {c: i for i, c in enumerate(SAMPLES_COLUMNS)}
# requests.csv: what every reader needs.
REQUESTS_REQUIRED: tuple[str, ...] = ("vision_tokens", "text_tokens", "output_tokens", "ttft_ms", "total_ms")


# ------------------------------------------------------------------------------ both files


def repair_trailing_line(path: Path) -> bool:
    """Cut a partial last line (no newline: the writer was killed mid-row). True if something was cut."""
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        # Scan back for the last newline in chunks.
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = pos + idx + 1
                break
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return True


# ------------------------------------------------------------------------------ samples.csv


def check_samples_header(names: Sequence[str], path: str, *, append: bool) -> None:
    """The version policy of samples.csv (module docstring): raise SamplesError naming file, row, field."""
    if append:
        if tuple(names) != SAMPLES_COLUMNS:
            raise SamplesError("cannot resume into a file with another header", path=path, row=0,
                               expected=",".join(SAMPLES_COLUMNS), got=",".join(names))
        return
    missing = [c for c in SAMPLES_REQUIRED if c not in names]
    if missing:
        raise SamplesError(path=path, row=1, field=missing[0],
                           expected="a header with columns " + ",".join(SAMPLES_REQUIRED), got=",".join(names)[:80])


def int_field(text: str, path: Path, row: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SamplesError(path=str(path), row=row, field=column, expected="an integer", got=text) from None


def resume_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(row number, fields) of every row samples.csv already holds, for a sweep that resumes into it: a
    partial trailing line is repaired first, the header must be this version's, every row complete."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    repair_trailing_line(path)
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8")))
    header = next(reader, None)
    if header is None:
        return
    check_samples_header([h.strip() for h in header], str(path), append=True)
    for n, rec in enumerate(reader, start=1):
        if not rec:
            continue
        if len(rec) != len(SAMPLES_COLUMNS):
            raise SamplesError(path=str(path), row=n, expected=f"{len(SAMPLES_COLUMNS)} fields", got=len(rec))
        yield n, rec


class GroupWriter:
    """Appends rows to samples.csv and makes them durable in groups (one flush + fsync per
    GROUP_SECONDS), not per row: an fsync per row cost more than a short decode step. A kill loses at most
    the unsynced group (and leaves at most a partial last line, cut on resume): those rows were never
    counted as done, so the rerun measures them again; nothing is lost or duplicated."""

    GROUP_SECONDS = 0.5

    def __init__(self, path: Path, header: bool) -> None:
        self.fh = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.last = time.perf_counter()
        self.pending = 0
        self.written = 0
        stop = os.environ.get(STOP_AFTER_ROWS_ENV, "")
        self.stop_after = int(stop) if stop.strip() else 0  # the test hook (module docstring); 0 = off
        if header:
            self.writer.writerow(SAMPLES_COLUMNS)
            self.commit()

    def row(self, values: list[Any]) -> None:
        self.writer.writerow(values)
        self.pending += 1
        self.written += 1
        if self.stop_after and self.written == self.stop_after:
            self.commit()
            os.kill(os.getpid(), signal.SIGSTOP)  # the test sees it stopped and kills it here
        if time.perf_counter() - self.last >= self.GROUP_SECONDS:
            self.commit()

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.last = time.perf_counter()
        self.pending = 0

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.fh.close()


def open_writer(path: Path) -> GroupWriter:
    """samples.csv's writer: a new (or empty) file gets this version's header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.is_file() or path.stat().st_size == 0
    return GroupWriter(path, header=new_file)


# ------------------------------------------------------------------------------ requests.csv


def check_requests_header(header: Sequence[str], path: str, *, resume: bool) -> None:
    """The version policy of requests.csv (module docstring): raise RequestLogError naming file, field."""
    if resume:
        if "request_id" not in header:
            raise RequestLogError("cannot resume a log without request ids", path=path, field="request_id",
                                  expected="a request_id column", got=",".join(header))
        missing = [c for c in REQUEST_COLUMNS if c not in header and c not in OPTIONAL_REQUEST_COLUMNS]
        if missing:  # its rows could not be counted as done, nor new rows appended under the same columns
            raise RequestLogError("cannot resume into a log with another header", path=path, row=1,
                                  field=missing[0], expected="a header with columns " + ",".join(REQUEST_COLUMNS),
                                  got=",".join(header))
    for column in REQUESTS_REQUIRED:
        if column not in header:
            raise RequestLogError("missing column", path=path, field=column,
                                  expected="header with columns " + ",".join(REQUESTS_REQUIRED),
                                  got=",".join(header))
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise RequestLogError("duplicate column", path=path, field=column)
        seen.add(column)


def done_requests(path: Path) -> dict[int, tuple[int, int, int] | None]:
    """request_id -> config key (tier_idx, top_k, num_active_blocks) of the rows already in the log
    (None where the log has no config columns); a partial trailing line from a killed run is cut first."""
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    repair_trailing_line(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            return {}
        check_requests_header(header, str(path), resume=True)
        col = header.index("request_id")
        key_cols = [header.index(c) if c in header else -1 for c in ("tier_idx", "top_k", "num_active_blocks")]
        done: dict[int, tuple[int, int, int] | None] = {}
        for n, rec in enumerate(reader, start=1):
            if not rec:
                continue
            try:
                rid = int(rec[col])
            except (ValueError, IndexError):
                raise RequestLogError(path=str(path), row=n, field="request_id", expected="an integer",
                                      got=rec[col] if col < len(rec) else None) from None
            try:
                t, k, b = (int(rec[c]) for c in key_cols)
                done[rid] = (t, k, b)
            except (ValueError, IndexError):  # no config columns: the reader of the log reports bad values
                done[rid] = None
    return done
