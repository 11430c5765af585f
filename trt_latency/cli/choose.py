"""`trt-latency choose`: which config (tier_idx, top_k, num_active_blocks) fits this request's budget?"""

from __future__ import annotations

import argparse
import json
from typing import Any

from trt_latency.cli._args import nonnegative_ms, open_unit, positive_int
from trt_latency.errors import InputError

EXAMPLE = """\
examples:
  trt-latency choose -c calibration.yaml --budget-ms 120 --vision 576 --text 40 --max-new-tokens 64
  trt-latency choose -c vlm/calibration.yaml --budget-ms 60 --vision 512 --images 2 --text 40 --max-new-tokens 16
  trt-latency choose -c calibration.yaml --budget-ms 80 --text 300 --max-new-tokens 32 --candidates 0,2,8 0,1,4 --json
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "choose",
        help="the first config, in preference order, whose prediction fits the budget",
        description="Estimator.choose: tries the configs in order (--candidates, else calibration.yaml's "
        "preference list, else the measured configs most expensive first) and answers with the first whose "
        "admit decision fits --budget-ms, in one compiled call. When none fits: REJECT with the first "
        "candidate's decision.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--calibration", required=True, metavar="CAL", help="calibration.yaml from `fit`/`calibrate`")
    p.add_argument("--budget-ms", type=nonnegative_ms, required=True, metavar="MS", help="end-to-end latency budget")
    p.add_argument("--vision", type=int, default=0, metavar="V", help="vision tokens in the prompt (default 0)")
    p.add_argument("--text", type=int, required=True, metavar="T", help="text tokens in the prompt")
    p.add_argument("--max-new-tokens", type=positive_int, required=True, metavar="N", help="tokens the request wants")
    p.add_argument("--candidates", nargs="+", type=_candidate, default=None, metavar="T,K,B",
                   help="configs to try in this order (B '-' = the tier's largest measured)")
    p.add_argument("--alpha", type=open_unit, default=None, metavar="A",
                   help="violation rate to guard against (conformal factor if calibrated, else residual quantile)")
    p.add_argument("--images", type=positive_int, default=None, metavar="N",
                   help="images the vision tokens come as (VLM calibrations; default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _candidate(text: str) -> tuple[int, int, int | None]:
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return int(parts[0]), int(parts[1]), None if parts[2] == "-" else int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TIER,TOP_K,BLOCKS (integers; BLOCKS may be '-'), got {text!r}") \
            from None


def run(args: argparse.Namespace) -> int:
    from trt_latency.estimator.model import Estimator

    est = Estimator.load(args.calibration)
    for field, value in (("vision", args.vision), ("text", args.text)):
        if value < 0:
            raise InputError(path=args.calibration, field=field, expected="an integer >= 0", got=value)
    d = est.choose(args.budget_ms, args.vision, args.text, args.max_new_tokens, args.candidates, args.alpha,
                   args.images)
    config: Any = None if d.config is None else list(d.config)
    if args.json:
        print(json.dumps({"admit": bool(d.admit), "config": config, "max_new_tokens": int(d.max_new_tokens),
                          "predicted_ms": None if d.predicted_ms != d.predicted_ms else float(d.predicted_ms),
                          "reason": d.reason}))  # fmt: skip
    else:
        verdict = "CHOOSE" if d.admit else "REJECT"
        where = "no config" if config is None else "config (tier_idx, top_k, num_active_blocks) = " + \
            str(tuple(config)).replace("None", "largest")
        print(f"{verdict}: {where}, max_new_tokens {d.max_new_tokens}, predicted {d.predicted_ms:.3f} ms "
              f"(budget {args.budget_ms:g} ms): {d.reason}")  # fmt: skip
    return 0
