"""The Runner contract every backend (ONNX Runtime, TensorRT) implements; the sweep and replay only see this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np


class Closing:
    """Mixin: ``with obj:`` calls ``obj.close()`` on exit (runners, CUDA buffers, streams, events, graphs)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class SlotPool:
    """The KV-slot bookkeeping of both slot decoders (engines/ort/slots.py, engines/trt/slots.py), as
    serve's engine loop drives it: ``slots`` holds objects with ``busy``, ``length`` and ``last_token``."""

    slots: list[Any]

    def acquire(self) -> int | None:
        """A free slot's index (marked busy, emptied), else None."""
        for i, s in enumerate(self.slots):
            if not s.busy:
                s.busy, s.length, s.last_token = True, 0, -1
                return i
        return None

    def release(self, index: int) -> None:
        self.slots[index].busy = False

    def free(self) -> int:
        return sum(not s.busy for s in self.slots)


def draw_prompt(rng: np.random.Generator, length: int, *, vocab: int = 0, hidden: int = 1,
                dtype: np.typing.DTypeLike = np.float32) -> np.ndarray:
    """A random prompt of ``length`` tokens: token ids [1, S] in [0, vocab) when ``vocab`` is given (a token-id
    model), else embeddings [1, S, hidden] (N(0, 0.5^2) in ``dtype``). Every runner's ``random_prompt`` draws
    here, so a replay's prompts are the same whichever runner, or replay process, serves them."""
    if vocab:
        return rng.integers(0, vocab, (1, length)).astype(np.int64)
    return (rng.standard_normal((1, length, hidden), dtype=np.float32) * 0.5).astype(dtype)


@dataclass(frozen=True)
class GenerateResult:
    """One real end-to-end request: TTFT (prefill -> token 1), total, and each decode step's ms."""

    ttft_ms: float
    total_ms: float
    step_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # greedy token ids (argmax of the last logits)

    @property
    def output_tokens(self) -> int:
        return len(self.step_ms) + 1


@runtime_checkable
class Runner(Protocol):
    """A loaded engine that can time one step at a KV position and run a real request."""

    backend: str  # "ort-cpu", "ort-cuda", "ort-trt", "tensorrt"
    device: str
    max_past_len: int
    hidden: int

    def time_step(self, past_len: int, new_tokens: int, reps: int) -> np.ndarray:
        """Float64 ms per repetition; timed region = the engine call only (buffers bound outside)."""
        ...

    def generate(self, inputs_embeds: np.ndarray, output_tokens: int) -> GenerateResult:
        """Prefill the prompt, then output_tokens - 1 decode steps feeding present KV back as past.

        The prompt is embeddings [1, S, H]; runners of token-id models (the ORT runner, by the model's
        signature) also take token ids [1, S] and feed the greedy next token's id back."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


@runtime_checkable
class BatchRunner(Protocol):
    """Optional capability (checked with ``supports_batch``): one batched decode step over B running rows.

    ``batch_kv_read``: what a step reads, "padded" (X = B * max L, a dense cache) or "packed" (X = sum L);
    ``prefill_with_batch``: "separate" (a prefill is its own engine call and stalls the batch)."""

    max_batch: int
    batch_kv_read: str
    prefill_with_batch: str

    def time_batch_step(self, kv_lens: Sequence[int], reps: int) -> np.ndarray:
        """Float64 ms per repetition of ONE decode step with B = len(kv_lens) rows (S = 1 each)."""
        ...


def supports_batch(runner: object) -> bool:
    """True when ``runner`` can time batched decode steps with B > 1."""
    return hasattr(runner, "time_batch_step") and int(getattr(runner, "max_batch", 0) or 0) > 1
