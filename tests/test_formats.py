"""trt_latency/formats.py: one reader and one version policy per file, the repair after a killed writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from trt_latency.errors import RequestLogError, SamplesError
from trt_latency.estimator.requests import read_requests
from trt_latency.estimator.samples import read_samples
from trt_latency.formats import (
    REQUEST_COLUMNS,
    SAMPLES_COLUMNS,
    append_requests,
    done_requests,
    open_writer,
    repair_trailing_line,
    resume_records,
)

OLD_SAMPLES = "tier_idx,top_k,num_active_blocks,batch,phase,past_len,new_tokens,rep,latency_ms,backend,device\n"


def _row(past_len: int, rep: int) -> list[object]:
    return [0, 1, 2, 1, "decode", past_len, 1, rep, "1.5", "ort-cpu", "cpu", "concat", past_len, past_len]


def test_samples_written_repaired_resumed_and_read(tmp_path: Path) -> None:
    path = tmp_path / "samples.csv"
    w = open_writer(path)
    for rep in range(3):
        w.row(_row(16, rep))
    w.close()
    with path.open("a") as fh:
        fh.write("0,1,2,1,dec")  # a kill mid-row
    assert [n for n, _ in resume_records(path)] == [2, 3, 4]  # repaired first; lines counted as the reader does
    assert path.read_text().endswith("\n") and not repair_trailing_line(path)
    s = read_samples(path)
    assert len(s) == 3 and s.kv_mode == ["concat"] * 3
    assert path.read_text().splitlines()[0] == ",".join(SAMPLES_COLUMNS)


def test_an_older_samples_file_is_read_but_never_appended_to(tmp_path: Path) -> None:
    """The version policy: readers take an older header (later columns default), writers append only to this
    version's (rows under another header would be misread)."""
    path = tmp_path / "samples.csv"
    path.write_text(OLD_SAMPLES + "0,1,2,1,decode,16,1,0,1.5,ort-cpu,cpu\n")
    s = read_samples(path)
    assert s.kv_mode == [""] and int(s.kv_max[0]) == 16
    with pytest.raises(SamplesError, match="cannot resume into a file with another header"):
        list(resume_records(path))


def test_both_readers_of_a_file_report_a_short_row_alike(tmp_path: Path) -> None:
    samples = tmp_path / "samples.csv"
    samples.write_text(",".join(SAMPLES_COLUMNS) + "\n" + ",".join(map(str, _row(16, 0)))
                       + "\n0,1,2,1,decode,16\n")
    msgs = []
    for read in (read_samples, lambda p: list(resume_records(p))):
        with pytest.raises(SamplesError) as err:
            read(samples)
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1] and "row 3" in msgs[0] and "expected 14 comma-separated fields, got 6" in msgs[0]
    log = tmp_path / "requests.csv"
    append_requests(log, [{"request_id": 0, "vision_tokens": 0, "text_tokens": 8, "output_tokens": 3, "tier_idx": 0,
                           "top_k": 1, "num_active_blocks": 2, "ttft_ms": 1.0, "total_ms": 3.0}])
    with log.open("a") as fh:
        fh.write("1,0,8\n")
    msgs = []
    for read in (read_requests, done_requests):
        with pytest.raises(RequestLogError) as err:
            read(log)
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1] and f"expected {len(REQUEST_COLUMNS)} comma-separated fields, got 3" in msgs[0]


def test_a_request_log_without_ids_is_read_but_not_resumed(tmp_path: Path) -> None:
    log = tmp_path / "requests.csv"
    log.write_text("vision_tokens,text_tokens,output_tokens,ttft_ms,total_ms\n0,8,3,1.0,3.0\n")
    assert read_requests(log).request_id.tolist() == [0]
    with pytest.raises(RequestLogError, match="cannot resume a log without request ids"):
        done_requests(log)
