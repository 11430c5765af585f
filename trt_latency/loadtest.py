"""The load test as a library: ``loadtest(LoadtestOptions) -> report`` (and ``batch_loadtest`` for
``max_batch > 1``), what ``trt-latency loadtest`` runs (the verb parses the flags into LoadtestOptions and
prints the report).

It opens what a calibration calibrated (the model beside it, the plan it ran, the VLM encoder chain of its
provenance) the way the sweep measured it, fits or reads the conformal factors, and runs the serving loop
of serving/loadgen.py (one request at a time) or serving/batchload.py (continuous batching). It sits
beside pipeline.py (calibrate's library), above engines/, estimator/ and serving/.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LoadtestOptions:
    """Everything a load test needs; the field names are the CLI flags' (``--slo-quantiles`` ->
    ``slo_quantiles``), so ``from_namespace`` reads a parsed command line."""

    calibration: str  # calibration.yaml
    onnx: str | None = None  # the model to serve (default: model.onnx next to the calibration)
    backend: str = "ort-cpu"
    plan: str | None = None  # plan whose replay lengths the stream draws (default: the calibration's)
    threads: int | None = None  # intra-op threads (default: the plan's, as it was swept)
    # the decoder signature of a model from another exporter (engines/signature.py)
    kv_mode: str = "auto"
    io: str | None = None
    dims: str | None = None
    max_past_len: int | None = None
    requests: int = 600
    budget_ms: float | None = None  # one budget for every request (overrides budgets)
    budgets: str = "classes"  # "classes" (SLO classes) or "relative" (the stress mode)
    slo_quantiles: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    raw_budgets: bool = False
    alpha: float = 0.05
    policy: str = "reject"  # requests the estimator cannot judge: reject, admit, cap
    window: int = 8
    min_observations: int = 4
    slowdown_at: int | None = None
    slowdown_ms_per_step: float = 0.0
    slowdown_factor: float = 1.0
    calibrate_requests: int = 0
    write_conformal: bool = False
    reset_after: int | None = None
    no_warm_start: bool = False
    report_window: int = 50
    seed: int = 0
    # max_batch > 1: the continuous-batching load test (serving/batchload.py)
    max_batch: int = 1
    rate: float | None = None
    overload: float = 2.0
    batch_calibrate: int = 300
    ttft_target_ms: float | None = None
    dump: str | None = None  # write every executed request to this CSV

    @classmethod
    def from_namespace(cls, ns: Any) -> LoadtestOptions:
        values = {f: getattr(ns, f) for f in cls.__dataclass_fields__ if f != "extra" and hasattr(ns, f)}
        if values.get("slo_quantiles") is not None:
            values["slo_quantiles"] = tuple(values["slo_quantiles"])
        return cls(**values)

    def problem(self) -> str | None:
        """The first option out of range, in the flag's words (None: all fine)."""
        if self.requests < 1:
            return "--requests must be >= 1"
        if not 0.0 < self.alpha < 1.0:
            return "--alpha must be in (0, 1)"
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            return "--budget-ms must be a finite number > 0"
        if self.slowdown_at is not None and self.slowdown_at < 0:
            return "--slowdown-at must be >= 0"
        if self.slowdown_ms_per_step < 0 or not math.isfinite(self.slowdown_ms_per_step):
            return "--slowdown-ms-per-step must be >= 0"
        if not (math.isfinite(self.slowdown_factor) and self.slowdown_factor >= 1.0):
            return "--slowdown-factor must be >= 1"
        if not all(0.0 < q < 1.0 for q in self.slo_quantiles):
            return "--slo-quantiles must be in (0, 1)"
        if self.calibrate_requests < 0:
            return "--calibrate-requests must be >= 0"
        if self.window < 1:
            return "--window must be >= 1"
        if not 1 <= self.min_observations <= self.window:
            return f"--min-observations must be in 1 .. --window ({self.window})"
        if self.report_window < 1:
            return "--report-window must be >= 1"
        if self.threads is not None and self.threads < 1:
            return "--threads must be >= 1"
        if self.max_batch < 1:
            return "--max-batch must be >= 1"
        if self.max_batch > 1:
            if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
                return "--rate must be a finite number > 0"
            if not (math.isfinite(self.overload) and self.overload > 0):
                return "--overload must be a finite number > 0"
            if self.batch_calibrate < 0:
                return "--batch-calibrate must be >= 0"
        return None


def run_loadtest(options: LoadtestOptions) -> dict[str, Any]:
    """The load test the options ask for: batched (max_batch > 1) or one request at a time. ValueError on
    an option out of range."""
    problem = options.problem()
    if problem is not None:
        raise ValueError(problem)
    return batch_loadtest(options) if options.max_batch > 1 else loadtest(options)


def _calibrated_model(options: LoadtestOptions) -> tuple[Path, Any, Path, Any]:
    """(calibration path, calibration, the model it calibrated (or --onnx), the plan it ran)."""
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.serving import loadgen

    cal_path = Path(options.calibration)
    cal = load_calibration(cal_path)
    return cal_path, cal, loadgen.find_model(cal_path, options.onnx), loadgen.plan_of(cal, options.plan)


