"""One owner for the two measurement files, samples.csv and requests.csv: their version policy (which
headers may be read, which may be appended to), the trailing-line repair after a killed writer, the
resume readers the sweeps and the replay use, and samples.csv's writer.

Neutral like schema.py (which re-exports the columns): engines/ and estimator/ both import it, it imports no
layer. The writers: samples.csv's ``GroupWriter`` / ``open_writer``, requests.csv's ``append_requests``. The numpy readers
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
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.errors import InputError, RequestLogError, SamplesError

# samples.csv: one row per timed repetition (engines/sweep.py writes it, estimator/samples.py reads it).
SAMPLES_COLUMNS: tuple[str, ...] = ("tier_idx", "top_k", "num_active_blocks", "batch", "phase", "past_len",
                                    "new_tokens", "rep", "latency_ms", "backend", "device", "kv_mode",
                                    "kv_total", "kv_max")  # fmt: skip
# kv_total / kv_max: the batch's sum and max of past lengths (a batched decode row has past_len = kv_max);
# files written before them load with kv_max = past_len, kv_total = batch * past_len.

# requests.csv: one row per end-to-end request (engines/replay.py and loadtest write it,
# estimator/requests.py reads it), plus free metadata columns.
REQUEST_COLUMNS: tuple[str, ...] = ("request_id", "vision_tokens", "text_tokens", "output_tokens", "tier_idx",
                                    "top_k", "num_active_blocks", "ttft_ms", "total_ms", "images",
                                    "first_step_ms")  # fmt: skip
# Columns added later, with the value a file written before them means (images: a request's vision
# tokens came as this many images; before the column, replay sent one image per request. first_step_ms:
# the first decode step after the prefill, the one that emits token 2, as the loop timed it; empty for a
# 1-token request or where the loop did not time it, and before the column).
OPTIONAL_REQUEST_COLUMNS: dict[str, object] = {"images": 1, "first_step_ms": ""}
# Optional columns a row may drop when it is appended to an older file without them: timing detail that
# only sharpens the loop fit (the first step observed on its own, not inside the decode total), never
# what a row means, so a replay resumed into an older log keeps going.
DROPPABLE_REQUEST_COLUMNS: tuple[str, ...] = ("first_step_ms",)

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


def _records(path: str, error: type[InputError], what: str, columns: Sequence[str],
             check: Callable[[list[str]], None]) -> Iterator[tuple[int, list[str]]]:
    """THE reader of both files: (line, fields) of the header (first, line 1, stripped names, checked by
    ``check``: the version policy) and then of every non-blank row, each with the header's field count.
    Streams the file; every error is ``error`` naming the file and the line (1 = header)."""
    try:
        fh = Path(path).open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise error("file not found", path=path, expected=f"{what} with columns " + ",".join(columns)) from None
    except OSError as exc:
        raise error(f"cannot read ({exc.strerror or exc})", path=path) from None
    row = 0  # the line read last
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise error("empty file", path=path, expected="a header row " + ",".join(columns))
            row = 1
            names = [h.strip() for h in header]
            check(names)
            yield 1, names
            for record in reader:
                row += 1
                if not record or all(not cell.strip() for cell in record):
                    continue  # blank line
                if len(record) != len(names):
                    raise error(path=path, row=row, expected=f"{len(names)} comma-separated fields", got=len(record))
                yield row, record
        except csv.Error as exc:
            raise error(f"malformed CSV ({exc})", path=path, row=row + 1) from None
        except UnicodeDecodeError:
            raise error("not UTF-8 text", path=path, row=row + 1) from None


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


def samples_records(path: str | os.PathLike[str], *, append: bool = False) -> Iterator[tuple[int, list[str]]]:
    """samples.csv through the one reader: the header (line 1) first, then (line, fields) of every row.
    ``append``: the header must be this version's (a sweep resuming into the file appends to it)."""
    p = os.fspath(path)
    return _records(p, SamplesError, "samples.csv", SAMPLES_COLUMNS,
                    lambda names: check_samples_header(names, p, append=append))


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
    records = samples_records(path, append=True)
    next(records)  # the header, checked
    yield from records


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


def request_records(path: str | os.PathLike[str], *, resume: bool = False) -> Iterator[tuple[int, list[str]]]:
    """requests.csv through the one reader: the header (line 1) first, then (line, fields) of every row.
    ``resume``: the header must allow appending (request ids, this version's columns)."""
    p = os.fspath(path)
    return _records(p, RequestLogError, "a request log CSV", REQUEST_COLUMNS,
                    lambda names: check_requests_header(names, p, resume=resume))


def done_requests(path: Path) -> dict[int, tuple[int, int, int] | None]:
    """request_id -> config key (tier_idx, top_k, num_active_blocks) of the rows already in the log
    (None where the log has no config columns); a partial trailing line from a killed run is cut first."""
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    repair_trailing_line(path)
    records = request_records(path, resume=True)
    _, header = next(records)
    col = header.index("request_id")
    key_cols = [header.index(c) if c in header else -1 for c in ("tier_idx", "top_k", "num_active_blocks")]
    done: dict[int, tuple[int, int, int] | None] = {}
    for n, rec in records:
        try:
            rid = int(rec[col])
        except ValueError:
            raise RequestLogError(path=str(path), row=n, field="request_id", expected="an integer",
                                  got=rec[col]) from None
        try:
            t, k, b = (int(rec[c]) for c in key_cols)
            done[rid] = (t, k, b)
        except (ValueError, IndexError):  # no config columns: the reader of the log reports bad values
            done[rid] = None
    return done


def append_requests(path: str | os.PathLike[str], rows: Iterable[Mapping[str, object]]) -> int:
    """Append request rows to a log, creating it with a header if needed; returns rows written.

    A new file gets REQUEST_COLUMNS followed by the rows' extra (metadata) keys in first-seen order;
    an existing file keeps its header, and a key it lacks is an error (except an OPTIONAL_REQUEST_COLUMNS
    key at the value a file without it means, or a DROPPABLE_REQUEST_COLUMNS key: that row is written
    without it). The data is flushed and
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
            if r[key] == OPTIONAL_REQUEST_COLUMNS[key] or key in DROPPABLE_REQUEST_COLUMNS:
                del r[key]  # an older log: the column's absence already says this value (or loses only detail)
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
