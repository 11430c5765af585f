"""Real-token decoding in KV slots over a TrtRunner: what ``trt-latency serve --engine`` runs.

The ONNX Runtime counterpart (engines/ort/slots.py ``SlotDecoder``) has the interface the engine loop drives
(serving/engine_loop.py): ``acquire / release / free / prefill / decode``, ``vocab``, ``max_prompt``,
``max_len``, ``can_batch``, ``why`` and ``slots``. Here each slot owns a KV set of its own on the GPU
(``TrtRunner.alloc_kv``: two buffers per past tensor at the runner's capacity), so a request's KV stays where
its last step wrote it: a contiguous present [1, kv_heads, past + S, head_dim] IS the next step's past, and
each step only swaps the two buffers' roles (the slot's ``swap``), as the runner's own ``generate`` does.
No KV is copied between iterations.

The runner steps at batch 1 (its step shapes and profiles are batch 1), so ``can_batch`` is False: a decode
over several slots is one engine call per slot, and ``serve`` runs one request at a time. Token input and
greedy tokens are the runner's (``prompt_values``: ids, or its embedding table; the argmax of the last
logits row read back through its pinned buffer), so a slot's tokens are the runner's ``generate`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trt_latency.engines.base import SlotPool
from trt_latency.errors import InputError

if TYPE_CHECKING:
    from trt_latency.engines.trt.runner import KvSet, TrtRunner


@dataclass
class TrtSlot:
    """One request's KV on the GPU: ``kv`` holds ``length`` positions in the buffer its last step wrote."""

    kv: KvSet
    swap: bool = False  # the roles of the last step (TrtRunner.greedy_step's swap): its present is the next step's past
    length: int = 0
    last_token: int = -1
    busy: bool = False


class TrtSlotDecoder(SlotPool):
    """Prefill into a slot and greedy decode steps over slots, one batch-1 engine call each, on ``runner``."""

    can_batch = False
    why = "batch 1: the TensorRT runner's engine profiles and step shapes are batch 1"

    def __init__(self, runner: TrtRunner, slots: int) -> None:
        if slots < 1:
            raise InputError(field="slots", expected="an integer >= 1", got=slots)
        if runner.min_past_len > 0:  # an engine built with the empty-past fallback cannot prefill
            raise InputError("serving prefills with an empty past", path=runner.source, field="past_len",
                             expected="an engine whose profile starts at past_len 0",
                             got=f"{runner.min_past_len}..{runner.max_past_len}")
        missing = runner.pasts_without_present
        if missing:
            raise InputError("serving keeps each request's KV: every past input needs its present output",
                             path=runner.source, field=missing[0], expected="a present output for it")
        self.runner = runner
        self.vocab = int(runner.vocab)
        self.max_prompt = int(runner.max_prefill_len)  # the longest prefill the runner allows
        self.max_len = int(runner.max_past_len) + 1  # KV positions a request may fill (last step's past + 1)
        # The first slot takes the runner's own KV set (serve never calls its generate): one slot, no more
        # GPU memory than the runner alone.
        self.slots = [TrtSlot(runner.own_kv if i == 0 else runner.alloc_kv()) for i in range(slots)]
        if not runner.warmed:  # lazily loaded kernels are not billed to the first request
            runner.warm_up()

    # -- steps ----------------------------------------------------------------------------------------
    def _check(self, past_len: int, new_tokens: int) -> None:
        # The engine loop refuses a request on ValueError; the runner's InputError names the profile.
        try:
            self.runner.check_position(past_len, new_tokens)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    def prefill(self, index: int, prompt: list[int]) -> int:
        """Prefill ``prompt`` (token ids) into slot ``index``; returns the greedy first token."""
        n = len(prompt)
        if not 1 <= n <= self.max_prompt:
            raise ValueError(f"prompt length must be in [1, {self.max_prompt}], got {n}")
        self._check(0, n)
        slot = self.slots[index]
        x = self.runner.prompt_values(np.asarray([prompt], dtype=np.int64))
        slot.swap = False
        slot.last_token = self.runner.greedy_step(x, 0, slot.swap, slot.kv)
        slot.length = n
        return slot.last_token

    def decode(self, indices: list[int]) -> list[int]:
        """One greedy decode step for each slot in ``indices`` (its last token fed, its KV grown by one in
        place): one engine call per slot."""
        for i in indices:  # all checked first: a refusal leaves every slot as it was
            slot = self.slots[i]
            if slot.length < 1:
                raise ValueError(f"slot {i} holds no prefilled request")
            if slot.length >= self.max_len:
                raise ValueError(f"a slot is full ({slot.length} of {self.max_len} KV positions)")
            self._check(slot.length, 1)
        tokens = []
        for i in indices:
            slot = self.slots[i]
            x = self.runner.prompt_values(np.asarray([[slot.last_token]], dtype=np.int64))
            swap = not slot.swap  # this step's past is the slot's last present
            slot.last_token = self.runner.greedy_step(x, slot.length, swap, slot.kv)
            slot.swap = swap
            slot.length += 1
            tokens.append(slot.last_token)
        return tokens
