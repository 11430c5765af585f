"""`trt-latency serve`: the calibrated decoder behind an OpenAI-compatible HTTP API, with SLO admission.

The verb opens the calibration and the runner (as loadtest does), wraps the runner in a slot decoder
(engines/ort/slots.py; engines/trt/slots.py for --engine), and hands it to the engine loop
(serving/engine_loop.py) and the app (serving/http_app.py). FastAPI, uvicorn, prometheus_client and
tokenizers are the ``serve`` extra, imported only here and in the modules this verb loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trt_latency.cli._model import add_model_args, backend_choices, model_options
from trt_latency.errors import InputError

EXTRA = ("fastapi", "uvicorn", "prometheus_client", "tokenizers")
EPILOG = """\
example:
  trt-latency calibrate --quick --out cal
  trt-latency serve -c cal/calibration.yaml --port 8000 --slo-ms 500 --tokenizer tests/data/serve
  curl -N localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"prompt": "def main():", "max_tokens": 16, "stream": true}'
  curl localhost:8000/v1/completions -H 'x-slo-ms: 0.5' -d '{"prompt": [1, 2, 3], "max_tokens": 64}'  # 429

SLO per request: body slo_ms (total from arrival), or ttft_slo_ms + tpot_slo_ms; then the x-slo-ms header;
then --slo-ms / --ttft-slo-ms + --tpot-slo-ms. A rejected request gets 429 with reason, predicted_ms,
budget_ms and max_tokens_that_fit, and Retry-After. GET /metrics (Prometheus), /stats (decision cost
p50/p99 ns), /health, /v1/models. SIGTERM: 503 for new requests, running ones finish, exit 0.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the calibrated decoder over an OpenAI-compatible API with SLO admission",
                       description="OpenAI-compatible completions (streaming SSE and not) over the calibrated "
                       "engine: one engine thread with in-flight batching, admission at arrival by the "
                       "batch-aware controller, Prometheus metrics.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--calibration", required=True, metavar="CAL", help="calibration.yaml")
    p.add_argument("--onnx", metavar="F", help="model to serve (default: model.onnx next to CAL)")
    p.add_argument("--engine", metavar="PLAN", help="serve this serialized TensorRT engine instead of an ONNX "
                   "model (backend tensorrt, one request at a time: its runner is batch 1; needs the tensorrt "
                   "package and a CUDA GPU)")
    p.add_argument("--backend", default="ort-cpu", help="runner backend (default ort-cpu; names: "
                   + ", ".join(backend_choices()) + ")")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the plan's)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: an ephemeral port (printed at start)")
    p.add_argument("--admission", choices=("trt-latency", "none", "seed-1.3"), default="trt-latency")
    p.add_argument("--alpha", type=float, default=0.05, help="violation level of the admission (default 0.05)")
    p.add_argument("--loop-terms", choices=("calibration", "none"), default="calibration",
                   help="trt-latency admission prices the serving loop's own cost per step (o), after a prefill "
                   "(c) and on the prefill (o_p) from the calibration's serving_loop (default), or the engine "
                   "call alone (none: the online factor then has to carry that overhead)")
    p.add_argument("--score-horizon-s", type=float, default=30.0,
                   help="trt-latency admission: the online factor's scores expire after this many seconds "
                   "(default 30; 0: never); with too few left it falls back to the calibration's factor")
    p.add_argument("--probe-interval-ms", type=float, default=1000.0,
                   help="trt-latency admission: into an empty batch with nothing admitted for this long, admit "
                   "one request the factor rejects but the model alone fits, so the factor observes again "
                   "(default 1000; 0: no probes)")
    p.add_argument("--factor-max", type=float, default=8.0,
                   help="trt-latency admission: the online factor's upper clamp, per batch bucket (default 8: the "
                   "server may run 8x slower than its model before the factor stops following; under 2x overload "
                   "the request handlers' share of the GIL took it past 4, the old clamp. The probes and the score "
                   "horizon reopen a controller the clamp shut)")
    p.add_argument("--warm-up-steps", type=int, default=16, metavar="N",
                   help="before serving, every KV slot prefilled and N batched decode steps, twice, untimed: a "
                   "fresh session's first batches run slower than later ones, and the admission's online factor "
                   "would learn from them (default 16; 0: no warm-up)")
    p.add_argument("--alpha-step", type=float, default=0.05,
                   help="trt-latency admission: the online factor's quantile level spends a risk budget: each "
                   "admission moves it by STEP x (alpha - p), p the admitted request's predicted chance of missing "
                   "its SLO, between alpha and 0.5, so the admitted requests' mean predicted miss is alpha instead "
                   "of lying far under it at a light load (default 0.05; 0: the level stays alpha)")
    p.add_argument("--slo-ms", type=float, default=None, help="default total SLO from arrival (ms)")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="default TTFT SLO (ms)")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="default time per output token (ms); with "
                   "--ttft-slo-ms and no --slo-ms the total budget is ttft + tpot x (max_tokens - 1)")
    p.add_argument("--max-batch", type=int, default=8, help="KV slots = the largest running batch (default 8)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory with tokenizer.json (default: the model's directory, if it has one)")
    p.add_argument("--model-name", default=None, help="the id /v1/models lists (default: the model's directory name)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)


def _missing_extra() -> list[str]:
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def _usage(message: str) -> int:
    print(f"trt-latency serve: error: {message}", file=sys.stderr)
    return 2


def _tensorrt_missing() -> str | None:
    """Why a TensorRT engine cannot run here (the tensorrt package or a CUDA device is missing), else None."""
    from trt_latency.engines import cuda
    from trt_latency.engines.trt import loader
    from trt_latency.errors import BackendUnavailable

    try:
        loader.import_tensorrt()
        cuda.require_device(0)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def load_tokenizer(directory: str | Path) -> tuple[Any, int | None]:
    """(tokenizers.Tokenizer from DIR/tokenizer.json, the EOS id: tokenizer_config.json's eos_token, else
    <|endoftext|> / </s> when the vocabulary has one)."""
    from tokenizers import Tokenizer

    from trt_latency.errors import InputError

    d = Path(directory)
    path = d / "tokenizer.json" if d.is_dir() else d
    if not path.is_file():
        raise InputError("tokenizer not found", path=str(path), field="--tokenizer",
                         expected="a directory with tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    names = ["<|endoftext|>", "</s>"]
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            names.insert(0, eos)
    ids = [tok.token_to_id(n) for n in names]
    return tok, next((i for i in ids if i is not None), None)


def make_context(runner: Any, cal: Any, key: Any, *, admission: str = "trt-latency", alpha: float = 0.05,
                 max_batch: int = 8, tokenizer: Any = None, eos_id: int | None = None, model_name: str = "model",
                 slo: Any = None, loop_terms: bool = True, horizon_s: float | None = 30.0,
                 probe_interval_ms: float | None = 1000.0, factor_max: float = 8.0,
                 alpha_step: float = 0.05, warm_up_steps: int = 16) -> Any:
    """The engine loop (started), the admission and the app's context over an open runner.

    ``loop_terms``: the trt-latency controller's batch model prices the calibration's serving-loop terms
    (folded into its tables, so a decision costs the same); seed-1.3 stays the engine step x 1.3 (the
    baseline as defined). ``horizon_s`` / ``probe_interval_ms``: the controller's recovery from a factor that
    rejects everything (BatchAdmissionController; None: off). ``factor_max``: its upper clamp. ``alpha_step``:
    its adaptive level's step (0: the level stays alpha). ``warm_up_steps``: the engine's warm-up before it
    serves (EngineLoop.warm_up; 0: none), the same for every admission mode."""
    from trt_latency.engines.ort.slots import SlotDecoder
    from trt_latency.estimator.model import Estimator
    from trt_latency.serving.batch_admission import BatchAdmissionController, BatchEstimator
    from trt_latency.serving.engine_loop import EngineLoop
    from trt_latency.serving.http_app import SEED_FACTOR, ServeAdmission, ServeContext, Slo
    from trt_latency.serving.metrics import ServeMetrics

    decoder: Any
    if runner.backend == "tensorrt":
        from trt_latency.engines.trt.slots import TrtSlotDecoder

        # Each slot holds a full KV capacity on the GPU: no more slots than the decoder can batch.
        decoder = TrtSlotDecoder(runner, max_batch if TrtSlotDecoder.can_batch else 1)
    else:
        decoder = SlotDecoder(runner, max_batch)
    if not decoder.can_batch:  # batch 1: one request at a time (decoder.why says why, the start line shows it)
        decoder.slots, max_batch = decoder.slots[:1], 1
    est = BatchEstimator.from_estimator(Estimator(cal), *key, serving=loop_terms and admission == "trt-latency")
    controller = BatchAdmissionController(
        est, alpha=alpha, max_batch=max_batch, horizon_ms=None if horizon_s is None else horizon_s * 1e3,
        probe_interval_ms=probe_interval_ms, clamp=(0.5, factor_max),
        level_step=alpha_step) if admission == "trt-latency" else None
    metrics = ServeMetrics()
    seed_rate = SEED_FACTOR * est.step_ms([decoder.max_len])
    adm = ServeAdmission(admission, est, controller, metrics, seed_rate)
    engine = EngineLoop(decoder, eos_id=eos_id, listener=adm)
    adm.engine = engine
    warm = f"; warmed up in {engine.warm_up(warm_up_steps):.2f} s" if warm_up_steps > 0 else ""
    info = (f"{runner.backend} on {runner.device}, {max_batch} KV slots, {decoder.why}{warm}; admission {admission}"
            + (f" (alpha {alpha}" + (f", level adapted by step {alpha_step:g}" if alpha_step else "")
               + f", factor {controller.base_factor:.3g} from {controller.factor_source}; loop "
               "terms o {:.3g}, c0 {:.3g}, c1 {:.3g}, o_p {:.3g}, o_p1 {:.3g} ms)".format(*est.loop)
               if controller is not None else f" (seed rate {seed_rate:.3g} ms/token)" if admission == "seed-1.3"
               else ""))
    ctx = ServeContext(engine=engine, admission=adm, model_name=model_name, max_prompt=decoder.max_prompt,
                       max_len=decoder.max_len, vocab=decoder.vocab, tokenizer=tokenizer,
                       default_slo=slo if slo is not None else Slo(math.inf, math.inf, "none"), info=info)
    engine.start()
    return ctx


def _default_slo(args: argparse.Namespace) -> Any:
    from trt_latency.serving.http_app import Slo

    ttft = args.ttft_slo_ms if args.ttft_slo_ms is not None else math.inf
    if args.slo_ms is not None:
        return Slo(args.slo_ms, ttft, "server --slo-ms")
    if args.tpot_slo_ms is not None:
        return Slo(math.inf, ttft, "server --ttft-slo-ms + --tpot-slo-ms", tpot_ms=args.tpot_slo_ms)
    return Slo(math.inf, ttft, "server --ttft-slo-ms" if math.isfinite(ttft) else "none")


def run(args: argparse.Namespace) -> int:
    missing = _missing_extra()
    if missing:
        print(f"trt-latency serve: error: needs the serve extra (missing {', '.join(missing)}): "
              "pip install 'trt-latency[serve]'", file=sys.stderr)
        return 1
    if args.engine:
        if args.onnx:
            return _usage("--engine and --onnx: give one model to serve")
        if not Path(args.engine).is_file():  # the same answer with or without TensorRT on this machine
            raise InputError("file not found", path=args.engine, field="--engine",
                             expected="a serialized TensorRT engine")
        # Before the calibration and tokenizer are read: on a machine without TensorRT this is the answer.
        why = _tensorrt_missing()
        if why:
            return _usage("--engine: serving a TensorRT engine needs the tensorrt package and a CUDA GPU "
                          f"({why}); serve the ONNX model with --onnx")
    if args.max_batch < 1:
        return _usage("--max-batch must be >= 1")
    if not 0.0 < args.alpha < 1.0:
        return _usage("--alpha must be in (0, 1)")
    for flag, value in (("--score-horizon-s", args.score_horizon_s), ("--probe-interval-ms", args.probe_interval_ms)):
        if not math.isfinite(value) or value < 0:
            return _usage(f"{flag} must be a number >= 0 (0: off), got {value}")
    if args.warm_up_steps < 0:
        return _usage(f"--warm-up-steps must be >= 0 (0: no warm-up), got {args.warm_up_steps}")
    if not (math.isfinite(args.alpha_step) and 0.0 <= args.alpha_step <= 1.0):
        return _usage(f"--alpha-step must be a number in [0, 1] (0: off), got {args.alpha_step}")
    if not (math.isfinite(args.factor_max) and args.factor_max > 1.0):
        return _usage(f"--factor-max must be a number > 1, got {args.factor_max}")
    for name in ("slo_ms", "ttft_slo_ms", "tpot_slo_ms"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            return _usage(f"--{name.replace('_', '-')} must be a number of ms > 0")
    if args.tpot_slo_ms is not None and args.ttft_slo_ms is None:
        return _usage("--tpot-slo-ms needs --ttft-slo-ms")
    import uvicorn

    from trt_latency.estimator.calibration import load_calibration
    from trt_latency.serving import loadgen
    from trt_latency.serving.http_app import create_app

    cal_path = Path(args.calibration)
    cal = load_calibration(cal_path)
    model_path = Path(args.engine) if args.engine else loadgen.find_model(cal_path, args.onnx)
    backend = "tensorrt" if args.engine else args.backend  # as calibrate --engine opens it
    plan = loadgen.plan_of(cal)
    key = loadgen.served_key(model_path, cal)
    options = model_options(args)
    if options["kv_mode"] == "auto":
        options["kv_mode"] = str(cal.provenance.get("kv_mode") or "auto")
    threads = int(args.threads if args.threads is not None else plan.runtime.intra_op_threads)
    tok_dir = Path(args.tokenizer) if args.tokenizer else model_path.parent
    tokenizer, eos = load_tokenizer(tok_dir) if args.tokenizer or (tok_dir / "tokenizer.json").is_file() \
        else (None, None)
    runner = loadgen.open_model(model_path, backend, threads, **options, max_past_len=args.max_past_len,
                                huge_pages=plan.runtime.huge_pages)
    ctx = make_context(runner, cal, key, admission=args.admission, alpha=args.alpha, max_batch=args.max_batch,
                       tokenizer=tokenizer, eos_id=eos, model_name=args.model_name or model_path.parent.name,
                       slo=_default_slo(args), loop_terms=args.loop_terms == "calibration",
                       horizon_s=args.score_horizon_s or None, probe_interval_ms=args.probe_interval_ms or None,
                       factor_max=args.factor_max, alpha_step=args.alpha_step, warm_up_steps=args.warm_up_steps)
    app = create_app(ctx)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = _draining_server(uvicorn.Config(app, log_level=args.log_level, timeout_keep_alive=30), ctx)
    print(f"trt-latency serve: {ctx.model_name} ({ctx.info}); tokenizer "
          f"{'none (token ids only)' if tokenizer is None else tok_dir}", flush=True)
    print(f"trt-latency serve: listening on http://{args.host}:{port}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        ctx.engine.stop(drain=False, timeout=10)
        runner.close()
    if ctx.engine.error is not None:
        print(f"trt-latency serve: error: the engine failed: {ctx.engine.error}", file=sys.stderr)
        return 1
    print("trt-latency serve: drained, exiting", flush=True)
    return 0


def _draining_server(config: Any, ctx: Any) -> Any:
    """uvicorn's Server whose first SIGTERM / SIGINT drains: new requests get 503, the running ones finish,
    then the server exits (and the process with 0, not re-raising the signal). A second signal exits at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if ctx.draining:
                self.should_exit = self.force_exit = True
                return
            ctx.draining = True
            threading.Thread(target=self._drain, name="trt-latency-drain", daemon=True).start()

        def _drain(self, limit_s: float = 600.0) -> None:
            end = time.monotonic() + limit_s
            while not ctx.engine.idle() and time.monotonic() < end:
                time.sleep(0.02)
            self.should_exit = True

    return DrainingServer(config)
