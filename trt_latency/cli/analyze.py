"""`trt-latency analyze REQUESTS.csv [-c CAL] [--json] [--plot F]`: how much of the decode ms/token growth
does KV-cache growth explain?"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from typing import Any

from trt_latency.schema import ConfigKey

EXAMPLE = """\
example:
  trt-latency analyze out/requests.csv -c out/calibration.yaml --plot out/analyze.png
  trt-latency analyze prod_trace.csv -c calibration.yaml --json > report.json

The request log needs the columns vision_tokens,text_tokens,output_tokens,ttft_ms,total_ms
(optional: request_id,tier_idx,top_k,num_active_blocks; 0 blocks = the tier's largest measured).
Decode ms/token = (total_ms - ttft_ms) / (output_tokens - 1), so every request needs >= 2 output tokens.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "analyze",
        help="bucket a request log by output length and say how much of the growth the KV cache explains",
        description=textwrap.fill(
            "Bucket a request log by output tokens (2, 3-5, 6-10, 11-20, 21+): mean and std of decode ms/token, "
            "beside what the calibrated per-position model predicts for the same requests, and the share of the "
            "growth from the first to the last bucket that KV-length growth explains. Also checks (a) decode "
            "latency against KV size in bytes and (b) decode latency at fixed output length across prompt lengths."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("requests", metavar="REQUESTS.csv", help="request log (replay output or a production trace)")
    parser.add_argument("-c", "--calibration", metavar="CAL",
                        help="calibration.yaml to compare with (without it: measured table and checks only)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", metavar="F", help="write measured vs predicted ms/token per bucket to this PNG")
    parser.set_defaults(func=run)


def kv_bytes_from_calibration(cal: Any) -> dict[ConfigKey, float]:
    """Bytes per KV token of each calibrated config (2 * blocks * kv_heads * head_dim * dtype size)."""
    out: dict[ConfigKey, float] = {}
    for cfg in cal.configs:
        value = getattr(cfg, "kv_bytes_per_token", None)
        if value:
            out[ConfigKey(int(cfg.tier_idx), int(cfg.top_k), int(cfg.num_active_blocks))] = float(value)
    return out


def run(args: argparse.Namespace) -> int:
    from trt_latency.estimator.analyze import analyze
    from trt_latency.estimator.requests import read_requests

    log = read_requests(args.requests, require_decode=True)
    estimator = None
    kv_bytes: dict[ConfigKey, float] | None = None
    source: dict[str, Any] = {}
    if args.calibration:
        from trt_latency.estimator.calibration import load_calibration
        from trt_latency.estimator.model import Estimator

        cal = load_calibration(args.calibration)
        estimator = Estimator(cal)
        kv_bytes = kv_bytes_from_calibration(cal) or None
        prov = dict(getattr(cal, "provenance", {}) or {})
        desc = ", ".join(str(prov[k]) for k in ("backend", "device") if prov.get(k))
        source = {"calibration": os.fspath(args.calibration) + (f" ({desc})" if desc else ""),
                  "provenance": {k: v for k, v in prov.items() if isinstance(v, str | int | float)}}
    report = analyze(log, estimator, kv_bytes)
    report.source.update(source)
    if args.plot:
        from trt_latency.plots import plot_analysis

        try:
            plot_analysis(report, args.plot)
        except OSError as exc:
            from trt_latency.errors import InputError

            raise InputError(f"cannot write the plot ({exc.strerror or exc})", path=args.plot,
                             expected="a writable PNG path in an existing folder") from None
        report.source["plot"] = os.fspath(args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table(), end="")
        if args.plot:
            print(f"Plot: {args.plot}")
    return 0
