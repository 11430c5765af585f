"""`trt-latency admit`: would this request fit its latency budget, and how many tokens fit?"""

from __future__ import annotations

import argparse
import json
import math

from trt_latency.cli.predict import add_request_args

EXAMPLE = """\
examples:
  trt-latency admit -c calibration.yaml --budget-ms 120 --vision-tokens 576 --text-tokens 40 --max-new-tokens 64
  trt-latency admit -c calibration.yaml --budget-ms 80 --text-tokens 300 --alpha 0.01 --json
"""


def _budget_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of ms >= 0, got {text!r}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "admit",
        help="admission decision for one request: admit?, max_new_tokens that fit, predicted ms",
        description="The decision the serving loop takes per request (the same compiled code path). "
        "admit is true when the predicted total for --max-new-tokens (1 if omitted) fits --budget-ms.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_request_args(p)
    p.add_argument("--budget-ms", type=_budget_ms, required=True, metavar="MS", help="end-to-end latency budget")
    p.add_argument("--max-new-tokens", type=_tokens, default=None, metavar="N", help="tokens the request wants")
    p.add_argument("--alpha", type=_alpha, default=None, metavar="A",
                   help="violation rate to guard against (conformal factor if calibrated, else residual quantile)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.estimator.model import Estimator

    est = Estimator.load(args.calibration)
    d = est.admit(args.budget_ms, args.vision_tokens, args.text_tokens, args.max_new_tokens, args.tier, args.top_k,
                  args.blocks, args.alpha)  # fmt: skip
    if args.json:
        print(json.dumps({"admit": bool(d.admit), "max_new_tokens": int(d.max_new_tokens),
                          "predicted_ms": None if d.predicted_ms != d.predicted_ms else float(d.predicted_ms),
                          "reason": d.reason}))  # fmt: skip
    else:
        verdict = "ADMIT" if d.admit else "REJECT"
        print(f"{verdict}: max_new_tokens {d.max_new_tokens}, predicted {d.predicted_ms:.3f} ms "
              f"(budget {args.budget_ms:g} ms): {d.reason}")  # fmt: skip
    return 0
