"""The engine loop of ``trt-latency serve``: one thread, iteration-level (in-flight) batching over a decoder.

Each iteration (vLLM / TensorRT-LLM style): take new requests from a thread-safe queue, drop the ones whose
client went away, prefill waiting requests into free KV slots (each prefill its own engine call: it stalls
the batch, as the calibration's ``prefill_with_batch: separate`` says), then ONE batched decode step for
every running request. Tokens are greedy (argmax of the logits, in the decoder), each request stops at its
``max_tokens`` or at EOS (unless ``ignore_eos``, and never before ``min_tokens``).

The decoder is duck-typed (engines/ort/slots.SlotDecoder: ``acquire() / release(i) / free() / prefill(i,
ids) / decode([i...]) / can_batch / why``): serving/ never imports engines/ (the CLI opens the runner and
hands the decoder in). Requests talk back through their ``sink``, a callable the engine thread calls with
each event (the HTTP handler's sink hops onto its asyncio loop with ``call_soon_threadsafe``): nothing here
blocks an event loop. ``listener`` gets the admission events on the engine thread (``prefilled``,
``stepped``, ``finished``), which the server maps onto BatchAdmissionController's events and metrics.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineLoop", "GenRequest", "Listener"]


@dataclass(eq=False)
class GenRequest:
    """One request as the engine sees it. ``sink(event)`` is called on the engine thread with
    ``("token", id)`` per token, then ``("done", finish_reason)`` or ``("error", message)``."""

    rid: Any
    prompt: list[int]
    max_tokens: int
    sink: Callable[[tuple[str, Any]], None]
    min_tokens: int = 0
    ignore_eos: bool = False
    arrival: float = field(default_factory=time.perf_counter)  # s, the handler's clock at arrival
    cancelled: bool = False  # set by the handler (client gone): the engine frees the slot next iteration
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    first_token_at: float | None = None
    first_delivered_at: float | None = None  # s, set by the HTTP handler when it hands the first token on
    finished_at: float | None = None
    finish_reason: str = ""
    slo: Any = None  # the SLO it was admitted with (the admission's, for judging it when it is delivered)

    @property
    def completed(self) -> bool:
        """It ran to its end (EOS or max_tokens): not cancelled, not failed."""
        return self.finish_reason in ("stop", "length") and self.finished_at is not None

    @property
    def first_out_at(self) -> float | None:
        """When its first token went out: handed on by the front end, else emitted by the engine."""
        return self.first_delivered_at or self.first_token_at

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.arrival) * 1e3

    @property
    def total_ms(self) -> float | None:
        return None if self.finished_at is None else (self.finished_at - self.arrival) * 1e3


class Listener:
    """Engine events for admission and metrics (engine thread). The defaults do nothing."""

    def prefilled(self, req: GenRequest) -> None:
        """The request's prefill is done and its first token out."""

    def stepped(self, reqs: list[GenRequest]) -> None:
        """One batched decode step: each of ``reqs`` emitted one token."""

    def finished(self, req: GenRequest) -> None:
        """The request left the engine (finish_reason: stop, length, cancelled or error)."""


class EngineLoop:
    """One engine thread over ``decoder``; ``submit`` from any thread, ``stop(drain=True)`` to finish."""

    def __init__(self, decoder: Any, eos_id: int | None = None, listener: Listener | None = None,
                 idle_wait_s: float = 0.05) -> None:
        self.decoder = decoder
        self.eos_id = eos_id
        self.listener = listener or Listener()
        self.max_batch = len(decoder.slots)
        self._inbox: queue.SimpleQueue[GenRequest | None] = queue.SimpleQueue()
        self._waiting: deque[GenRequest] = deque()
        self._running: list[GenRequest] = []
        self._idle_wait = idle_wait_s
        self._stopping = False
        self._cancel = False
        self.steps = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="trt-latency-engine", daemon=True)

    def warm_up(self, steps: int = 16, rounds: int = 2) -> float:
        """Before ``start``: ``rounds`` times, every slot prefilled with a short prompt and ``steps`` batched
        decode steps over all of them, untimed; every slot free again after. Returns the seconds it took.

        Why: a fresh session's first full batches run slower than later ones (the serving fixture: 108 ms for
        its first 8 x 32-token round, 78 ms for the next; aiperf saw the first 20 requests of a fresh server
        at 1.2-1.8x the latency of the rest). The calibration timed a warm engine, and the admission's online
        scores would start from the cold ones. A server warms up before it says it is ready (vLLM's profile
        run, TensorRT-LLM's warmup)."""
        t0 = time.perf_counter()
        d = self.decoder
        slots = [i for i in (d.acquire() for _ in range(d.free())) if i is not None]
        prompt = [t % d.vocab for t in range(1, 1 + min(d.max_prompt, 16))]
        try:
            for _ in range(rounds):
                for i in slots:
                    d.prefill(i, prompt)
                for _ in range(max(0, min(steps, d.max_len - len(prompt)))):
                    d.decode(slots)
        finally:
            for i in slots:
                d.release(i)
        return time.perf_counter() - t0

    # -- any thread -----------------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def submit(self, req: GenRequest) -> None:
        self._inbox.put(req)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Finish the running and queued requests (drain) or cancel them, then end the thread."""
        self._cancel = not drain
        self._stopping = True
        self._inbox.put(None)  # wakes an idle engine
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def running(self) -> int:
        return len(self._running)

    def queued(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def idle(self) -> bool:
        return not self._running and not self._waiting and self._inbox.empty()

    # -- engine thread --------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while True:
                if not self._take():
                    break
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - every client is told, then the server sees .error
            self.error = exc
            for r in [*self._running, *self._waiting]:
                self._finish(r, "error", f"engine failed: {exc}")
            raise

    def _take(self) -> bool:
        """Move new requests to the waiting queue; block briefly when idle. False: stop now."""
        block = not self._running and not self._waiting
        while True:
            try:
                item = self._inbox.get(timeout=self._idle_wait) if block else self._inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            if item is not None:
                self._waiting.append(item)
        if self._cancel:
            for r in [*self._running, *self._waiting]:
                r.cancelled = True
        return not (self._stopping and not self._running and not self._waiting and self._inbox.empty())

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        while self._waiting and self.decoder.free():
            r = self._waiting.popleft()
            r.slot = self.decoder.acquire()
            self._running.append(r)
            try:
                token = self.decoder.prefill(r.slot, r.prompt)
            except ValueError as exc:  # the handler checked lengths; a model-side refusal is this request's
                self._finish(r, "error", str(exc))
                continue
            r.first_token_at = time.perf_counter()
            self.listener.prefilled(r)
            self._emit(r, token)

    def _step(self) -> None:
        batch = list(self._running)
        tokens = self.decoder.decode([r.slot for r in batch])
        self.steps += 1
        self.listener.stepped(batch)
        for r, t in zip(batch, tokens, strict=True):
            self._emit(r, t)

    def _emit(self, r: GenRequest, token: int) -> None:
        r.tokens.append(token)
        r.sink(("token", token))
        n = len(r.tokens)
        if n >= r.max_tokens:
            self._finish(r, "length")
        elif token == self.eos_id and not r.ignore_eos and n >= r.min_tokens:
            self._finish(r, "stop")

    def _finish(self, r: GenRequest, reason: str, message: str = "") -> None:
        r.finished_at = time.perf_counter()
        r.finish_reason = reason
        if r in self._running:
            self._running.remove(r)
        if r.slot is not None:
            self.decoder.release(r.slot)
            r.slot = None
        try:
            self.listener.finished(r)
        finally:
            r.sink(("error", message) if reason == "error" else ("done", reason))
