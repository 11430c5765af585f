"""Real-token decoding in KV slots over an OrtRunner's session: what ``trt-latency serve``'s engine loop runs.

The runner's own paths time steps (IOBinding over one request's buffers, ``time_batch_step`` over random
contents). Serving needs more: each request's OWN KV kept between iterations, prefilled into a free slot,
and one batched decode step over every running request with real greedy tokens. ``SlotDecoder`` does that
with plain ``session.run`` over numpy feeds, bound by the runner's signature (names, dtypes, KV layout)
and with the runner's own token input (``runner.prompt_values``: token ids, or the runner's embedding
table for an embeddings model), so its tokens are the runner's greedy ``generate`` tokens.

A slot holds a request's KV at capacity ``max_len`` (past + new tokens the runner allows). A batched step
left-pads every row to the longest one with the attention mask zero on the padding (the layout the runner
uses for standard-op attention, tested there to equal each row alone); each row's new KV is the last
position of the present. Batching needs an attention mask input and standard-op attention; otherwise
(no mask, or GroupQueryAttention, which reads right-padded rows) the decoder steps the rows one by one
(``can_batch`` False, ``why`` says so). Supported: concat KV (past + new -> present), separate key/value
tensors (our export, optimum); a shared-buffer or fused-KV model raises InputError naming the field.

Between steps of an unchanged batch the past is not re-laid out: a concat model's present of step t (every
row grown by one at the same position, so the left padding stays aligned) IS step t + 1's past, fed back
as it came out (the mask gains a column of ones). The O(B L) left-pad copy into a fresh feed runs only when
the batch's membership changes (a request joins after its prefill or leaves); each step still writes each
row's new position into its slot (O(B)), so a re-layout always starts from current slots. Measured by
benchmarks/serve_step_copy.py. The price: the batch's KV is held twice (slots + the last present).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_latency.engines.base import SlotPool
from trt_latency.engines.export import MASK_INPUT
from trt_latency.errors import InputError


@dataclass
class Slot:
    """One request's KV: arrays [kv_heads, max_len, head_dim] per (block, key/value), ``length`` filled."""

    kv: list[np.ndarray]
    length: int = 0
    last_token: int = -1
    busy: bool = field(default=False)
    generation: int = 0  # bumped by each prefill: a batch cached over an older content of the slot is stale