def _served_threads(options: LoadtestOptions, plan: Any) -> int:
    """Intra-op threads of what the load test serves with: --threads, else the plan's (as it was swept)."""
    return int(options.threads if options.threads is not None else plan.runtime.intra_op_threads)


def _open_served(options: LoadtestOptions, cal: Any, model_path: Path, plan: Any, **extra: Any) -> Any:
    """The runner that serves the load test, opened as the sweep measured it: same thread count and page
    backing, and the KV bound the way it was calibrated unless --kv-mode says otherwise."""
    from trt_latency.serving import loadgen

    model = {"kv_mode": options.kv_mode, "io": options.io, "dims": options.dims}
    if model["kv_mode"] == "auto":
        model["kv_mode"] = str(cal.provenance.get("kv_mode") or "auto")
    return loadgen.open_model(model_path, options.backend, _served_threads(options, plan), **model,
                              max_past_len=options.max_past_len, huge_pages=_huge_pages(cal, plan), **extra)


def _huge_pages(cal: Any, plan: Any) -> bool:
    """Serve on the backing the calibration recorded (calibrate --huge-pages is not in the plan)."""
    from trt_latency.backing import calibrated_huge_pages

    return calibrated_huge_pages(cal, default=bool(plan.runtime.huge_pages))


def loadtest(options: LoadtestOptions) -> dict[str, Any]:
    from trt_latency.backing import backing_warning
    from trt_latency.estimator.calibration import save_calibration
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving import conformal, loadgen
    from trt_latency.serving.admission import AdmissionController, Request

    cal_path, cal, model_path, plan = _calibrated_model(options)
    _check_model_is_calibrated(model_path, cal_path, cal)
    chain = None
    if cal.vision is not None:  # a VLM: requests with vision tokens run encoder -> embedding -> decoder
        from trt_latency.pipeline_vision import chain_from_calibration

        chain = chain_from_calibration(cal, cal_path, _served_threads(options, plan), _huge_pages(cal, plan))
    runner = _open_served(options, cal, model_path, plan)
    if (warning := backing_warning(cal)) is not None:
        print(warning, file=sys.stderr, flush=True)  # stdout may be --json
    try:
        key = loadgen.served_key(model_path, cal)
        cfg = cal.config(*key)
        spec = loadgen.stream_spec(cfg, plan, budget_ms=options.budget_ms)
        estimator = Estimator(cal)
        conformal_info: dict[str, Any] = {"source": None}
        fits = None
        log: Any = None
        # Warm the engine (first runs allocate / page in) before anything is measured.
        loadgen.warm_up(runner, spec, chain=chain)
        if options.calibrate_requests > 0:
            log = loadgen.calibrate_conformal_live(runner, estimator, key, spec, options.calibrate_requests,
                                                   seed=options.seed + 1000, hidden=int(runner.hidden), chain=chain)
            conformal_info["source"] = f"{options.calibrate_requests} live requests"
        elif cfg.conformal is not None:
            conformal_info["source"] = f"{cal_path} (stored)"
        elif (cal_path.parent / "requests.csv").is_file():
            from trt_latency.estimator.requests import read_requests

            log = read_requests(cal_path.parent / "requests.csv")
            conformal_info["source"] = str(cal_path.parent / "requests.csv")
        if log is not None:
            fits = conformal.fit_conformal(estimator, log)
            conformal_info["coverage"] = conformal.coverage_check(estimator, log, seed=options.seed)
            cal = conformal.attach_conformal(cal, fits)
            estimator = Estimator(cal)
            if options.write_conformal:
                save_calibration(cal, cal_path)
                conformal_info["written_to"] = str(cal_path)
        if log is None and not options.no_warm_start and (cal_path.parent / "requests.csv").is_file():
            from trt_latency.estimator.requests import read_requests

            # The replay `calibrate` ran on this machine: real requests to seed the online windows.
            log = read_requests(cal_path.parent / "requests.csv")
            conformal_info["warm_start_source"] = str(cal_path.parent / "requests.csv")
        stored = cal.config(*key).conformal
        conformal_info["stored"] = stored
        if options.budget_ms is None and not (options.raw_budgets and options.budgets == "relative") and stored:
            # Budgets around what requests really take (the conformal median of actual/predicted),
            # not around a prediction that may be biased: then about half of them fit.
            center = dict(zip(stored["alphas"], stored["factors"], strict=True)).get(0.5)
            if center:
                spec = dataclasses.replace(spec, budget_center=float(center))
        if fits is not None and key in fits:
            conformal_info["unavailable_alphas"] = list(fits[key].unavailable)

        controller = AdmissionController(estimator, alpha=options.alpha, policy=options.policy, window=options.window,
                                         min_observations=options.min_observations, reset_after=options.reset_after)
        if log is not None and not options.no_warm_start:
            # The conformal requests were really executed on this engine: start the online windows
            # from them rather than from nothing.
            conformal_info["warm_start_rows"] = controller.warm_start(log)
        spec = dataclasses.replace(spec, budget_mode=options.budgets)
        if options.budget_ms is None and options.budgets == "classes":
            spec = dataclasses.replace(spec, budget_classes=loadgen.slo_classes(estimator, key, spec,
                                                                                options.slo_quantiles))
        result = loadgen.run_stream(runner, controller, estimator, key, spec, options.requests, seed=options.seed,
                                    slowdown_at=options.slowdown_at, slowdown_ms_per_step=options.slowdown_ms_per_step,
                                    slowdown_factor=options.slowdown_factor, chain=chain)
    finally:
        runner.close()
    report: dict[str, Any] = {
        "calibration": str(cal_path),
        "model": str(model_path),
        "backend": getattr(runner, "backend", options.backend),
        "config": list(key),
        "alpha": options.alpha,
        "policy": options.policy,
        "budget": _budget_report(options, spec),
        "slowdown": None if options.slowdown_at is None else {"at_request": options.slowdown_at,
                                                            "ms_per_decode_step": options.slowdown_ms_per_step,
                                                            "decode_factor": options.slowdown_factor},
        "target_violation_rate": loadgen.TARGET_VIOLATION_RATE,
        "vision": None if chain is None else {
            "encoder": str(chain.encoder.sig.path), "family": chain.encoder.sig.family,
            "embedding": None if chain.embedding is None else str(chain.embedding.path),
            "images_per_call": "together" if chain.together else "separate", "images": list(spec.images),
            "requests_with_images": sum(1 for r in result.rows if r.vision_tokens > 0)},
    }
    report.update(loadgen.summarize(result, options.slowdown_at, window=options.report_window))
    if options.dump:
        loadgen.dump_rows(result, options.dump)
        report["dump"] = options.dump
    report["controller"] = controller.counters()
    requests = [Request(r.vision_tokens, r.text_tokens, r.output_tokens, key[0], key[1], key[2], r.budget_ms,
                        r.images) for r in result.rows]
    report.update(loadgen.decide_benchmark(controller, requests))
    report["conformal"] = conformal_info
    return report


