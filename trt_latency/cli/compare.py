"""`trt-latency compare REQUESTS.csv [-c CAL] [--alpha A] [--split parity|random] [--seed S] [--json] [--plot F]`:
the seed's estimator options fitted on one half of a request log and scored on the other."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from trt_latency.cli._args import open_unit

EXAMPLE = """\
example:
  trt-latency compare out/requests.csv -c out/calibration.yaml --alpha 0.05 --plot out/compare.png
  trt-latency compare prod_trace.csv --split random --seed 1 --json > compare.json

Strategies: average (one mean ms/token and mean TTFT), conservative-1.2 / -1.3 (the 21+ bucket's
ms/token x the safety factor), hybrid (early rate for tokens 2-5, late rate after, weighted by the fit
half's output lengths), position (per-position model: the calibration's engine model + serving-loop
terms fitted on the fit half; without -c, a regression on the fit half), trt-latency (position x its
conformal factor for --alpha, from the fit half only). Scores on the held-out half: mape, violation_rate,
over_reservation, admitted and goodput at loadtest's four SLO-class budgets.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "compare",
        help="fit the seed's estimator options on half a request log, score them on the other half",
        description=textwrap.fill(
            "Split a request log into a fit half and a held-out half (request_id parity, or a seeded random "
            "half), fit each estimator strategy on the fit half only, and score it on the held-out half: how often "
            "it misses (actual > its bound), how much it over-reserves, and how many requests it admits and "
            "serves in time at four SLO-class budgets."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("requests", metavar="REQUESTS.csv", help="request log (replay output or a production trace)")
    parser.add_argument("-c", "--calibration", metavar="CAL",
                        help="calibration.yaml: position uses its engine model (without: fitted from the requests)")
    parser.add_argument("--alpha", type=open_unit, default=0.05, metavar="A",
                        help="miscoverage level of the trt-latency strategy's conformal factor (default 0.05)")
    parser.add_argument("--split", choices=("parity", "random"), default="parity",
                        help="fit/held-out split: request_id parity (default) or a seeded random half")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of --split random (default 0)")
    parser.add_argument("--conformal", choices=("cross", "split"), default="cross",
                        help="trt-latency's factor: cross-conformal over 5 folds of the fit half (default; the bound "
                             "uses position itself) or split conformal (position on half the fit half, exact "
                             "guarantee)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", metavar="F", help="write bound vs actual per strategy to this PNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trt_latency.diagnostics.run import CompareOptions, run_compare

    report = run_compare(CompareOptions.from_namespace(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=_jsonable))
    else:
        print(report.format_table(), end="")
        if report.source.get("skipped"):
            print(f"{report.source['skipped']} requests the calibration cannot predict took no part")
        if args.plot:
            print(f"Plot: {args.plot}")
    return 0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
