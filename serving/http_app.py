"""The HTTP side of ``trt-latency serve``: OpenAI-compatible completions (FastAPI, imported lazily), admission
at arrival, and the engine events that keep the admission state and the metrics.

Who owns what:
- the asyncio event loop (handlers): parses a request, decides on arrival (``ServeAdmission.decide``: the
  compiled ``BatchAdmissionController.decide``, a few hundred ns, never blocking), then either answers 429
  at once or reserves the request's place in the controller's batch (``started``) and submits it to the
  engine; tokens come back through an asyncio.Queue fed by ``call_soon_threadsafe``;
- the engine thread (serving/engine_loop.py): prefill and batched decode steps; it calls this module's
  ``ServeAdmission`` listener: ``stepped`` -> the controller's ``step`` / ``token`` events, ``finished``
  -> ``finished(rid, actual, predicted)`` (the online correction) and the metrics.

Why ``started`` at admission rather than after prefill: the engine prefills an admitted request in its next
iteration (a slot is reserved for it: the controller's max_batch equals the engine's slots), and a burst of
arrivals between two iterations must each see the ones admitted before it, else all of them would be
priced against the same batch.

Admission modes: ``trt-latency`` (batch-aware, protect, the online conformal factor for alpha), ``none``
(admit everything; requests queue for a slot) and ``seed-1.3`` (the seed's practice as serving/batchload.py
defines it: one constant ms/token = the single-request step at the longest KV served x 1.3; admit iff
prefill + (n - 1) x rate fits the budget).
"""


import asyncio
import itertools
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from trt_latency.serving.batch_reference import PROBE_REASON
from trt_latency.serving.engine_loop import EngineLoop, GenRequest, Listener
from trt_latency.serving.metrics import ServeMetrics

ADMISSION_MODES = ("trt-latency", "none", "seed-1.3")
SEED_FACTOR = 1.3  # the seed's safety factor (serving/batchload.seed_rate_ms, serving/compare.py)


