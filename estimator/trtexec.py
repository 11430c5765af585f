"""trtexec `--exportTimes` JSON files -> Samples (one file per shape).

trtexec writes a JSON list with one object per inference: startInMs, endInMs, startComputeMs,
endComputeMs, startOutMs, endOutMs, inMs, computeMs, outMs, latencyMs, endToEndMs (all ms; see
samples/trtexec/tracer.py in NVIDIA/TensorRT). We use the GPU compute time, `computeMs`
(endComputeMs - startComputeMs when that key is absent), one sample row per inference.

The shape of a file is given by a spec such as ``past_len=512,new_tokens=1`` (optional keys: phase,
tier_idx, top_k, num_active_blocks) or parsed from its name: ``decode_L512.json`` (past_len 512, one new
token), ``prefill_S128.json`` (prompt of 128 tokens), optionally with ``_t0``, ``_k1``, ``_b4`` for
tier_idx, top_k, num_active_blocks (``decode_L512_t0_k1_b4.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trt_latency.errors import SamplesError
from trt_latency.estimator.samples import Samples, samples_from_rows

SHAPE_KEYS = ("phase", "past_len", "new_tokens", "tier_idx", "top_k", "num_active_blocks")
_NAME_RE = re.compile(r"(?:^|[_\-.])(decode|prefill)[_\-]?(?:L|S)?(\d+)", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[_\-]([tkb])(\d+)(?=[_\-.]|$)", re.IGNORECASE)


def parse_shape_spec(spec: str, source: str = "--trtexec-shape") -> dict[str, Any]:
    """'past_len=512,new_tokens=1[,phase=decode,tier_idx=0,top_k=1,num_active_blocks=4]' -> dict."""
    out: dict[str, Any] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in SHAPE_KEYS:
            raise SamplesError(path=source, field=key or part, expected="key=value with key in " + ", ".join(SHAPE_KEYS),
                               got=part)  # fmt: skip
        if key == "phase":
            if value not in ("decode", "prefill"):
                raise SamplesError(path=source, field="phase", expected="'decode' or 'prefill'", got=value)
            out[key] = value
        else:
            try:
                number = int(value)
            except ValueError:
                raise SamplesError(path=source, field=key, expected="an integer >= 0", got=value) from None
            if number < 0:
                raise SamplesError(path=source, field=key, expected="an integer >= 0", got=value)
            out[key] = number
    return _complete_shape(out, source)


def shape_from_filename(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = Path(path).name
    m = _NAME_RE.search(name)
    if m is None:
        raise SamplesError(
            "cannot tell the shape from the file name", path=os.fspath(path), field="shape",
            expected="a name like decode_L512.json / prefill_S128.json, or --trtexec-shape past_len=512,new_tokens=1",
        )  # fmt: skip
    phase, number = m.group(1).lower(), int(m.group(2))
    shape: dict[str, Any] = {"phase": phase}
    if phase == "decode":
        shape.update(past_len=number, new_tokens=1)
    else:
        shape.update(past_len=0, new_tokens=number)
    names = {"t": "tier_idx", "k": "top_k", "b": "num_active_blocks"}
    for tm in _TOKEN_RE.finditer(name[m.end() :]):
        shape[names[tm.group(1).lower()]] = int(tm.group(2))
    return _complete_shape(shape, os.fspath(path))


def _complete_shape(shape: dict[str, Any], source: str) -> dict[str, Any]:
    if "phase" not in shape:
        if "past_len" not in shape or "new_tokens" not in shape:
            raise SamplesError(path=source, field="past_len/new_tokens", expected="both past_len and new_tokens (or phase)",
                               got=",".join(f"{k}={v}" for k, v in shape.items()))  # fmt: skip
        shape["phase"] = "prefill" if shape["past_len"] == 0 else "decode"
    if shape["phase"] == "decode":
        shape.setdefault("new_tokens", 1)
        if "past_len" not in shape:
            raise SamplesError(path=source, field="past_len", expected="past_len for a decode shape", got=None)
    else:
        shape.setdefault("past_len", 0)
        if "new_tokens" not in shape:
            raise SamplesError(path=source, field="new_tokens", expected="new_tokens (prompt length) for a prefill shape",
                               got=None)  # fmt: skip
    for key, default in (("tier_idx", 0), ("top_k", 0), ("num_active_blocks", 0)):
        shape.setdefault(key, default)
    return shape


def read_trtexec_times(path: str | os.PathLike[str], shape: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Sample rows (samples.csv columns) from one exportTimes file, one per inference."""
    p = os.fspath(path)
    shape = shape_from_filename(p) if shape is None else shape
    try:
        data = json.loads(Path(p).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SamplesError("file not found", path=p) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SamplesError(f"cannot read ({exc})", path=p) from None
    except json.JSONDecodeError as exc:
        raise SamplesError(f"malformed JSON at line {exc.lineno}, column {exc.colno}", path=p,
                           expected="a trtexec --exportTimes file") from None  # fmt: skip
    if not isinstance(data, list) or not data:
        raise SamplesError(path=p, expected="a non-empty JSON list of per-inference timing objects",
                           got=type(data).__name__)  # fmt: skip
    rows = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise SamplesError(path=p, row=i, expected="a JSON object per inference", got=type(entry).__name__)
        ms = entry.get("computeMs")
        if ms is None and "startComputeMs" in entry and "endComputeMs" in entry:
            try:
                ms = float(entry["endComputeMs"]) - float(entry["startComputeMs"])
            except (TypeError, ValueError):
                ms = None
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) or ms <= 0:
            raise SamplesError(path=p, row=i, field="computeMs", expected="a finite number > 0 (GPU compute ms)",
                               got=entry.get("computeMs"))  # fmt: skip
        rows.append({**{k: shape[k] for k in SHAPE_KEYS}, "batch": 1, "rep": i, "latency_ms": float(ms),
                     "backend": "tensorrt", "device": "trtexec"})  # fmt: skip
    return rows


def trtexec_samples(paths: Sequence[str | os.PathLike[str]], shapes: Sequence[str] | None = None) -> Samples:
    """Samples from several exportTimes files; `shapes` is one spec per file (or None: from names)."""
    if shapes and len(shapes) != len(paths):
        raise SamplesError(path="--trtexec-shape", expected=f"one shape per file ({len(paths)})",
                           got=f"{len(shapes)} shapes")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        shape = parse_shape_spec(shapes[i]) if shapes else None
        rows.extend(read_trtexec_times(path, shape))
    return samples_from_rows(rows, source=",".join(os.fspath(p) for p in paths))
