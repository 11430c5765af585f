"""`trt-latency loadtest`: a real serving loop over the calibrated engine, judged against an oracle.

The verb parses the flags into trt_latency.loadtest.LoadtestOptions, runs the load test and prints its report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trt_latency.cli._model import add_model_args, backend_choices

EPILOG = """\
example:
  trt-latency calibrate --quick --requests 120 --out cal
  trt-latency loadtest -c cal/calibration.yaml --alpha 0.05 --json
  trt-latency loadtest -c cal/calibration.yaml --alpha 0.05 --slowdown-at 300 --slowdown-factor 1.4 --json
  trt-latency loadtest -c cal/calibration.yaml --budgets relative --json   # the old stress mode
  trt-latency loadtest -c cal/calibration.yaml --max-batch 8 --requests 300 --alpha 0.05 --json

--max-batch B (> 1): continuous batching on the real engine (serving/batchload.py): per iteration the
arrivals are admitted and prefilled, then one batched decode step runs for every running request;
Poisson arrivals at --overload x the estimated capacity; the same trace under admit-all, the
queued-token cap, the seed's constant ms/token rule and trt-latency's batch-aware admission; --json
prints per policy (under "policies") goodput_rps, violation_rate, admitted, rejected, p99_ttft_ms,
p99_tpot_ms, plus alpha and the conformal factor fitted on a separate batched replay.

Every request is executed for real (rejected ones in shadow mode), so the oracle decision
(true total <= budget, on that same execution) is known; the controller only observes the requests
it admitted. violation_rate = violations / admitted; admitted_vs_oracle = admitted / oracle-admitted.

