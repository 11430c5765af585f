"""`trt-latency admit`: would this request fit its latency budget, and how many tokens fit?"""

from __future__ import annotations

import argparse
import json

from trt_latency.cli._args import nonnegative_ms, open_unit, positive_int
from trt_latency.cli.predict import add_request_args

EXAMPLE = """\
examples:
  trt-latency admit -c calibration.yaml --budget-ms 120 --vision-tokens 576 --text-tokens 40 --max-new-tokens 64
  trt-latency admit -c calibration.yaml --budget-ms 80 --text-tokens 300 --alpha 0.01 --json
  trt-latency admit -c calibration.yaml --budget-ms 200 --text-tokens 300 --max-new-tokens 32 \
      --running 900:40:350,120:8:90 --json     # batch-aware: L:tokens_left:deadline_ms per running request
"""


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
    p.add_argument("--budget-ms", type=nonnegative_ms, required=True, metavar="MS", help="end-to-end latency budget")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N", help="tokens the request wants")
    p.add_argument("--alpha", type=open_unit, default=None, metavar="A",
                   help="violation rate to guard against (conformal factor if calibrated, else residual quantile)")
    p.add_argument("--batch-policy", choices=("protect", "ignore-running"), default="protect",
                   help="with --running: protect (default) also rejects a request that would push a running one "
                        "past its deadline; ignore-running judges the newcomer alone")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.estimator.model import Estimator

    if args.running is not None:
        from trt_latency.cli.predict import batch_estimator

        bd = batch_estimator(args).admit(args.budget_ms, args.vision_tokens, args.text_tokens, args.max_new_tokens,
                                         args.running, args.alpha, args.batch_policy)
        if args.json:
            print(json.dumps({"admit": bool(bd.admit), "max_new_tokens": int(bd.max_new_tokens),
                              "predicted_ms": None if bd.predicted_ms != bd.predicted_ms else float(bd.predicted_ms),
                              "pushed": int(bd.pushed), "extrapolated": bool(bd.extrapolated), "reason": bd.reason,
                              "running": len(args.running)}))
        else:
            print(f"{'ADMIT' if bd.admit else 'REJECT'}: max_new_tokens {bd.max_new_tokens}, predicted "
                  f"{bd.predicted_ms:.3f} ms (budget {args.budget_ms:g} ms, {len(args.running)} running): {bd.reason}")
        return 0

    est = Estimator.load(args.calibration)
    d = est.admit(args.budget_ms, args.vision_tokens, args.text_tokens, args.max_new_tokens, args.tier, args.top_k,
                  args.blocks, args.alpha, args.images)  # fmt: skip
    if args.json:
        print(json.dumps({"admit": bool(d.admit), "max_new_tokens": int(d.max_new_tokens),
                          "predicted_ms": None if d.predicted_ms != d.predicted_ms else float(d.predicted_ms),
                          "reason": d.reason}))  # fmt: skip
    else:
        verdict = "ADMIT" if d.admit else "REJECT"
        print(f"{verdict}: max_new_tokens {d.max_new_tokens}, predicted {d.predicted_ms:.3f} ms "
              f"(budget {args.budget_ms:g} ms): {d.reason}")  # fmt: skip
    return 0