class BadField(ValueError):
    """A 400: the field and what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Slo:
    total_ms: float  # budget for the whole request from arrival (inf: none)
    ttft_ms: float  # budget for the first token (inf: none)
    source: str
    tpot_ms: float | None = None  # a server default: the total is ttft + tpot x (max_tokens - 1) per request


@dataclass
class Verdict:
    admit: bool
    reason: str
    predicted_ms: float
    predicted_ttft_ms: float
    budget_ms: float
    max_tokens_that_fit: int
    decide_ns: int
    full: bool = False  # rejected only because every KV slot is held: the handler may wait for one


class ServeAdmission(Listener):
    """Admission at arrival plus the engine events that keep its state (see the module docstring)."""

    def __init__(self, mode: str, estimator: Any, controller: Any, metrics: ServeMetrics, seed_rate_ms: float,
                 engine: EngineLoop | None = None) -> None:
        if mode not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, got {mode!r}")
        self.mode = mode
        self.est = estimator
        self.controller = controller
        self.metrics = metrics
        self.seed_rate_ms = seed_rate_ms
        self.engine = engine
        self.on_finished: Any = None  # called on the engine thread when a request ends (wakes slot waiters)
        # TTFT from the decision as the handler hands the first token on, minus its predicted prefill: what
        # the batch model does not price before a first token (the engine's step in progress, other prefills
        # queued, the event loop's lag). Its split-conformal quantile for alpha is added to the predicted TTFT.
        # (perf_counter ms, residual); past the controller's horizon they expire as its scores do, so a reserve
        # fitted in a bad minute does not reject every request for good (the probes feed new residuals)
        self._ttft_residuals: deque[tuple[float, float]] = deque(maxlen=300)
        self.ttft_reserve_ms: float | None = None
        # rid -> the model's own predicted total (the decision's, over the factor it was scaled by: what the
        # controller's scores are against) and TTFT (ms from the decision), the SLO asked (from arrival), the
        # decision time (s)
        self._pending: dict[Any, tuple[float, float, Slo, float]] = {}

    def decide(self, rid: Any, prompt: int, max_tokens: int, slo: Slo, elapsed_ms: float = 0.0,
               record: bool = True) -> Verdict:
        """The decision (the handler's thread: the event loop), ``elapsed_ms`` after arrival: the budgets are
        what is left of the SLO. Timed: the decision call only. ``record``: count it in the metrics (a
        full-batch reject the handler will retry is not a final outcome)."""
        asked, budget = slo, slo.total_ms - elapsed_ms
        slo = Slo(budget, slo.ttft_ms - elapsed_ms, slo.source, slo.tpot_ms)
        full = False
        if self.mode == "trt-latency":
            # The controller's clock (perf_counter ms) read here: the compiled decide then runs without a
            # Python frame, so no GIL hand-off to the engine thread can land inside the timed call.
            now = time.perf_counter() * 1e3
            t0 = time.perf_counter_ns()
            d = self.controller.decide(rid, prompt, max_tokens, budget if math.isfinite(budget) else 1e12,
                                       now, True)
            ns = time.perf_counter_ns() - t0
            admit, reason, pred, fit = bool(d.admit), str(d.reason), float(d.predicted_ms), int(d.max_new_tokens)
            # the model's own total: the controller scores actual / this (a score against the scaled total
            # would feed the factor back into itself: its fixed point would be the square root of the bias)
            unscaled = pred / self.controller.last_factor
            if reason == PROBE_REASON:  # admitted at factor 1 to observe again: its TTFT is checked unscaled too
                ttft = float(self.est.ttft_ms(prompt))
            else:
                ttft = self.predicted_ttft(prompt, self.controller.running() + 1)  # in the batch it would join
            full = not admit and reason.startswith("batch full")
            if admit and ttft > slo.ttft_ms:
                admit, reason = False, "predicted TTFT (prefill x factor, or + the online TTFT reserve) over the " \
                    "TTFT budget"
        elif self.mode == "seed-1.3":
            t0 = time.perf_counter_ns()
            ttft = self.est.prefill_ms(prompt)
            pred = unscaled = ttft + (max_tokens - 1) * self.seed_rate_ms
            admit = pred <= budget and ttft <= slo.ttft_ms
            ns = time.perf_counter_ns() - t0
            fit = max(0, int((budget - ttft) // self.seed_rate_ms) + 1) if math.isfinite(budget) else max_tokens
            reason = "fits the budget at the seed's constant rate" if admit else \
                "over budget at the seed's constant rate (1.3 x the step at the longest KV)"
        else:
            t0 = time.perf_counter_ns()
            admit, reason, pred, ttft, fit = True, "admission off", math.nan, math.nan, max_tokens
            unscaled = pred
            ns = time.perf_counter_ns() - t0
        self.metrics.decide_ns.add(ns)
        self.metrics.decision_ns.observe(ns)
        if record or admit:
            self.metrics.decisions.labels(outcome="admit" if admit else "reject", reason=reason).inc()
        if admit:
            self._pending[rid] = (unscaled, ttft, asked, time.perf_counter())
            if self.controller is not None and self.mode == "trt-latency":
                # model_ms: a regular admission's predicted miss chance spends the level's risk budget
                self.controller.started(rid, prompt, max_tokens, budget if math.isfinite(budget) else 1e12,
                                        model_ms=None if reason == PROBE_REASON else unscaled)
            if math.isfinite(pred):
                self.metrics.predicted_total.observe(pred)
                self.metrics.predicted_ttft.observe(ttft)
        return Verdict(admit, reason, pred, ttft, budget, fit, ns, full)

    def predicted_ttft(self, prompt: int, batch: int) -> float:
        """trt-latency's TTFT from the decision: the prefill (+ o_p) plus the online TTFT reserve; until there
        are enough residuals for it, the prefill x the factor of the batch it joins."""
        reserve = self.ttft_reserve_ms
        if reserve is not None:
            return float(self.est.ttft_ms(prompt)) + reserve
        return float(self.est.ttft_ms(prompt)) * self.controller.base_factor * self.controller.correction(batch)

    def fits_alone(self, prompt: int, max_tokens: int, slo: Slo, elapsed_ms: float) -> bool:
        """Could the request still meet its SLO if a slot freed now and it ran alone? (Worth waiting for.)"""
        factor = self.controller.base_factor * self.controller.correction(1)
        alone = self.est.total_with([], prompt, max_tokens) * factor
        return alone <= slo.total_ms - elapsed_ms and self.predicted_ttft(prompt, 1) <= slo.ttft_ms - elapsed_ms

    def slot_wait_s(self, prompt: int, max_tokens: int, slo: Slo, t_arrival: float, unbounded_s: float) -> float | None:
        """After a reject only because every KV slot is held: how long (s) to wait for a slot before deciding
        again on what is left of the budget, or None when the request could no longer meet its SLO alone (the
        reject stands). ``unbounded_s``: the wait without a total SLO. Both front ends' rule (`serve`'s
        handler, serving/triton_front.py), as the batched load test's trt-latency policy does it."""
        elapsed = (time.perf_counter() - t_arrival) * 1e3
        if not self.fits_alone(prompt, max_tokens, slo, elapsed):
            return None
        return max((slo.total_ms - elapsed) / 1e3, 0.001) if math.isfinite(slo.total_ms) else unbounded_s

    def _observe_ttft(self, residual_ms: float) -> None:
        """Engine thread: one TTFT residual; the reserve is their conformal quantile once there are enough."""
        from trt_latency.serving.conformal import backed_level, conformal_factor, min_requests_for

        if self.controller is None or self.controller.alpha is None or not math.isfinite(residual_ms):
            return
        now = time.perf_counter() * 1e3
        res = self._ttft_residuals
        res.append((now, residual_ms))
        while res and res[0][0] < now - self.controller.horizon_ms:
            res.popleft()
        if len(res) >= min_requests_for(self.controller.alpha):  # at the controller's level (alpha or adapted)
            level = backed_level(len(res), self.controller.level)
            self.ttft_reserve_ms = max(conformal_factor([v for _, v in res], level), 0.0)
        else:  # too few within the horizon: the start-up rule (prefill x the factor)
            self.ttft_reserve_ms = None

    def record_reject(self, v: Verdict) -> None:
        self.metrics.decisions.labels(outcome="reject", reason=v.reason).inc()

    # -- engine thread -----------------------------------------------------------------------------------
    def prefilled(self, req: GenRequest) -> None:
        self._gauges()

    def stepped(self, reqs: list[GenRequest]) -> None:
        self.metrics.steps.inc()
        c = self.controller
        if c is not None and self.mode == "trt-latency":
            if len(reqs) == c.running():
                c.step()
            else:  # admitted requests still waiting for their prefill took no step
                for r in reqs:
                    c.token(r.rid)
        self._gauges()

    def finished(self, req: GenRequest) -> None:
        pred, _, slo, t_decided = self._pending.pop(req.rid, (math.nan, math.nan, Slo(math.inf, math.inf, "none"),
                                                               req.arrival))
        total, ttft = req.total_ms, req.ttft_ms
        ok = req.completed
        req.slo = slo  # judged late or on time when the front end delivers it (``delivered``)
        if self.controller is not None and self.mode == "trt-latency":
            since = (req.finished_at - t_decided) * 1e3 if ok else None  # type: ignore[operator]
            self.controller.finished(req.rid, since, pred if ok else None)
            self.metrics.set_factors(self.controller.counters())
            first = req.first_out_at
            if ok and first is not None:
                self._observe_ttft((first - t_decided) * 1e3 - self.est.ttft_ms(len(req.prompt)))
        if self.on_finished is not None:
            self.on_finished()
        m = self.metrics
        m.finished.labels(finish_reason=req.finish_reason).inc()
        m.tokens.inc(len(req.tokens))
        if ok and total is not None and ttft is not None:
            m.observed_total.observe(total)
            m.observed_ttft.observe(ttft)
        self._gauges()

    def delivered(self, req: GenRequest) -> None:
        """A front end handed a completed response's end to its server (its event loop, or Triton's thread):
        the request is late or on time as its client sees it, against the SLO asked (from arrival, TTFT as
        delivered). The engine's own clock misses the lag between its last token and this hand-off (p50 1.1,
        p99 5-6 ms under aiperf at 2x, on 2 shared cores), and requests near their deadline are lost in it:
        the server counted 6 late where aiperf counted 9 of 227. The lag itself goes to the metrics; the
        outcome to the controller's observed level (trt-latency) and the SLO counters."""
        now = time.perf_counter()
        if not req.completed:
            return
        lag = (now - req.finished_at) * 1e3
        self.metrics.delivery_lag.observe(lag)
        self.metrics.delivery_lag_ms.add(lag)
        slo = req.slo if req.slo is not None else Slo(math.inf, math.inf, "none")
        first = req.first_out_at
        met = ((now - req.arrival) * 1e3 <= slo.total_ms
               and first is not None and (first - req.arrival) * 1e3 <= slo.ttft_ms)
        (self.metrics.slo_met if met else self.metrics.slo_violations).inc()
        if self.controller is not None and self.mode == "trt-latency":
            self.controller.outcome(late=not met)
            self.metrics.set_factors(self.controller.counters())

    def _gauges(self) -> None:
        if self.engine is not None:
            self.metrics.running.set(self.engine.running())
            self.metrics.queue.set(self.engine.queued())


