"""`trt-latency serve`'s loop behind a real NVIDIA Triton Inference Server (nvidia-pytriton), under Poisson load.

    # once: pytriton pins numpy < 2, so it gets its own venv (never the package's deps, never CI)
    python3 -m venv /work/scratch/pytriton-venv
    /work/scratch/pytriton-venv/bin/pip install nvidia-pytriton onnxruntime onnx pyyaml tqdm prometheus_client \
        tokenizers "setuptools>=70" Cython
    /work/scratch/pytriton-venv/bin/pip install --no-deps --no-build-isolation -e .
    # a calibration of the serving model (benchmarks/serve_goodput.sh makes one under $WORK/cal), then:
    LD_LIBRARY_PATH=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))') \
        /work/scratch/pytriton-venv/bin/python benchmarks/pytriton_serve.py --cal /work/scratch/serve_goodput/cal \
        --rate 40 --requests 300 --slo-ms 180

The server side is serving/triton_front.py on the engine loop `serve` builds (cli.serve.make_context): the
same admission (trt-latency, or --admission none / seed-1.3), Triton's HTTP front end, `--instances` model
instances (requests Triton hands the handler at once: with fewer than requests in flight, the rest wait in
Triton's queue before the handler's clock starts). The client runs in a process of its own (as aiperf does
for `serve`) and sends Poisson arrivals through pytriton's ModelClient (one per client thread, connected
before the clock starts), ISL / OSL fixed (ignore_eos), latency from each scheduled arrival; it reports what
it saw: completed, rejected at admission (with the reason), SLO violations among the completed, client-side
latency p50 / p99, and the server's decision cost, decisions by reason and delivery lag. A reject is an answer whose
``rejected`` output holds the reason (serving/triton_front.py says why not a Triton error). It also checks the tokens of
the first requests against the runner's own greedy generation. LD_LIBRARY_PATH: the Python-backend stub
bundled with pytriton links libpython3.11 (a pyenv Python keeps it in its LIBDIR).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def client_run(url: str, prompts: list[np.ndarray], gaps: list[float], osl: int,
               workers: int) -> tuple[float, list[dict[str, Any]]]:
    """The load generator, in its own process (as aiperf is for `serve`): ``workers`` threads, each with its
    own pytriton ModelClient (a client is not thread-safe and its greenlets are bound to the thread that made
    it), all connected before the clock starts (a client's first call waits for the server and reads the
    model's config: made during the run, they slowed the server itself in its first second); request i is
    sent at start + the sum of ``gaps[:i + 1]`` and its latency counts from that scheduled arrival, so a send
    the client itself delays is billed too (an open loop). Returns (start on the monotonic clock, one result
    per request)."""
    from pytriton.client import ModelClient

    local = threading.local()
    ready = threading.Barrier(workers + 1)

    def connect() -> None:  # each worker thread, once
        local.client = ModelClient(url, "trt-latency", init_timeout_s=60, inference_timeout_s=120)
        local.client.wait_for_model(60)

    results: list[dict[str, Any]] = [{} for _ in prompts]
    sends: list[float] = []

    def one(i: int) -> None:
        delay = sends[i] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t0 = sends[i]
        try:
            out = local.client.infer_sample(input_ids=prompts[i], max_tokens=np.asarray([osl], np.int32),
                                            slo_ms=np.asarray([0.0], np.float32), ignore_eos=np.asarray([True]))
            why = bytes(out["rejected"][0]).decode()
            if why:  # rejected at admission: an answer with the reason
                results[i] = {"ok": False, "latency_ms": (time.monotonic() - t0) * 1e3, "rejected": why}
            else:
                results[i] = {"ok": True, "latency_ms": (time.monotonic() - t0) * 1e3,
                              "tokens": out["output_ids"].tolist(), "server_total_ms": float(out["total_ms"][0])}
        except Exception as exc:  # noqa: BLE001 - any other failure is kept and counted
            results[i] = {"ok": False, "latency_ms": (time.monotonic() - t0) * 1e3, "error": str(exc)}

    with ThreadPoolExecutor(max_workers=workers, initializer=connect) as pool:
        for _ in range(workers):  # every worker started (and connected) before the first send
            pool.submit(ready.wait)
        ready.wait()
        start = time.monotonic() + 0.5
        sends.extend(float(t) for t in start + np.cumsum(gaps))
        for i in range(len(prompts)):
            pool.submit(one, i)
    return start, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cal", type=Path, required=True, help="calibration directory (calibration.yaml, model.onnx)")
    p.add_argument("--admission", default="trt-latency", choices=("trt-latency", "none", "seed-1.3"))
    p.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals per second")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--isl", type=int, default=32)
    p.add_argument("--osl", type=int, default=32)
    p.add_argument("--slo-ms", type=float, default=180.0, help="total SLO per request, from arrival (ms)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--instances", type=int, default=32, help="Triton model instances (requests in flight)")
    p.add_argument("--client-threads", type=int, default=32, help="the client's threads and connections "
                   "(requests it can hold open at once; at least the server's instances)")
    p.add_argument("--check", type=int, default=4, help="requests whose tokens are checked against the runner")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = p.parse_args(argv)

    from pytriton.client import ModelClient
    from pytriton.triton import Triton, TritonConfig

    from trt_latency.cli.serve import make_context
    from trt_latency.engines.ort.runner import OrtRunner
    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.serving import loadgen
    from trt_latency.serving.http_app import Slo
    from trt_latency.serving.triton_front import TritonFront, bind

    cal = load_calibration(args.cal / "calibration.yaml")
    model = args.cal / "model.onnx"
    runner = OrtRunner(model, "cpu", intra_op_threads=1, huge_pages=False)
    ctx = make_context(runner, cal, loadgen.served_key(model, cal), admission=args.admission,
                       max_batch=args.max_batch, model_name="trt-latency",
                       slo=Slo(args.slo_ms, math.inf, "server --slo-ms"))
    front = TritonFront(ctx)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, ctx.vocab, args.isl).astype(np.int64) for _ in range(args.requests)]
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    url = f"localhost:{args.port}"
    tcfg = TritonConfig(http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2)
    with Triton(config=tcfg) as triton:
        bind(triton, front, model_name="trt-latency", instances=args.instances)
        triton.run()
        with ModelClient(url, "trt-latency", init_timeout_s=60) as warm:  # one request before the clock starts
            warm.infer_sample(input_ids=prompts[0][:4], max_tokens=np.asarray([2], np.int32),
                              slo_ms=np.asarray([0.0], np.float32), ignore_eos=np.asarray([True]))
        # the client in a process of its own: in this one it took the GIL from the engine thread and the
        # handlers (the first runs, serve_goodput.md), which no outside client does
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as proc:
            start, results = proc.submit(client_run, url, prompts, [float(g) for g in gaps], args.osl,
                                         args.client_threads).result()
        wall = time.monotonic() - start
    ctx.engine.stop(drain=True, timeout=30)
    with OrtRunner(model, "cpu", intra_op_threads=1, huge_pages=False) as ref:
        checked = [i for i, r in enumerate(results) if r.get("ok")][: args.check]
        same = all(results[i]["tokens"] == ref.generate(prompts[i][None, :], args.osl).tokens for i in checked)
    runner.close()

    done = [r for r in results if r.get("ok")]
    rejected = [r for r in results if "rejected" in r]
    failed = [r for r in results if "error" in r]
    late = [r for r in done if r["latency_ms"] > args.slo_ms]
    lat = [r["latency_ms"] for r in done]
    decide = ctx.admission.metrics.decide_ns.summary()
    summary = {
        "admission": args.admission, "rate": args.rate, "requests": args.requests, "slo_ms": args.slo_ms,
        "wall_s": round(wall, 2), "completed": len(done), "rejected_at_admission": len(rejected),
        "failed": len(failed), "late_among_completed": len(late),
        "goodput_rps": round((len(done) - len(late)) / wall, 2),
        "client_threads": args.client_threads, "instances": args.instances,
        "client_latency_ms": {"p50": round(percentile(lat, 50), 1), "p99": round(percentile(lat, 99), 1)},
        "decision_ns_in_server": decide, "tokens_checked_against_runner": len(checked), "tokens_identical": same,
        "example_reject": rejected[0]["rejected"][:300] if rejected else None,
        "example_failure": failed[0]["error"][:300] if failed else None,
        "controller": ctx.admission.controller.counters() if ctx.admission.controller is not None else None,
        "decisions": {f"{s.labels['outcome']}: {s.labels['reason']}": int(s.value)
                      for metric in ctx.admission.metrics.decisions.collect() for s in metric.samples
                      if s.name.endswith("_total")},
        "delivery_lag_ms": ctx.admission.metrics.delivery_lag_ms.summary(),
    }
    text = json.dumps(summary, indent=1, default=float)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    if failed:
        print(f"{len(failed)} requests failed outside admission (see example_failure)")
    return 0 if same and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
