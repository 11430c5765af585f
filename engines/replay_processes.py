"""The replay in fresh processes, as a server runs: ``runtime.replay_processes`` (``calibrate --replay-processes``).

Why: a decode step's level depends on where the process put the weights and the KV cache, and that is
drawn when the model is loaded. On the 2-core machine (benchmarks/realsize/load_order.py, docs/decisions.md
14), the same int4 0.5B model loaded 4 times in one process stepped at 21.1-26.7 ms at KV 16, and fresh genai
processes read 24.0-27.0 ms. A serving process is one such draw; a replay in the calibrating process was
one more. So the replay, which gives the loop terms their level (o, c(P), o_p(P) are read against the engine
model), runs in K fresh worker processes that each load the model once, as a server does, and the requests
go round-robin over them: the loop fit sees K draws, not the one this process got.

``ReplayProcesses`` has the replay's runner surface (``generate``, ``random_prompt``, backend, device,
token_input, hidden, loop, memory, threads), so engines/replay.run_replay is unchanged. Each worker is a
``spawn`` process (a clean interpreter: nothing of this process's heap, threads or loaded libraries), opens
the runner with the picklable ``opener`` it is given, warms it with one short request, says hello, then
serves ``generate`` calls one at a time over a pipe. A worker that dies or raises is reported with what it
said; closing (or an interrupt of this process) ends them all.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from trt_latency.engines.base import Closing, GenerateResult, draw_prompt
from trt_latency.errors import BackendUnavailable

# The runner attributes the replay and the summary read, copied from the first worker's hello.
_SURFACE = ("backend", "device", "token_input", "hidden", "vocab", "max_past_len", "loop", "memory", "threads",
            "kv_mode")
HELLO_TIMEOUT_S = 600.0  # opening a multi-GB model on a loaded machine; a worker that says nothing is dead


def _surface(runner: Any) -> dict[str, Any]:
    out = {k: getattr(runner, k) for k in _SURFACE if hasattr(runner, k)}
    if hasattr(runner, "dims"):  # the ORT runner: its vocabulary and token element type live in its dims
        out.setdefault("vocab", int(runner.dims.vocab))
        out["token_dtype"] = np.dtype(runner.dims.token_dtype).str
    warn = getattr(runner, "ort_warning", None)
    out["ort_warning"] = warn() if callable(warn) else None
    out["pid"] = os.getpid()
    return out


def _error(exc: BaseException) -> tuple[str, Any, str]:
    """("error", the exception if it survives the pipe else its text, the worker's traceback)."""
    try:
        pickle.loads(pickle.dumps(exc))
        sent: Any = exc
    except Exception:  # noqa: BLE001 - an exception type that does not round-trip: its text goes instead
        sent = f"{type(exc).__name__}: {exc}"
    return ("error", sent, traceback.format_exc())


def _worker(opener: Callable[[], Any], conn: Any, seed: int) -> None:
    """One worker: open, warm, hello, then ("generate", prompt, n) -> GenerateResult until ("close",)."""
    try:
        runner = opener()
        try:
            rng = np.random.default_rng([seed, 7])
            runner.generate(runner.random_prompt(8, rng), 3)  # first-call allocations, kernel selection
            conn.send(("hello", _surface(runner)))
            while True:
                msg = conn.recv()
                if msg[0] != "generate":
                    break
                try:
                    conn.send(("result", runner.generate(msg[1], msg[2])))
                except Exception as exc:  # noqa: BLE001 - sent back whole: the parent raises it where it asked
                    conn.send(_error(exc))
        finally:
            runner.close()
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return  # the parent went away or was interrupted: nothing to report to
    except Exception as exc:  # noqa: BLE001 - opening failed: the parent reports it with the worker's traceback
        try:
            conn.send(_error(exc))
        except (BrokenPipeError, OSError):
            pass


class ReplayProcesses(Closing):
    """The replay's runner over ``processes`` fresh worker processes (round-robin, one request at a time)."""

    def __init__(self, opener: Callable[[], Any], processes: int, seed: int = 0) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._next = 0
        try:
            for i in range(processes):  # all start together: the openings overlap
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(opener, child, seed + i), daemon=True,
                                   name=f"trt-latency-replay-{i}")
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            hellos = [self._receive(i, "hello", HELLO_TIMEOUT_S) for i in range(processes)]
        except BaseException:
            self.close()
            raise
        first = hellos[0]
        for key, value in first.items():
            if key not in ("ort_warning", "pid"):  # a method here (every worker's warning, joined); pids
                setattr(self, key, value)
        self.processes = processes
        self.pids = [h["pid"] for h in hellos]
        self.memory = f"{first.get('memory', '')} (each of {processes} fresh replay processes)".strip()
        self._warnings = sorted({h["ort_warning"] for h in hellos if h.get("ort_warning")})

    def _receive(self, i: int, want: str, timeout: float | None = None) -> Any:
        conn, proc = self._conns[i], self._procs[i]
        if timeout is not None and not conn.poll(timeout):
            raise BackendUnavailable(f"replay process {i} said nothing in {timeout:.0f} s (pid {proc.pid})")
        try:
            msg = conn.recv()
        except EOFError:
            proc.join(5)
            raise BackendUnavailable(f"replay process {i} (pid {proc.pid}) exited with code {proc.exitcode} "
                                     "before it answered (out of memory? see its output above)") from None
        if msg[0] == "error":
            exc, where = msg[1], msg[2]
            if isinstance(exc, Exception):
                exc.add_note(f"in replay process {i}:\n{where}")
                raise exc
            raise BackendUnavailable(f"replay process {i} failed: {exc}\n{where}")
        if msg[0] != want:
            raise BackendUnavailable(f"replay process {i} answered {msg[0]!r}, expected {want!r}")
        return msg[1]

    def ort_warning(self) -> str | None:
        return "; ".join(self._warnings) or None

    def random_prompt(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """Token ids [1, S] (the ORT runner's and the genai loop's draw), or embeddings [1, S, H]."""
        ids = self.token_input == "input_ids"
        return draw_prompt(rng, length, vocab=self.vocab if ids else 0, hidden=self.hidden,
                           dtype=np.dtype(getattr(self, "token_dtype", "<f4")))

    def generate(self, inputs_embeds: np.ndarray, output_tokens: int) -> GenerateResult:
        i = self._next % len(self._conns)
        self._next += 1
        self._conns[i].send(("generate", np.asarray(inputs_embeds), int(output_tokens)))
        result: GenerateResult = self._receive(i, "result")
        return result

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
