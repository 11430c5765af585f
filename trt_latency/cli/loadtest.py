"""`trt-latency loadtest`: a real serving loop over the calibrated engine, judged against an oracle."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from trt_latency.cli._model import add_model_args, backend_choices, model_options

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
    if args.requests < 1:
        return _usage("--requests must be >= 1")
    if not 0.0 < args.alpha < 1.0:
        return _usage("--alpha must be in (0, 1)")
    if args.budget_ms is not None and not (math.isfinite(args.budget_ms) and args.budget_ms > 0):
        return _usage("--budget-ms must be a finite number > 0")
    if args.slowdown_at is not None and args.slowdown_at < 0:
        return _usage("--slowdown-at must be >= 0")
    if args.slowdown_ms_per_step < 0 or not math.isfinite(args.slowdown_ms_per_step):
        return _usage("--slowdown-ms-per-step must be >= 0")
    if not (math.isfinite(args.slowdown_factor) and args.slowdown_factor >= 1.0):
        return _usage("--slowdown-factor must be >= 1")
    if not all(0.0 < q < 1.0 for q in args.slo_quantiles):
        return _usage("--slo-quantiles must be in (0, 1)")
    if args.calibrate_requests < 0:
        return _usage("--calibrate-requests must be >= 0")
    if args.window < 1:
        return _usage("--window must be >= 1")
    if not 1 <= args.min_observations <= args.window:
        return _usage(f"--min-observations must be in 1 .. --window ({args.window})")
    if args.report_window < 1:
        return _usage("--report-window must be >= 1")
    if args.threads is not None and args.threads < 1:
        return _usage("--threads must be >= 1")
    if args.max_batch < 1:
        return _usage("--max-batch must be >= 1")
    if args.max_batch > 1:
        if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
            return _usage("--rate must be a finite number > 0")
        if not (math.isfinite(args.overload) and args.overload > 0):
            return _usage("--overload must be a finite number > 0")
        if args.batch_calibrate < 0:
            return _usage("--batch-calibrate must be >= 0")
        report = batch_loadtest(args)
        if args.json:
            print(json.dumps(report, indent=2, default=_json_default))
        else:
            _print_batch(report)
        return 0
    report = loadtest(args)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False, default=_json_default))
    else:
        _print_report(report)
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _calibrated_model(args: argparse.Namespace) -> tuple[Path, Any, Path, Any]:
    """(calibration path, calibration, the model it calibrated (or --onnx), the plan it ran)."""
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.serving import loadgen

    cal_path = Path(args.calibration)
    cal = load_calibration(cal_path)
    return cal_path, cal, loadgen.find_model(cal_path, args.onnx), loadgen.plan_of(cal, args.plan)


def _served_threads(args: argparse.Namespace, plan: Any) -> int:
    """Intra-op threads of what the load test serves with: --threads, else the plan's (as it was swept)."""
    return int(args.threads if args.threads is not None else plan.runtime.intra_op_threads)


def _open_served(args: argparse.Namespace, cal: Any, model_path: Path, plan: Any, **extra: Any) -> Any:
    """The runner that serves the load test, opened as the sweep measured it: same thread count and page
    backing, and the KV bound the way it was calibrated unless --kv-mode says otherwise."""
    from trt_latency.serving import loadgen

    options = model_options(args)
    if options["kv_mode"] == "auto":
        options["kv_mode"] = str(cal.provenance.get("kv_mode") or "auto")
    return loadgen.open_model(model_path, args.backend, _served_threads(args, plan), **options,
                              max_past_len=args.max_past_len, huge_pages=_huge_pages(cal, plan), **extra)


def _huge_pages(cal: Any, plan: Any) -> bool:
    """Serve on the backing the calibration recorded (calibrate --huge-pages is not in the plan)."""
    from trt_latency.backing import calibrated_huge_pages

    return calibrated_huge_pages(cal, default=bool(plan.runtime.huge_pages))