def batch_loadtest(options: LoadtestOptions) -> dict[str, Any]:
    """The continuous-batching load test (serving/batchload.py) on the calibrated engine."""
    from trt_latency.errors import BackendUnavailable
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving import batchload, loadgen
    from trt_latency.serving.batch_admission import BatchEstimator

    cal_path, cal, model_path, plan = _calibrated_model(options)
    if cal.vision is not None:
        from trt_latency.errors import InputError

        raise InputError("--max-batch: the batched load test runs the decoder only, and this calibration prices "
                         "an encoder too", path=str(cal_path), field="vision",
                         expected="a decoder-only calibration (or drop --max-batch: the one-at-a-time "
                                  "loadtest serves a VLM through its encoder chain)")
    runner = _open_served(options, cal, model_path, plan, max_batch=options.max_batch)
    try:
        if not hasattr(runner, "time_batch_step"):
            raise BackendUnavailable(f"the {getattr(runner, 'backend', options.backend)} runner has no time_batch_step "
                                     "(batched decode step): --max-batch needs the engine side of issue 12")
        if int(getattr(runner, "max_batch", options.max_batch) or 0) < options.max_batch:
            raise BackendUnavailable(f"the runner batches at most {getattr(runner, 'max_batch', 1)} rows, "
                                     f"--max-batch {options.max_batch} asked")
        key = loadgen.served_key(model_path, cal)
        cfg = cal.config(*key)
        spec = loadgen.stream_spec(cfg, plan)
        est = BatchEstimator.from_estimator(Estimator(cal), *key)
        loadgen.warm_up(runner, spec)
        runner.time_batch_step([int(spec.max_kv or 64) // 2] * options.max_batch, 3)  # page in the batch buffers
        report = batchload.run_policies(runner, est, spec, options.requests, options.max_batch, options.alpha,
                                        rate_rps=options.rate, overload=options.overload,
                                        calibrate_n=options.batch_calibrate, seed=options.seed,
                                        ttft_target_ms=options.ttft_target_ms)
    finally:
        runner.close()
    report.update({"calibration": str(cal_path), "model": str(model_path), "config": list(key),
                   "batch_section": "measured" if est.has_batch_section else "none (B = 1 decode model)"})
    return report


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


def _budget_report(options: LoadtestOptions, spec: Any) -> dict[str, Any]:
    if options.budget_ms is not None:
        return {"mode": "fixed", "budget_ms": options.budget_ms}
    if options.budgets == "classes":
        return {"mode": "slo-classes", "classes_ms": list(spec.budget_classes),
                "quantiles": list(options.slo_quantiles), "center": spec.budget_center,
                "how": "serving SLOs are per-class budgets: class budgets = quantiles of the predicted totals "
                       "of the request mix * center (conformal median of actual/predicted); each request "
                       "gets a class at random"}
    return {"mode": "relative", "center": spec.budget_center, "spread": list(spec.budget_spread),
            "how": "budget = the request's predicted total * center * U(0.6, 1.6): every request near its "
                   "own boundary (a stress test, not a serving workload)"}
