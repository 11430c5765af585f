"""`trt-latency serve`'s loop behind NVIDIA Triton Inference Server, through nvidia-pytriton (issue 25, optional).

The same EngineLoop, ServeAdmission and BatchAdmissionController as `serve` (built by ``cli.serve.make_context``),
with Triton's HTTP / gRPC front end in place of FastAPI's:

- ``TritonFront`` is the per-request handler: decide at arrival (a full batch waits for a slot while the
  request could still meet its SLO alone, as in `serve`), submit to the engine loop, wait for the last token.
  A reject raises ``AdmissionRejected``: Triton answers the client with an error that carries the reason, the
  predicted and budget ms and the largest max_tokens that fits (JSON in the message). Bad input raises
  ``BadInput`` naming the field. It needs nothing from pytriton, so CI tests it on a real engine.
- ``bind`` puts it behind a pytriton ``Triton``: a reject is an answer there (output ``rejected``: the JSON of
  the reason, empty when admitted), not a Triton error, whose path through pytriton's proxy costs more than
  the engine under overload; Triton's own batching off (the engine loop batches in flight,
  iteration by iteration), ``instances`` model instances, so that many requests are in flight at once
  (pytriton calls each instance on its own thread, in this process).

pytriton is imported in ``bind`` only: it pins numpy < 2, so it lives in its own venv
(benchmarks/pytriton_serve.py says how). Its bundled Python-backend stub links the system libpython3.11:
with a pyenv Python, set LD_LIBRARY_PATH to ``sysconfig.get_config_var("LIBDIR")``.

Inputs (one request per call): ``input_ids`` int64 [n], ``max_tokens`` int32 [1], ``slo_ms`` float32 [1]
(<= 0: the server's default SLO), ``ignore_eos`` bool [1]. Outputs: ``output_ids`` int64 [k], ``ttft_ms`` and
``total_ms`` float32 [1] (from arrival at the handler), ``rejected`` bytes [1].
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from typing import Any

import numpy as np

from trt_latency.serving.engine_loop import GenRequest
from trt_latency.serving.http_app import ServeContext, Slo, Verdict

__all__ = ["AdmissionRejected", "BadInput", "TritonFront", "bind"]


class AdmissionRejected(Exception):
    """The admission said no: ``info`` has reason, predicted_ms, budget_ms, max_tokens_that_fit (the message is
    its JSON, which is what a Triton client sees)."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__("rejected at admission: " + json.dumps(info))
        self.info = info


class BadInput(ValueError):
    """A malformed request: the message names the input and what was expected."""