def loadtest(args: argparse.Namespace) -> dict[str, Any]:
    from trt_latency.backing import backing_warning
    from trt_latency.estimator.calibration import save_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving import conformal, loadgen
    from trt_latency.serving.admission import AdmissionController, Request

    cal_path, cal, model_path, plan = _calibrated_model(args)
    _check_model_is_calibrated(model_path, cal_path, cal)
    chain = None
    if cal.vision is not None:  # a VLM: requests with vision tokens run encoder -> embedding -> decoder
        from trt_latency.pipeline_vision import chain_from_calibration

        chain = chain_from_calibration(cal, cal_path, _served_threads(args, plan), _huge_pages(cal, plan))
    runner = _open_served(args, cal, model_path, plan)
    if (warning := backing_warning(cal)) is not None:
        print(warning, file=sys.stderr, flush=True)  # stdout may be --json
    try:
        key = loadgen.served_key(model_path, cal)
        cfg = cal.config(*key)
        spec = loadgen.stream_spec(cfg, plan, budget_ms=args.budget_ms)
        estimator = Estimator(cal)
        conformal_info: dict[str, Any] = {"source": None}
        fits = None
        log: Any = None
        # Warm the engine (first runs allocate / page in) before anything is measured.
        loadgen.warm_up(runner, spec, chain=chain)
        if args.calibrate_requests > 0:
            log = loadgen.calibrate_conformal_live(runner, estimator, key, spec, args.calibrate_requests,
                                                   seed=args.seed + 1000, hidden=int(runner.hidden), chain=chain)
            conformal_info["source"] = f"{args.calibrate_requests} live requests"
        elif cfg.conformal is not None:
            conformal_info["source"] = f"{cal_path} (stored)"
        elif (cal_path.parent / "requests.csv").is_file():
            from trt_latency.estimator.requests import read_requests

            log = read_requests(cal_path.parent / "requests.csv")
            conformal_info["source"] = str(cal_path.parent / "requests.csv")
        if log is not None:
            fits = conformal.fit_conformal(estimator, log)
            conformal_info["coverage"] = conformal.coverage_check(estimator, log, seed=args.seed)
            cal = conformal.attach_conformal(cal, fits)
            estimator = Estimator(cal)
            if args.write_conformal:
                save_calibration(cal, cal_path)
                conformal_info["written_to"] = str(cal_path)
        if log is None and not args.no_warm_start and (cal_path.parent / "requests.csv").is_file():
            from trt_latency.estimator.requests import read_requests

            # The replay `calibrate` ran on this machine: real requests to seed the online windows.
            log = read_requests(cal_path.parent / "requests.csv")
            conformal_info["warm_start_source"] = str(cal_path.parent / "requests.csv")
        stored = cal.config(*key).conformal
        conformal_info["stored"] = stored
        if args.budget_ms is None and not (args.raw_budgets and args.budgets == "relative") and stored:
            # Budgets around what requests really take (the conformal median of actual/predicted),
            # not around a prediction that may be biased: then about half of them fit.
            center = dict(zip(stored["alphas"], stored["factors"], strict=True)).get(0.5)
            if center:
                spec = dataclasses.replace(spec, budget_center=float(center))
        if fits is not None and key in fits:
            conformal_info["unavailable_alphas"] = list(fits[key].unavailable)

        controller = AdmissionController(estimator, alpha=args.alpha, policy=args.policy, window=args.window,
                                         min_observations=args.min_observations, reset_after=args.reset_after)
        if log is not None and not args.no_warm_start:
            # The conformal requests were really executed on this engine: start the online windows
            # from them rather than from nothing.
            conformal_info["warm_start_rows"] = controller.warm_start(log)
        spec = dataclasses.replace(spec, budget_mode=args.budgets)
        if args.budget_ms is None and args.budgets == "classes":
            spec = dataclasses.replace(spec, budget_classes=loadgen.slo_classes(estimator, key, spec,
                                                                                args.slo_quantiles))
        result = loadgen.run_stream(runner, controller, estimator, key, spec, args.requests, seed=args.seed,
                                    slowdown_at=args.slowdown_at, slowdown_ms_per_step=args.slowdown_ms_per_step,
                                    slowdown_factor=args.slowdown_factor, chain=chain)
    finally:
        runner.close()
    report: dict[str, Any] = {
        "calibration": str(cal_path),
        "model": str(model_path),
        "backend": getattr(runner, "backend", args.backend),
        "config": list(key),
        "alpha": args.alpha,
        "policy": args.policy,
        "budget": _budget_report(args, spec),
        "slowdown": None if args.slowdown_at is None else {"at_request": args.slowdown_at,
                                                            "ms_per_decode_step": args.slowdown_ms_per_step,
                                                            "decode_factor": args.slowdown_factor},
        "target_violation_rate": loadgen.TARGET_VIOLATION_RATE,
        "vision": None if chain is None else {
            "encoder": str(chain.encoder.sig.path), "family": chain.encoder.sig.family,
            "embedding": None if chain.embedding is None else str(chain.embedding.path),
            "images_per_call": "together" if chain.together else "separate", "images": list(spec.images),
            "requests_with_images": sum(1 for r in result.rows if r.vision_tokens > 0)},
    }
    report.update(loadgen.summarize(result, args.slowdown_at, window=args.report_window))
    if args.dump:
        loadgen.dump_rows(result, args.dump)
        report["dump"] = args.dump
    report["controller"] = controller.counters()
    requests = [Request(r.vision_tokens, r.text_tokens, r.output_tokens, key[0], key[1], key[2], r.budget_ms,
                        r.images) for r in result.rows]
    report.update(loadgen.decide_benchmark(controller, requests))
    report["conformal"] = conformal_info
    return report