@dataclass
class ServeContext:
    """Everything the app needs, built by the CLI (or a test)."""

    engine: EngineLoop
    admission: ServeAdmission
    model_name: str
    max_prompt: int
    max_len: int  # KV positions a request may fill: prompt + max_tokens - 1 <= max_len
    vocab: int
    tokenizer: Any = None  # a tokenizers.Tokenizer, or None (prompts as token ids only)
    default_slo: Slo = Slo(math.inf, math.inf, "none")
    draining: bool = False
    info: str = ""
    slot_freed: Any = None  # asyncio.Event of the server's loop, set (and replaced) when a request ends

    def prompt_problem(self, ids: list[int]) -> str | None:
        """What is wrong with prompt token ``ids`` for this engine, or None: one rule for every front end
        (the HTTP handler and TritonFront name their own field)."""
        if not ids:
            return "empty (0 tokens)"
        if len(ids) > self.max_prompt:
            return f"{len(ids)} tokens, over the longest prefill ({self.max_prompt})"
        if min(ids) < 0 or max(ids) >= self.vocab:
            return f"token ids must be in [0, {self.vocab})"
        return None

    def max_tokens_limit(self, prompt_tokens: int) -> int:
        """The most tokens a request of ``prompt_tokens`` may ask for: prompt + max_tokens - 1 <= max_len."""
        return self.max_len + 1 - prompt_tokens