class SlotDecoder(SlotPool):
    """Prefill into a slot and batched greedy decode steps over slots, on ``runner``'s ONNX Runtime session."""

    def __init__(self, runner: Any, slots: int) -> None:
        sig = runner.signature
        path = str(getattr(runner, "path", sig.model))
        if getattr(runner, "session", None) is None:
            raise InputError("this slot decoder runs an ONNX Runtime session (a TensorRT runner's slots are "
                             "engines/trt/slots.py)", path=path, field="runner", expected="an OrtRunner")
        if runner.kv_mode != "concat":
            raise InputError(f"kv_mode {runner.kv_mode}: serving keeps each request's KV in its own slot and "
                             "feeds past -> present (concat)", path=path, field="kv_mode", expected="concat")
        if sig.kv_layout != "separate":
            raise InputError("fused KV tensors are not served yet", path=path, field="kv_layout",
                             expected="separate key / value tensors")
        self.runner = runner
        self.sig = sig
        self.session = runner.session
        d = runner.dims
        self.vocab = int(d.vocab)
        self.max_prompt = int(runner.max_new_tokens)  # the longest prefill the runner allows
        self.max_len = int(runner.max_past_len) + 1  # KV positions a request may fill (past of its last step + 1)
        self._kv_dtype, self._pos_dtype = d.kv_dtype, d.pos_dtype
        names = {i.name for i in self.session.get_overridable_initializers()}
        self._mask = sig.attention_mask or (MASK_INPUT if MASK_INPUT in names else None)
        self._mask_dtype = d.mask_dtype if sig.attention_mask else np.int64
        self._pairs = [pair for block in sig.kv for pair in block.pairs()]  # (past name, present name)
        self._outputs = [sig.logits, *(present for _, present in self._pairs)]
        gqa = "GroupQueryAttention" in sig.attention_ops
        self.can_batch = self._mask is not None and not gqa
        self.why = ("batched decode: rows left-padded, attention mask zero on the padding" if self.can_batch else
                    "batch 1: " + ("the model has no attention mask input to separate ragged KV lengths"
                                   if self._mask is None else "GroupQueryAttention reads right-padded rows"))
        shape = (int(sig.kv_heads), self.max_len, int(sig.head_dim))
        self.slots = [Slot([np.zeros(shape, dtype=self._kv_dtype) for _ in self._pairs]) for _ in range(slots)]
        # The last batched step: its key (slot indices, their generations, their lengths after it), its present
        # (the next step's past while the key holds) and each row's left padding. reuse_batch False re-lays
        # the past out every step (the first version; benchmarks/serve_step_copy.py compares the two).
        self.reuse_batch = True
        self._cached: tuple[tuple[Any, ...], list[np.ndarray], np.ndarray] | None = None
        self.relayouts = 0

    # -- steps ----------------------------------------------------------------------------------------
    def _tokens(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, S] as the model's token input ([B, S] ids or [B, S, H] embeddings, the runner's table)."""
        b, s = ids.shape
        vals = self.runner.prompt_values(ids.reshape(1, b * s).astype(np.int64))
        return np.ascontiguousarray(vals.reshape((b, s, *vals.shape[2:])))

    def _run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None,
             past: list[np.ndarray]) -> list[np.ndarray]:
        sig = self.sig
        feeds: dict[str, Any] = {sig.token_name: self._tokens(ids)}
        if sig.position_ids:
            feeds[sig.position_ids] = positions.astype(self._pos_dtype)
        if mask is not None and self._mask is not None:
            feeds[self._mask] = mask.astype(self._mask_dtype)
        for (name, _), arr in zip(self._pairs, past, strict=True):
            feeds[name] = arr
        out: list[np.ndarray] = self.session.run(self._outputs, feeds)
        return out

    def prefill(self, index: int, prompt: list[int]) -> int:
        """Prefill ``prompt`` (token ids) into slot ``index``; returns the greedy first token."""
        n = len(prompt)
        if not 1 <= n <= self.max_prompt:
            raise ValueError(f"prompt length must be in [1, {self.max_prompt}], got {n}")
        slot = self.slots[index]
        kv_shape = (1, self.sig.kv_heads, 0, self.sig.head_dim)
        empty = [np.zeros(kv_shape, dtype=self._kv_dtype) for _ in self._pairs]
        out = self._run(np.asarray([prompt], dtype=np.int64), np.arange(n)[None], np.ones((1, n)), empty)
        for buf, present in zip(slot.kv, out[1:], strict=True):
            buf[:, :n] = present[0]
        slot.length = n
        slot.generation += 1
        slot.last_token = int(np.argmax(out[0][0, -1]))
        return slot.last_token

    def decode(self, indices: list[int]) -> list[int]:
        """One greedy decode step for each slot in ``indices`` (its last token fed, its KV grown by one);
        one batched engine call when the model can batch, else one call per row."""
        if not self.can_batch and len(indices) > 1:
            return [self.decode([i])[0] for i in indices]
        slots = [self.slots[i] for i in indices]
        lens = [s.length for s in slots]
        if max(lens) >= self.max_len:
            raise ValueError(f"a slot is full ({max(lens)} of {self.max_len} KV positions)")
        b, lmax = len(slots), max(lens)
        key = (tuple(indices), tuple(s.generation for s in slots), tuple(lens))
        cached = self._cached if self.reuse_batch else None
        self._cached = None
        if cached is not None and cached[0] == key:  # the same rows, each one step on: last present = past
            _, past, pad = cached
        else:
            self.relayouts += 1
            pad = np.asarray([lmax - n for n in lens], dtype=np.int64)
            past = [np.zeros((b, self.sig.kv_heads, lmax, self.sig.head_dim), dtype=self._kv_dtype)
                    for _ in self._pairs]
            for r, s in enumerate(slots):  # left-padded: row r's past ends where the longest one's does
                for j, arr in enumerate(past):
                    arr[r, :, pad[r]:] = s.kv[j][:, : s.length]
        mask = (np.arange(lmax + 1)[None, :] >= pad[:, None]).astype(np.int64)
        ids = np.asarray([[s.last_token] for s in slots], dtype=np.int64)
        out = self._run(ids, np.asarray(lens)[:, None], mask, past)
        tokens = np.argmax(out[0][:, -1], axis=-1)
        for r, s in enumerate(slots):
            for buf, present in zip(s.kv, out[1:], strict=True):
                buf[:, s.length] = present[r, :, lmax]
            s.length += 1
            s.last_token = int(tokens[r])
        if self.reuse_batch and lmax + 1 < self.max_len:
            self._cached = ((tuple(indices), key[1], tuple(s.length for s in slots)), out[1:], pad)
        return [int(t) for t in tokens]