def batch_loadtest(args: argparse.Namespace) -> dict[str, Any]:
    """The continuous-batching load test (serving/batchload.py) on the calibrated engine."""
    from trt_latency.errors import BackendUnavailable
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving import batchload, loadgen
    from trt_latency.serving.batch_admission import BatchEstimator

    cal_path, cal, model_path, plan = _calibrated_model(args)
    if cal.vision is not None:
        from trt_latency.errors import InputError

        raise InputError("--max-batch: the batched load test runs the decoder only, and this calibration prices "
                         "an encoder too", path=str(cal_path), field="vision",
                         expected="a decoder-only calibration (or drop --max-batch: the one-at-a-time "
                                  "loadtest serves a VLM through its encoder chain)")
    runner = _open_served(args, cal, model_path, plan, max_batch=args.max_batch)
    try:
        if not hasattr(runner, "time_batch_step"):
            raise BackendUnavailable(f"the {getattr(runner, 'backend', args.backend)} runner has no time_batch_step "
                                     "(batched decode step): --max-batch needs the engine side of issue 12")
        if int(getattr(runner, "max_batch", args.max_batch) or 0) < args.max_batch:
            raise BackendUnavailable(f"the runner batches at most {getattr(runner, 'max_batch', 1)} rows, "
                                     f"--max-batch {args.max_batch} asked")
        key = loadgen.served_key(model_path, cal)
        cfg = cal.config(*key)
        spec = loadgen.stream_spec(cfg, plan)
        est = BatchEstimator.from_estimator(Estimator(cal), *key)
        loadgen.warm_up(runner, spec)
        runner.time_batch_step([int(spec.max_kv or 64) // 2] * args.max_batch, 3)  # page in the batch buffers
        report = batchload.run_policies(runner, est, spec, args.requests, args.max_batch, args.alpha,
                                        rate_rps=args.rate, overload=args.overload,
                                        calibrate_n=args.batch_calibrate, seed=args.seed,
                                        ttft_target_ms=args.ttft_target_ms)
    finally:
        runner.close()
    report.update({"calibration": str(cal_path), "model": str(model_path), "config": list(key),
                   "batch_section": "measured" if est.has_batch_section else "none (B = 1 decode model)"})
    return report


def _print_batch(report: dict[str, Any]) -> None:
    print(f"{report['requests']} requests at {report['rate_rps']:.1f} rps ({report['overload']:.1f}x the estimated "
          f"capacity), max batch {report['max_batch']}, alpha {report['alpha']}, factor {report['factor']:.3f}")
    print(f"  {'policy':18s} {'goodput_rps':>11s} {'violation':>9s} {'admitted':>8s} {'rejected':>8s} "
          f"{'p99_ttft_ms':>11s} {'p99_tpot_ms':>11s}")
    for name, p in report["policies"].items():
        print(f"  {name:18s} {p['goodput_rps']:11.2f} {p['violation_rate']:9.3f} {p['admitted']:8d} "
              f"{p['rejected']:8d} {_fmt(p['p99_ttft_ms']):>11s} {_fmt(p['p99_tpot_ms']):>11s}")


def _check_model_is_calibrated(model_path: Path, cal_path: Path, cal: Any) -> None:
    """A model exported for a config the calibration lacks would be judged with another config's model."""
    from trt_latency.engines.export import model_metadata
    from trt_latency.errors import CalibrationError

    try:
        meta = model_metadata(model_path)
        key = (int(meta["tier_idx"]), int(meta["top_k"]), int(meta["num_active_blocks"]))
    except Exception:  # noqa: BLE001 - a foreign model without our metadata: served as the primary config
        return
    calibrated = [(int(c.tier_idx), int(c.top_k), int(c.num_active_blocks)) for c in cal.configs]
    if key not in calibrated:
        raise CalibrationError(
            f"no config for the model {model_path} (tier_idx, top_k, num_active_blocks) = {key}",
            path=cal_path, field="configs", expected="one of " + ", ".join(map(str, calibrated)))


def _budget_report(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    if args.budget_ms is not None:
        return {"mode": "fixed", "budget_ms": args.budget_ms}
    if args.budgets == "classes":
        return {"mode": "slo-classes", "classes_ms": list(spec.budget_classes),
                "quantiles": list(args.slo_quantiles), "center": spec.budget_center,
                "how": "serving SLOs are per-class budgets: class budgets = quantiles of the predicted totals "
                       "of the request mix * center (conformal median of actual/predicted); each request "
                       "gets a class at random"}
    return {"mode": "relative", "center": spec.budget_center, "spread": list(spec.budget_spread),
            "how": "budget = the request's predicted total * center * U(0.6, 1.6): every request near its "
                   "own boundary (a stress test, not a serving workload)"}


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
