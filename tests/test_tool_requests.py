"""Request log CSV: round trip, validation messages, durable appends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trt_latency.errors import RequestLogError
from trt_latency.estimator.requests import REQUEST_COLUMNS, append_requests, read_requests


def _row(i: int, out: int = 5, ttft: float = 3.0, total: float = 11.0) -> dict[str, object]:
    return {"request_id": i, "vision_tokens": 64, "text_tokens": 10 + i, "output_tokens": out, "tier_idx": 0,
            "top_k": 1, "num_active_blocks": 4, "ttft_ms": ttft, "total_ms": total}


def test_append_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "req.csv"
    assert append_requests(path, [_row(0), _row(1, out=2, total=4.5)]) == 2
    assert append_requests(path, [_row(2)]) == 1
    log = read_requests(path)
    assert path.read_text().splitlines()[0] == ",".join(REQUEST_COLUMNS)
    assert len(log) == 3
    assert log.request_id.tolist() == [0, 1, 2]
    assert log.prompt_tokens.tolist() == [74, 75, 76]
    # (total - ttft) / (output_tokens - 1)
    np.testing.assert_allclose(log.decode_ms_per_token(), [2.0, 1.5, 2.0])


def test_metadata_columns_kept_and_optional_columns_default(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("vision_tokens,text_tokens,output_tokens,ttft_ms,total_ms,model\n"
                    "576,40,3,20.5,70.5,vlm-a\n0,12,1,5.0,5.0,vlm-b\n")
    log = read_requests(path)
    assert log.metadata == {"model": ["vlm-a", "vlm-b"]}
    assert log.tier_idx.tolist() == [0, 0] and log.top_k.tolist() == [1, 1]
    assert log.num_active_blocks.tolist() == [0, 0]  # 0 = the tier's largest measured config
    assert log.request_id.tolist() == [0, 1]
    assert log.images is not None and log.images.tolist() == [1, 1]  # a log without the column: one image each
    d = log.decode_ms_per_token()
    assert d[0] == pytest.approx(25.0) and np.isnan(d[1])


def test_images_column_written_read_and_old_logs_resume(tmp_path: Path) -> None:
    path = tmp_path / "req.csv"
    append_requests(path, [{**_row(0), "images": 2}, _row(1)])  # a writer without images: its default, 1
    log = read_requests(path)
    assert log.images is not None and log.images.tolist() == [2, 1] and log.images_of(0) == 2
    old = tmp_path / "old.csv"
    old.write_text(",".join(c for c in REQUEST_COLUMNS if c != "images") + "\n")
    append_requests(old, [{**_row(0), "images": 1}])  # the old header already means one image
    assert read_requests(old).images_of(0) == 1
    with pytest.raises(RequestLogError, match="images"):
        append_requests(old, [{**_row(1), "images": 2}])  # that an old header cannot say
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(REQUEST_COLUMNS) + "\n0,64,10,5,0,1,4,3.0,11.0,-1\n")
    with pytest.raises(RequestLogError, match="images"):
        read_requests(bad)


def test_append_keeps_existing_header_and_rejects_unknown_column(tmp_path: Path) -> None:
    path = tmp_path / "req.csv"
    append_requests(path, [{**_row(0), "backend": "ort-cpu"}])
    assert path.read_text().splitlines()[0].endswith(",backend")
    append_requests(path, [_row(1)])  # missing metadata cell is written empty
    assert read_requests(path).metadata["backend"] == ["ort-cpu", ""]
    with pytest.raises(RequestLogError, match="field 'gpu'"):
        append_requests(path, [{**_row(2), "gpu": "h100"}])


def test_append_after_file_without_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "req.csv"
    path.write_text("vision_tokens,text_tokens,output_tokens,ttft_ms,total_ms\n0,8,3,1.0,3.0")
    append_requests(path, [{"vision_tokens": 0, "text_tokens": 9, "output_tokens": 3, "ttft_ms": 1.0,
                            "total_ms": 5.0}])
    np.testing.assert_allclose(read_requests(path).decode_ms_per_token(), [1.0, 2.0])


HEADER = "vision_tokens,text_tokens,output_tokens,ttft_ms,total_ms\n"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("0,8,3,1.0,nan\n", "row 2, field 'total_ms': expected a finite number >= 0, got 'nan'"),
        ("0,8,3,1.0,2.0\n0,8,three,1.0,2.0\n", "row 3, field 'output_tokens': expected an integer >= 0, got 'three'"),
        ("0,8,2.5,1.0,2.0\n", "row 2, field 'output_tokens': expected an integer >= 0, got '2.5'"),
        ("0,-8,3,1.0,2.0\n", "row 2, field 'text_tokens'"),
        ("0,8,3,1.0\n", "row 2: expected 5 comma-separated fields, got 4"),
        ("0,8,0,1.0,2.0\n", "row 2, field 'output_tokens': expected an integer >= 1"),
        ("0,8,3,5.0,2.0\n", "row 2, field 'total_ms': total_ms includes the TTFT; expected >= ttft_ms (5.0)"),
        ("", "no requests"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + body)
    with pytest.raises(RequestLogError) as info:
        read_requests(path)
    assert str(info.value).startswith(str(path))
    assert needle in str(info.value)


def test_missing_file_wrong_column_and_single_token_rows(tmp_path: Path) -> None:
    with pytest.raises(RequestLogError, match="missing.csv: file not found"):
        read_requests(tmp_path / "missing.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("vision_tokens,text_tokens,out_tokens,ttft_ms,total_ms\n0,8,3,1.0,2.0\n")
    with pytest.raises(RequestLogError, match="field 'output_tokens': missing column"):
        read_requests(wrong)
    single = tmp_path / "single.csv"
    single.write_text(HEADER + "0,8,3,1.0,2.0\n0,8,1,1.0,1.0\n")
    assert len(read_requests(single)) == 2
    with pytest.raises(RequestLogError, match="row 3, field 'output_tokens'.*expected an integer >= 2, got '1'"):
        read_requests(single, require_decode=True)
