"""`trt-latency predict`: predicted prefill / decode / total ms of one request."""

from __future__ import annotations

import argparse
import json

from trt_latency.cli._args import positive_int
from trt_latency.errors import InputError

EXAMPLE = """\
examples:
  trt-latency predict -c calibration.yaml --vision-tokens 576 --text-tokens 40 --output-tokens 64
  trt-latency predict -c calibration.yaml --text-tokens 200 --output-tokens 32 --quantile 0.99 --json
"""


def add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--calibration", required=True, metavar="CAL", help="calibration.yaml from `fit`/`calibrate`")
    p.add_argument("--vision-tokens", type=int, default=0, metavar="N", help="vision tokens in the prompt (default 0)")
    p.add_argument("--text-tokens", type=int, required=True, metavar="N", help="text tokens in the prompt")
    p.add_argument("--images", type=positive_int, default=None, metavar="N",
                   help="images the vision tokens come as (VLM calibrations; default 1)")
    p.add_argument("--tier", type=int, default=0, metavar="T", help="tier_idx (default 0)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="top_k (default 1)")
    p.add_argument("--blocks", type=int, default=None, metavar="B",
                   help="num_active_blocks (default: the tier's largest measured)")
    p.add_argument("--running", type=running_arg, default=None, metavar="L[:LEFT[:DEADLINE_MS]],...",
                   help="the batch running on the engine now: per request its KV length L, decode steps it may "
                        "still take LEFT (default 1) and its deadline in ms from now (default none); e.g. "
                        "--running 900:40:350,120:8 (batch-aware: T(B, X) from the calibration's batch section)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def running_arg(text: str) -> list:  # type: ignore[type-arg]
    """--running L[:left[:deadline_ms]],... (argparse type: a bad item is a usage error)."""
    from trt_latency.serving.batch_admission import parse_running

    try:
        return parse_running(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def batch_estimator(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The BatchEstimator of the request's config (errors name the calibration)."""
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving.batch_admission import BatchEstimator

    est = Estimator.load(args.calibration)
    try:
        return BatchEstimator.from_estimator(est, args.tier, args.top_k, args.blocks)
    except (InputError, KeyError, ValueError) as exc:
        raise InputError(f"no calibrated config for --tier {args.tier} --top-k {args.top_k} --blocks {args.blocks}: "
                         f"{exc}", path=args.calibration) from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "predict",
        help="predict prefill, decode and total ms for one request",
        description="Prefill(P) + the closed-form sum of decode steps over past_len P .. P+n-2 "
        "(P = vision + text tokens, n = output tokens).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_request_args(p)
    p.add_argument("--output-tokens", type=int, required=True, metavar="N", help="tokens generated (>= 1)")
    p.add_argument("--quantile", type=float, default=None, metavar="Q",
                   help="scale by the residual quantile Q (e.g. 0.99) instead of the median model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.estimator.model import Estimator

    if args.running is not None:
        if args.output_tokens < 1:
            raise InputError("--output-tokens must be >= 1", field="output_tokens", expected="an integer >= 1")
        out = batch_estimator(args).predict(args.vision_tokens, args.text_tokens, args.output_tokens, args.running)
        if args.json:
            print(json.dumps(out))
        else:
            print(f"TTFT {out['ttft_ms']:.3f} ms, total {out['total_ms']:.3f} ms joining a batch of "
                  f"{len(args.running)} (batch {out['batch']} after it)")
            for i, (a, b) in enumerate(zip(out["running_finish_ms_without"], out["running_finish_ms_with"],
                                           strict=True)):
                print(f"  running #{i}: finishes in {a:.3f} ms alone, {b:.3f} ms with the newcomer")
        return 0

    est = Estimator.load(args.calibration)
    try:
        pred = est.predict(args.vision_tokens, args.text_tokens, args.output_tokens, tier_idx=args.tier,
                           top_k=args.top_k, num_active_blocks=args.blocks, quantile=args.quantile,
                           images=args.images)  # fmt: skip
    except InputError as exc:
        if exc.path is not None:
            raise
        # The estimator knows the field, not the file: name the calibration the lookup ran against.
        raise type(exc)(str(exc), path=args.calibration) from None
    if args.json:
        print(json.dumps(pred._asdict()))
    else:
        print(f"prefill {pred.prefill_ms:.3f} ms + decode {pred.decode_ms:.3f} ms = total {pred.total_ms:.3f} ms"
              + (f"  [{pred.flags}]" if pred.flags else ""))  # fmt: skip
    return 0
