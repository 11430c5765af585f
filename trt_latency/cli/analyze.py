"""`trt-latency analyze REQUESTS.csv [-c CAL] [--json] [--plot F]`: how much of the decode ms/token growth
does KV-cache growth explain? `trt-latency analyze --table TABLE.csv [...]`: which cause (constant, counting,
first_step, kv_growth) explains a bucket table of mean ms/token per output length?"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from typing import Any

from trt_latency.cli._args import positive_int
from trt_latency.diagnostics.causes import (
    DEFAULT_BANDWIDTH_GB_S,
    DEFAULT_KV_BYTES_PER_TOKEN,
    OPEN_UPPER_FACTOR,
)

EXAMPLE = """\
example:
  trt-latency analyze out/requests.csv -c out/calibration.yaml --plot out/analyze.png
  trt-latency analyze prod_trace.csv -c calibration.yaml --json > report.json
  trt-latency analyze --table benchmarks/seed_table.csv --plot causes.png

The request log needs the columns vision_tokens,text_tokens,output_tokens,ttft_ms,total_ms
(optional: request_id,tier_idx,top_k,num_active_blocks; 0 blocks = the tier's largest measured).
Decode ms/token = (total_ms - ttft_ms) / (output_tokens - 1), so every request needs >= 2 output tokens.

--table instead of a request log: columns output_tokens (a bucket: 2, 3-5, 21+), ms_per_token (the mean
over the bucket's requests), optional std and count. Four causes are fitted and compared (AICc):
constant R; counting R (n-1)/n (decode time divided by n, not n - 1); first_step R + c/(n-1);
kv_growth a + b (P + (n-2)/2), b >= 0 and checked against the calibration's KV slope (-c) or an assumed
bound (--kv-bytes-per-token / --bandwidth-gbs).
"""


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def nonnegative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


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
    parser.add_argument("requests", metavar="REQUESTS.csv", nargs="?",
                        help="request log (replay output or a production trace); or use --table")
    parser.add_argument("--table", metavar="TABLE.csv",
                        help="a bucket table (output_tokens, ms_per_token[, std][, count]) instead of a request log: "
                             "test which cause explains it")
    parser.add_argument("--prompt-tokens", type=nonnegative_number, default=0.0, metavar="P",
                        help="--table: prompt tokens assumed for kv_growth (default 0; P moves only its a, not b)")
    parser.add_argument("--open-upper", type=positive_int, default=None, metavar="N",
                        help=f"--table: upper end of an open last bucket like 21+ (default {OPEN_UPPER_FACTOR}x its start)")
    parser.add_argument("--kv-bytes-per-token", type=positive_number, default=DEFAULT_KV_BYTES_PER_TOKEN, metavar="B",
                        help="without -c: KV bytes read per token of KV length, for the kv_growth slope bound "
                             f"(default {DEFAULT_KV_BYTES_PER_TOKEN:.0e}, an assumption)")
    parser.add_argument("--bandwidth-gbs", type=positive_number, default=DEFAULT_BANDWIDTH_GB_S, metavar="G",
                        help=f"without -c: memory bandwidth in GB/s for that bound (default {DEFAULT_BANDWIDTH_GB_S:g})")
    parser.add_argument("-c", "--calibration", metavar="CAL",
                        help="calibration.yaml to compare with (without it: measured table and checks only)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", metavar="F", help="write measured vs predicted ms/token per bucket to this PNG")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.requests is None and args.table is None:
        args.parser.error("the following arguments are required: REQUESTS.csv (or --table TABLE.csv)")
    if args.requests is not None and args.table is not None:
        args.parser.error("REQUESTS.csv and --table TABLE.csv are mutually exclusive: give one of them")
    from trt_latency.diagnostics.run import AnalyzeOptions, run_analyze

    result = run_analyze(AnalyzeOptions.from_namespace(args))
    return _print(result.report, result.calibration, args)


def _print(report: Any, cal: Any, args: argparse.Namespace) -> int:
    """The report (table or JSON), plus each config's batched step-cost curves when the calibration has them."""
    batch = {f"t{c.tier_idx}.k{c.top_k}.b{c.num_active_blocks}": c.batch
             for c in (cal.configs if cal is not None else []) if getattr(c, "batch", None) is not None}
    if args.json:
        out = report.to_dict()
        if batch:  # in-flight batching: each config's step cost T(B, X) per batch size, with its held-out errors
            out["batch"] = batch
        print(json.dumps(out, indent=2))
    else:
        print(report.format_table(), end="")
        if batch:
            from trt_latency.estimator.batch_fit import format_batch_table

            print()
            print(format_batch_table(cal), end="")
        if args.plot:
            print(f"Plot: {args.plot}")
    return 0