def _slo(body: Mapping[str, Any], headers: Mapping[str, str], default: Slo, max_tokens: int) -> Slo:
    """Body ``slo_ms`` or ``ttft_slo_ms`` + ``tpot_slo_ms``, then the ``x-slo-ms`` header, then the server's."""

    def num(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise BadField(name, f"field '{name}': expected a number of ms > 0, got {value!r}")
        return float(value)

    ttft = tpot = None
    if "ttft_slo_ms" in body or "tpot_slo_ms" in body:
        if "ttft_slo_ms" not in body or "tpot_slo_ms" not in body:
            raise BadField("ttft_slo_ms", "fields 'ttft_slo_ms' and 'tpot_slo_ms': expected both or neither")
        ttft, tpot = num("ttft_slo_ms", body["ttft_slo_ms"]), num("tpot_slo_ms", body["tpot_slo_ms"])
    if "slo_ms" in body:
        return Slo(num("slo_ms", body["slo_ms"]), ttft if ttft is not None else math.inf, "body slo_ms")
    if ttft is not None and tpot is not None:
        return Slo(ttft + tpot * (max_tokens - 1), ttft, "body ttft_slo_ms + tpot_slo_ms")
    if "x-slo-ms" in headers:
        try:
            value = float(headers["x-slo-ms"])
        except ValueError:
            raise BadField("x-slo-ms", f"header 'x-slo-ms': expected a number of ms, got {headers['x-slo-ms']!r}") \
                from None
        return Slo(num("x-slo-ms", value), math.inf, "header x-slo-ms")
    if default.tpot_ms is not None:
        return Slo(default.ttft_ms + default.tpot_ms * (max_tokens - 1), default.ttft_ms, default.source)
    return default


def _int_field(body: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(name, f"field '{name}': expected an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise BadField(name, f"field '{name}': expected an integer in [{lo}, {hi}], got {value}")
    return value


def parse_completion(ctx: ServeContext, raw: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """The request body -> prompt ids and options; BadField names the field on anything malformed."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadField("body", f"request body: expected a JSON object ({exc})") from None
    if not isinstance(body, dict):
        raise BadField("body", f"request body: expected a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != ctx.model_name:
        raise BadField("model", f"field 'model': unknown model {model!r}; this server serves {ctx.model_name!r}")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt, as OpenAI clients send it
    if isinstance(prompt, str):
        if ctx.tokenizer is None:
            raise BadField("prompt", "field 'prompt': this server has no tokenizer (--tokenizer DIR); "
                                     "send token ids")
        ids = list(ctx.tokenizer.encode(prompt, add_special_tokens=False).ids)
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        ids = list(prompt)
    else:
        raise BadField("prompt", "field 'prompt': expected a string or a list of token ids")
    problem = ctx.prompt_problem(ids)
    if problem is not None:
        raise BadField("prompt", f"field 'prompt': {problem}")
    hi = ctx.max_tokens_limit(len(ids))
    name = "max_tokens" if "max_tokens" in body or "max_completion_tokens" not in body else "max_completion_tokens"
    max_tokens = _int_field(body, name, min(16, hi), 1, hi)
    min_tokens = _int_field(body, "min_tokens", 0, 0, max_tokens)
    stream, ignore_eos = body.get("stream", False), body.get("ignore_eos", False)
    for name, value in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(value, bool):
            raise BadField(name, f"field '{name}': expected true or false, got {value!r}")
    slo = _slo(body, headers, ctx.default_slo, max_tokens)
    return {"ids": ids, "max_tokens": max_tokens, "min_tokens": min_tokens, "stream": stream,
            "ignore_eos": ignore_eos, "slo": slo}


class _Detok:
    """Incremental detokenization: the text a token adds. A delta ending in a partial UTF-8 character is held
    back for up to 3 more tokens (a character is at most 4 bytes), then sent as is. Special tokens are
    skipped, except when the client asked for ``ignore_eos`` (a benchmark's fixed length: every token
    streams as text, an EOS included)."""

    def __init__(self, tokenizer: Any, skip_special: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special
        self.ids: list[int] = []
        self.sent = 0
        self.held = 0

    def add(self, token: int) -> str:
        if self.tok is None:
            return ""
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd") and self.held < 3:
            self.held += 1
            return ""
        delta, self.sent, self.held = text[self.sent:], len(text), 0
        return str(delta)


def create_app(ctx: ServeContext) -> Any:
    """The FastAPI app over ``ctx`` (fastapi imported here: the serve extra)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="trt-latency serve")
    app.state.ctx = ctx
    ids = itertools.count(1)
    m = ctx.admission.metrics

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
              extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}, **(extra or {})}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health")
    async def health() -> Any:
        if ctx.draining or not ctx.engine.alive:
            return JSONResponse({"status": "draining" if ctx.draining else "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "owned_by": "trt-latency"}]}

    @app.get("/metrics")
    async def metrics() -> Any:
        data, ctype = m.render()
        return Response(data, media_type=ctype)

    @app.get("/stats")
    async def stats() -> Any:
        c = ctx.admission.controller
        return {"admission": ctx.admission.mode, "decide_ns": m.decide_ns.summary(),
                "handler_ms_to_decision": m.round_trip_ms.summary(),
                "delivery_lag_ms": m.delivery_lag_ms.summary(), "running": ctx.engine.running(),
                "queued": ctx.engine.queued(), "decode_steps": ctx.engine.steps, "engine": ctx.info,
                "ttft_reserve_ms": ctx.admission.ttft_reserve_ms,
                "controller": c.counters() if c is not None else None}

    loop_box: list[asyncio.AbstractEventLoop] = []

    def notify_slot_freed() -> None:  # the engine thread, when a request ends
        if loop_box:
            loop_box[0].call_soon_threadsafe(_wake)

    def _wake() -> None:
        event, ctx.slot_freed = ctx.slot_freed, asyncio.Event()
        if event is not None:
            event.set()

    ctx.admission.on_finished = notify_slot_freed

    async def admit_or_wait(rid: int, req: dict[str, Any], t_arrival: float) -> Verdict:
        """Decide at arrival; when the only obstacle is a full batch and the request could still meet its
        SLO alone, wait for a slot to free and decide again with what is left of the budget (as the
        batched load test's trt-latency policy: serving/batchload.py). Bounded by the request's budget."""
        if not loop_box:
            loop_box.append(asyncio.get_running_loop())
        prompt, n, slo = len(req["ids"]), req["max_tokens"], req["slo"]
        v = ctx.admission.decide(rid, prompt, n, slo, record=False)
        m.round_trip_ms.add((time.perf_counter() - t_arrival) * 1e3)
        while v.full and not ctx.draining:
            wait_s = ctx.admission.slot_wait_s(prompt, n, slo, t_arrival, unbounded_s=60.0)
            if wait_s is None:
                break
            if ctx.slot_freed is None:
                ctx.slot_freed = asyncio.Event()
            try:
                await asyncio.wait_for(ctx.slot_freed.wait(), timeout=wait_s)
            except TimeoutError:
                pass
            v = ctx.admission.decide(rid, prompt, n, slo, (time.perf_counter() - t_arrival) * 1e3, record=False)
        if not v.admit:
            ctx.admission.record_reject(v)
        return v

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        t_arrival = time.perf_counter()
        if ctx.draining:
            m.unavailable.inc()
            return error(503, "the server is draining (SIGTERM): not admitting", kind="unavailable")
        try:
            req = parse_completion(ctx, await request.body(), request.headers)
        except BadField as exc:
            m.bad_requests.labels(field=exc.field).inc()
            return error(400, str(exc), param=exc.field)
        rid = next(ids)
        v = await admit_or_wait(rid, req, t_arrival)
        if not v.admit:
            retry = max(1, math.ceil((v.predicted_ms - v.budget_ms) / 1e3)) if math.isfinite(v.predicted_ms) else 1
            extra = {"reason": v.reason, "predicted_ms": _num(v.predicted_ms), "budget_ms": _num(v.budget_ms),
                     "max_tokens_that_fit": v.max_tokens_that_fit, "slo_source": req["slo"].source}
            return error(429, f"rejected at admission: {v.reason}", kind="rate_limit_exceeded", extra=extra,
                         headers={"Retry-After": str(retry)})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def sink(ev: tuple[str, Any]) -> None:  # engine thread -> this handler's loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is closed (server gone): nobody is listening
                pass

        g = GenRequest(rid, req["ids"], req["max_tokens"], sink, min_tokens=req["min_tokens"],
                       ignore_eos=req["ignore_eos"], arrival=t_arrival)
        ctx.engine.submit(g)
        created, cid = int(time.time()), f"cmpl-{rid}"
        detok = _Detok(ctx.tokenizer, skip_special=not req["ignore_eos"])

        def usage() -> dict[str, int]:
            n = len(g.tokens)
            return {"prompt_tokens": len(req["ids"]), "completion_tokens": n, "total_tokens": len(req["ids"]) + n}

        def chunk(text: str, token: int | None, finish: str | None) -> str:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                      "token_ids": [token] if token is not None else []}
            body = {"id": cid, "object": "text_completion", "created": created, "model": ctx.model_name,
                    "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        if req["stream"]:
            async def stream() -> AsyncIterator[str]:
                done = False
                try:
                    while True:
                        kind, value = await events.get()
                        if kind == "token":
                            if g.first_delivered_at is None:
                                g.first_delivered_at = time.perf_counter()
                            yield chunk(detok.add(value), value, None)
                        elif kind == "done":
                            done = True
                            yield chunk("", None, value)
                            tail = {"id": cid, "object": "text_completion", "created": created,
                                    "model": ctx.model_name, "choices": [], "usage": usage()}
                            yield f"data: {json.dumps(tail)}\n\ndata: [DONE]\n\n"
                            ctx.admission.delivered(g)  # resumed after the server took the last chunk
                            return
                        else:
                            done = True
                            yield f"data: {json.dumps({'error': {'message': value, 'type': 'engine_error'}})}\n\n"
                            return
                finally:
                    if not done:  # the client went away mid-stream: free its slot
                        g.cancelled = True

            return StreamingResponse(stream(), media_type="text/event-stream")

        text, finish = [], "length"
        try:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    text.append(detok.add(value))
                elif kind == "done":
                    finish = value
                    break
                else:
                    return error(500, value, kind="engine_error")
        finally:
            if g.finish_reason == "":
                g.cancelled = True
        ctx.admission.delivered(g)
        return {"id": cid, "object": "text_completion", "created": created, "model": ctx.model_name,
                "choices": [{"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish,
                             "token_ids": list(g.tokens)}], "usage": usage()}

    return app


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