Budgets (--budgets): serving SLOs are per-class budgets, not per-request multiples of a prediction.
  classes (default): SLO classes at the 20/40/60/80% quantiles of the predicted totals of the
    request mix, times m, the conformal median of actual/predicted; each request gets a class at
    random. Lengths vary widely (prompt from the plan's replay spec, output tokens log-uniform), so
    some requests fit their class by far, some miss it by far, a few are near the boundary.
  relative: budget = the request's own predicted total * m * U(0.6, 1.6) (--raw-budgets: m = 1):
    every request near its own boundary, where measurement noise makes any alpha-bounded
    controller reject much of what an oracle admits. A stress test, not a serving workload.
  --budget-ms B fixes one budget for all.
Conformal factors come from --calibrate-requests N live requests, else from the calibration,
else from requests.csv next to it. alpha 0.05 needs >= 19 held-out requests: calibrate with
--requests 120 (60 held out) or pass --calibrate-requests.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest",
        help="serve a request stream with the admission controller and compare with an oracle",
        description="Run a real serving loop over the calibrated engine: every request decided by the "
        "AdmissionController and executed (rejected ones in shadow), reporting violation rate, "
        "admitted vs oracle, and the controller's cost per decision.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--calibration", required=True, metavar="CAL", help="calibration.yaml")
    p.add_argument("--onnx", metavar="F", help="model to serve (default: model.onnx next to CAL)")
    p.add_argument("--backend", default="ort-cpu", help="runner backend (default ort-cpu; names: "
                   + ", ".join(backend_choices()) + ")")
    p.add_argument("--plan", metavar="YAML", default=None,
                   help="plan whose replay lengths the stream draws (default: the one the calibration names)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runner's)")
    add_model_args(p)
    p.add_argument("--requests", type=int, default=600, metavar="N", help="requests in the stream (default 600)")
    p.add_argument("--budget-ms", type=float, default=None, metavar="B",
                   help="fixed budget for every request (overrides --budgets)")
    p.add_argument("--budgets", choices=("classes", "relative"), default="classes",
                   help="budget model: SLO classes from quantiles of the predicted totals of the mix "
                        "(default), or the old per-request predicted * U(0.6, 1.6) stress mode")
    p.add_argument("--slo-quantiles", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], metavar="Q",
                   help="quantiles of the mix's predicted totals that set the SLO classes (default 0.2 0.4 0.6 0.8)")
    p.add_argument("--raw-budgets", action="store_true",
                   help="budgets around the raw prediction, not the conformal median of actual/predicted")
    p.add_argument("--alpha", type=float, default=0.05, metavar="A", help="violation level (default 0.05)")
    p.add_argument("--policy", choices=("reject", "admit", "cap"), default="reject",
                   help="requests the estimator cannot judge (default reject)")
    p.add_argument("--window", type=int, default=8, help="controller drift window per config (default 8)")
    p.add_argument("--min-observations", type=int, default=4, help="before a correction acts (default 4)")
    p.add_argument("--slowdown-at", type=int, default=None, metavar="K",
                   help="inject a per-decode-step stall from request K on")
    p.add_argument("--slowdown-ms-per-step", type=float, default=0.0, metavar="X",
                   help="stall per decode step after --slowdown-at (ms)")
    p.add_argument("--slowdown-factor", type=float, default=1.0, metavar="F",
                   help="after --slowdown-at every decode step takes F times as long (e.g. 1.4 = +40%%)")
    p.add_argument("--calibrate-requests", type=int, default=0, metavar="N",
                   help="first run N live requests and fit the conformal factors on them")
    p.add_argument("--write-conformal", action="store_true",
                   help="store the fitted conformal factors into CAL (atomic write)")
    p.add_argument("--reset-after", type=int, default=None, metavar="N",
                   help="controller forgets a config's windows after N rejections in a row (default: never)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="do not seed the controller's windows with the conformal requests")
    p.add_argument("--report-window", type=int, default=50, help="window (requests) of the slowdown report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=1, metavar="B",
                   help="B > 1: continuous batching (iteration-level loop, Poisson arrivals at overload, the "
                        "same trace under admit-all / queued-token-cap / seed / trt-latency); 1 (default): "
                        "the single-request loop")
    p.add_argument("--rate", type=float, default=None, metavar="RPS",
                   help="--max-batch: arrival rate (default: --overload x the estimated capacity)")
    p.add_argument("--overload", type=float, default=2.0, metavar="X",
                   help="--max-batch: arrival rate as a multiple of the estimated capacity (default 2)")
    p.add_argument("--batch-calibrate", type=int, default=300, metavar="N",
                   help="--max-batch: requests of the factor-1 replay the conformal factor is fitted on (default 300)")
    p.add_argument("--ttft-target-ms", type=float, default=None, metavar="MS",
                   help="--max-batch: the queued-token cap's target TTFT (default: 1/4 of the median SLO class)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dump", metavar="CSV", default=None, help="write every executed request to CSV")
    p.set_defaults(func=run)


def _usage(message: str) -> int:
    print(f"trt-latency loadtest: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from trt_latency.loadtest import LoadtestOptions, run_loadtest

    options = LoadtestOptions.from_namespace(args)
    problem = options.problem()
    if problem is not None:
        return _usage(problem)
    report = run_loadtest(options)
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    elif options.max_batch > 1:
        _print_batch(report)
    else:
        _print_report(report)
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _print_batch(report: dict[str, Any]) -> None:
    print(f"{report['requests']} requests at {report['rate_rps']:.1f} rps ({report['overload']:.1f}x the estimated "
          f"capacity), max batch {report['max_batch']}, alpha {report['alpha']}, factor {report['factor']:.3f}")
    print(f"  {'policy':18s} {'goodput_rps':>11s} {'violation':>9s} {'admitted':>8s} {'rejected':>8s} "
          f"{'p99_ttft_ms':>11s} {'p99_tpot_ms':>11s}")
    for name, p in report["policies"].items():
        print(f"  {name:18s} {p['goodput_rps']:11.2f} {p['violation_rate']:9.3f} {p['admitted']:8d} "
              f"{p['rejected']:8d} {_fmt(p['p99_ttft_ms']):>11s} {_fmt(p['p99_tpot_ms']):>11s}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_report(report: dict[str, Any]) -> None:
    print(f"served {report['requests']} requests of config {tuple(report['config'])} on {report['backend']} "
          f"(alpha {report['alpha']}, budgets {report['budget']['mode']})")
    for name in ("admitted", "oracle_admitted", "violations", "violation_rate", "admitted_vs_oracle",
                 "controller_ns_per_decision", "estimator_admit_ns", "bare_python_call_ns", "decisions_per_s",
                 "serving_requests_per_s"):
        print(f"  {name:28s} {_fmt(report.get(name))}")
    if report.get("vision"):
        v = report["vision"]
        print(f"  through the encoder chain: {v['family']} {v['encoder']} ({v['requests_with_images']} requests with "
              f"images, {v['images']} per request, {v['images_per_call']} per call)")
    if report.get("slowdown"):
        s = report["slowdown"]
        print(f"slowdown of {s['ms_per_decode_step']} ms per decode step, decode x{s['decode_factor']}, "
              f"from request {s['at_request']}:")
        for part in ("before_slowdown", "after_slowdown"):
            r = report[part]
            print(f"  {part:16s} violation_rate {_fmt(r['violation_rate'])}  admitted_vs_oracle "
                  f"{_fmt(r['admitted_vs_oracle'])}")
        for w in report["windows_after_change"]:
            print(f"  requests {w['from']:4d}-{w['to']:4d} after the change: {w['violations']:3d} violations / "
                  f"{w['admitted']:3d} admitted = {_fmt(w['violation_rate'])}")
        print(f"  back under {report['target_violation_rate']} after {_fmt(report['recovered_within_requests'])} "
              f"requests; violation rate after 200: {_fmt(report['violation_rate_after_200'])}")
    conf = report["conformal"]
    print(f"conformal factors from {conf['source'] or 'nowhere (no request log)'}: {conf.get('stored')}")