def _scalar(inputs: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = inputs.get(name)
    if value is None:
        if default is None:
            raise BadInput(f"input '{name}': missing")
        return default
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1:
        raise BadInput(f"input '{name}': expected one value, got {arr.size}")
    try:
        return kind(arr[0])
    except (TypeError, ValueError):
        raise BadInput(f"input '{name}': expected a {kind.__name__}") from None


class TritonFront:
    """The handler: ``front(input_ids=..., max_tokens=..., slo_ms=..., ignore_eos=...) -> outputs``, thread-safe."""

    def __init__(self, ctx: ServeContext, timeout_s: float = 120.0) -> None:
        self.ctx = ctx
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._freed = threading.Condition()
        # decide + started as one step: Triton calls the instances on many threads at once, and two decisions
        # between one decide and its started would both see the last free slot (`serve` decides on one event loop)
        self._deciding = threading.Lock()
        ctx.admission.on_finished = self._slot_freed  # engine thread, when a request ends

    def _slot_freed(self) -> None:
        with self._freed:
            self._freed.notify_all()

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        t_arrival = time.perf_counter()
        ids_in = inputs.get("input_ids")
        if ids_in is None:
            raise BadInput("input 'input_ids': missing")
        ids = [int(t) for t in np.asarray(ids_in).reshape(-1)]
        ctx = self.ctx
        problem = ctx.prompt_problem(ids)
        if problem is not None:
            raise BadInput(f"input 'input_ids': {problem}")
        n = _scalar(inputs, "max_tokens", int)
        if not 1 <= n <= ctx.max_tokens_limit(len(ids)):
            raise BadInput(f"input 'max_tokens': expected an integer in [1, {ctx.max_tokens_limit(len(ids))}] "
                           f"(prompt + max_tokens - 1 <= {ctx.max_len}), got {n}")
        slo_ms = _scalar(inputs, "slo_ms", float, default=0.0)
        if math.isnan(slo_ms):
            raise BadInput("input 'slo_ms': expected a number (<= 0: the server's default)")
        ignore_eos = _scalar(inputs, "ignore_eos", bool, default=False)
        slo = Slo(slo_ms, math.inf, "request slo_ms") if slo_ms > 0 else ctx.default_slo
        rid = next(self._ids)
        v = self._admit_or_wait(rid, len(ids), n, slo, t_arrival)
        if not v.admit:
            raise AdmissionRejected({"reason": v.reason, "predicted_ms": _finite(v.predicted_ms),
                                     "budget_ms": _finite(v.budget_ms), "max_tokens_that_fit": v.max_tokens_that_fit,
                                     "slo_source": slo.source})
        done = threading.Event()

        def sink(ev: tuple[str, Any]) -> None:  # engine thread
            if ev[0] == "token" and g.first_delivered_at is None:
                g.first_delivered_at = time.perf_counter()
            elif ev[0] in ("done", "error"):
                done.set()

        g = GenRequest(rid, ids, n, sink, ignore_eos=ignore_eos, arrival=t_arrival)
        ctx.engine.submit(g)
        if not done.wait(self.timeout_s):
            g.cancelled = True  # the engine frees its slot at its next iteration
            raise TimeoutError(f"request {rid}: no last token within {self.timeout_s} s")
        if g.finish_reason == "error":
            raise RuntimeError(f"request {rid}: the engine failed it")
        ctx.admission.delivered(g)  # this thread woke on the last token: Triton's path to the client follows
        return {"output_ids": np.asarray(g.tokens, dtype=np.int64),
                "ttft_ms": np.asarray([g.ttft_ms or math.nan], dtype=np.float32),
                "total_ms": np.asarray([g.total_ms or math.nan], dtype=np.float32)}

    def _admit_or_wait(self, rid: int, prompt: int, n: int, slo: Slo, t_arrival: float) -> Verdict:
        """`serve`'s rule: a reject only because every KV slot is held waits for a slot while the request could
        still meet its SLO alone, then decides again on what is left of its budget."""
        adm = self.ctx.admission
        with self._deciding:
            v = adm.decide(rid, prompt, n, slo, record=False)
        adm.metrics.round_trip_ms.add((time.perf_counter() - t_arrival) * 1e3)
        while v.full:
            wait_s = adm.slot_wait_s(prompt, n, slo, t_arrival, unbounded_s=self.timeout_s)
            if wait_s is None:
                break
            with self._freed:
                self._freed.wait(timeout=wait_s)
            with self._deciding:
                v = adm.decide(rid, prompt, n, slo, (time.perf_counter() - t_arrival) * 1e3, record=False)
        if not v.admit:
            adm.record_reject(v)
        return v


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def bind(triton: Any, front: TritonFront, model_name: str = "trt-latency", instances: int = 16) -> None:
    """Bind ``front`` to a pytriton ``Triton`` (not yet running) as ``model_name`` with ``instances`` instances."""
    from pytriton.model_config import ModelConfig, Tensor

    def one(req: Any) -> dict[str, np.ndarray]:
        try:
            return {**front(**{name: req[name] for name in req}), "rejected": np.asarray([b""], dtype=np.bytes_)}
        except AdmissionRejected as exc:  # an answer, not a Triton error: pytriton's error path (a traceback
            # through its proxy per reject) cost this 2-core machine more than the engine under overload
            return {"output_ids": np.zeros(0, dtype=np.int64), "ttft_ms": np.asarray([math.nan], np.float32),
                    "total_ms": np.asarray([math.nan], np.float32),
                    "rejected": np.asarray([json.dumps(exc.info).encode()], dtype=np.bytes_)}

    def infer(requests: Any) -> list[dict[str, np.ndarray]]:
        return [one(req) for req in requests]

    triton.bind(
        model_name=model_name, infer_func=[infer] * instances,
        inputs=[Tensor(name="input_ids", dtype=np.int64, shape=(-1,)),
                Tensor(name="max_tokens", dtype=np.int32, shape=(1,)),
                Tensor(name="slo_ms", dtype=np.float32, shape=(1,)),
                Tensor(name="ignore_eos", dtype=np.bool_, shape=(1,))],
        outputs=[Tensor(name="output_ids", dtype=np.int64, shape=(-1,)),
                 Tensor(name="ttft_ms", dtype=np.float32, shape=(1,)),
                 Tensor(name="total_ms", dtype=np.float32, shape=(1,)),
                 Tensor(name="rejected", dtype=np.bytes_, shape=(1,))],
        config=ModelConfig(batching=False), strict=True)
