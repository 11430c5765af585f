"""ONNX Runtime session -> per-position step timings and real end-to-end requests (the Runner contract).

What is bound comes from the model's DecoderSignature (engines/signature.py): token ids or embeddings,
attention_mask and position_ids when the model has them, KV by its own names and layout. 3-D M-RoPE
position_ids [3, 1, S] (genai's Qwen2.5-VL text decoder) get the same position on the three rows, except
a VLM prompt whose image grid the chain announced (``set_prompt_positions``): its prefill is fed the
grid positions of engines/mrope.py and its decode steps KV length + the rope delta. Two KV modes:

- ``concat``: present = past + S tokens, written to a second buffer; two ping-pong sets so a decode
  loop feeds present back as past without copies (optimum / torch.onnx exports, ours);
- ``shared``: ONE [1, kv_heads, max_len, head_dim] buffer per layer bound as both past and present,
  the step writes its token in place, the mask's length is past + S (onnxruntime-genai's
  past_present_share_buffer; GroupQueryAttention derives seqlens_k from the mask's contents).

Batched decode steps (``time_batch_step``, in-flight batching): B rows of S = 1 with their own past
lengths, in separate buffers allocated once (on the first batched call) at (max_batch, max_past_len + 1).
A ragged batch is padded to its longest row with the attention mask zero on the padding: left-padded
for standard-op attention (ours, optimum: the dense [B, kv, L, D] cache is read in full, X = B * max L),
right-padded for GroupQueryAttention (genai: each row's KV starts at 0, seqlens_k comes from the mask's
row sums, and the kernel reads each row's own length, X = sum L).

All buffers are allocated once, at the largest shape (max_past_len + max_new_tokens KV tokens). A
step binds contiguous prefixes of those flat buffers with the needed shape (IOBinding by pointer),
so the timed region of ``time_step`` is exactly ``session.run_with_iobinding``.

device "cpu": numpy buffers; "cuda" / "trt": OrtValue device buffers (``OrtValue.ortvalue_from_numpy`` /
``ortvalue_from_shape_and_type`` on 'cuda'), host staging + ``OrtValue.update_inplace`` for the
small inputs. ONNX Runtime's Run waits for the CUDA stream, so wall-clock timing is valid there too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.engines.base import Closing, GenerateResult, draw_prompt
from trt_latency.engines.export import MASK_INPUT
from trt_latency.errors import BackendUnavailable, InputError

_BACKENDS = {"cpu": "ort-cpu", "cuda": "ort-cuda", "trt": "ort-trt"}
DEFAULT_MAX_BATCH = 8  # batch buffers (allocated on the first batched step) hold this many rows


def cpu_name() -> str:
    """CPU model for the samples' device column (no commas: it is a CSV field)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return "cpu:" + line.split(":", 1)[1].strip().replace(",", " ")
    except OSError:
        pass
    import platform

    return "cpu:" + (platform.processor() or platform.machine() or "unknown")


def _gpu_name(device_id: int) -> str:
    """GPU model for the samples' device column (e.g. 'NVIDIA H100 80GB HBM3'), else 'cuda:N'."""
    try:
        from trt_latency.engines import cuda

        return cuda.device_name(device_id).replace(",", " ")
    except Exception:  # noqa: BLE001 - cuda-bindings missing or no driver: the index still identifies it
        return f"cuda:{device_id}"


_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _np_dtype(name: str | None, what: str, path: Path) -> Any:
    if name is None:
        return np.int64
    if name not in _NP_DTYPES:
        raise InputError(f"{what} is {name}, which the ONNX Runtime runner cannot bind from numpy", path=str(path),
                         field=what, expected="float32, float16, int32 or int64")
    return _NP_DTYPES[name]


class _Dims:
    """Sizes the runner allocates for: the signature's dims, and the requested lengths capped by the model's."""

    def __init__(self, sig: Any, max_past_len: int | None, max_new_tokens: int | None) -> None:
        from trt_latency.engines.export import model_metadata

        meta = model_metadata(sig.model)
        path = Path(sig.model)
        self.blocks = sig.blocks
        self.kv_heads = sig.kv_heads
        self.head_dim = sig.head_dim
        self.vocab = sig.vocab
        # A token-id model needs no hidden size to be fed; 1 keeps the Runner contract's int.
        self.hidden = sig.hidden or 1
        self.kv_dtype = _np_dtype(sig.kv_dtype, "kv_dtype", path)
        self.dtype = self.kv_dtype  # embeddings / KV element type (kept for callers of .dims.dtype)
        self.token_dtype = _np_dtype(sig.token_dtype, sig.token_input, path)
        self.logits_dtype = _np_dtype(sig.logits_dtype, "logits", path)
        self.mask_dtype = _np_dtype(sig.mask_dtype, "attention_mask", path)
        self.pos_dtype = _np_dtype(sig.position_dtype, "position_ids", path)
        model_past = sig.max_past_len
        past = int(max_past_len if max_past_len is not None else model_past if model_past is not None else 4096)
        # Never time past what the model supports (its context length from its config).
        self.max_past_len = min(past, model_past) if model_past is not None else past
        new = int(max_new_tokens if max_new_tokens is not None else meta.get("max_prefill_len", 1024))
        self.max_new_tokens = min(new, model_past + 1) if model_past is not None else new
        self.meta = meta


def _trt_profile(sig: Any, max_past: int, max_new: int) -> dict[str, tuple[str, str, str]]:
    """One explicit TensorRT EP profile (min/opt/max) over S and past_len, from the signature.

    Without it the EP rebuilds its engine whenever a shape leaves the range seen so far, which a
    per-position sweep would time as a giant outlier.
    """
    h = sig.hidden
    if sig.token_input == "input_ids":
        prof = {sig.token_name: ("1x1", "1x1", f"1x{max_new}")}
    else:
        prof = {sig.token_name: (f"1x1x{h}", f"1x1x{h}", f"1x{max_new}x{h}")}
    if sig.position_ids:
        lead = "3x" if sig.position_layout == "mrope" else ""
        prof[sig.position_ids] = (f"{lead}1x1", f"{lead}1x1", f"{lead}1x{max_new}")
    if sig.attention_mask:
        prof[sig.attention_mask] = ("1x1", f"1x{max_past // 2 + 1}", f"1x{max_past + max_new}")
    lead = "2x1" if sig.kv_layout == "fused" else "1"
    kv, d = sig.kv_heads, sig.head_dim
    for block in sig.kv:
        for past, _ in block.pairs():
            prof[past] = (f"{lead}x{kv}x0x{d}", f"{lead}x{kv}x{max_past // 2}x{d}", f"{lead}x{kv}x{max_past}x{d}")
    return prof


class OrtRunner(Closing):
    """Runner on ONNX Runtime with IOBinding over preallocated flat buffers, bound by the model's signature."""

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", *, intra_op_threads: int = 0,
                 inter_op_threads: int = 0, max_past_len: int | None = None, max_new_tokens: int | None = None,
                 device_id: int = 0, seed: int = 0, trt_cache_dir: str | None = None, kv_mode: str = "auto",
                 io: Any = None, dims: Any = None, signature: Any = None, session: Any = None,
                 max_batch: int = DEFAULT_MAX_BATCH, huge_pages: bool = False) -> None:
        """``session``: an already-built onnxruntime.InferenceSession (engines/ort/loader.create_session) for
        ``path``; by default the runner builds one on ``device``. ``signature``: an already-read one.
        ``huge_pages``: on the CPU provider, back the weights and buffers with 2 MiB pages (engines/hugepages.py;
        off: the ordinary backing a serving process gets); ``memory`` says what backed them."""
        from trt_latency.engines.ort.loader import create_session
        from trt_latency.engines.signature import read_signature

        if device not in _BACKENDS:
            raise BackendUnavailable(f"unknown ONNX Runtime device {device!r}; expected cpu, cuda or trt")
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("file not found", path=str(self.path), expected="an ONNX model")
        sig = signature if signature is not None else read_signature(self.path, io=io, dims=dims)
        self.signature = sig
        self.kv_mode = sig.resolve_kv_mode(kv_mode)
        self.token_input = sig.token_input
        dims_ = _Dims(sig, max_past_len, max_new_tokens)
        self.dims = dims_
        trt_options = None
        if device == "trt":
            from trt_latency.engines.ort.loader import trt_provider_options

            trt_options = trt_provider_options(trt_cache_dir or str(self.path.parent / "ort_trt_cache"),
                                               _trt_profile(sig, dims_.max_past_len, dims_.max_new_tokens))
        if session is not None:  # loader -> runner split: the caller built (and owns the options of) the session
            self.session, self.provider = session, session.get_providers()[0]
        else:
            self.session, self.provider = create_session(self.path, device, intra_op_threads=intra_op_threads,
                                                         inter_op_threads=inter_op_threads, device_id=device_id,
                                                         trt_options=trt_options)
        self.backend = _BACKENDS[device]
        self.device = cpu_name() if device == "cpu" else _gpu_name(device_id)
        self.max_past_len = dims_.max_past_len
        self.max_new_tokens = dims_.max_new_tokens
        self.hidden = dims_.hidden
        self.vocab = dims_.vocab
        self.threads = (intra_op_threads, inter_op_threads)
        self._on_device = device != "cpu"
        self._device_id = device_id
        self._ort_device = "cuda" if self._on_device else "cpu"
        self._rng = np.random.default_rng(seed)
        self._allocate()
        self._binding = self.session.io_binding()
        self._last_past_set = 0
        self._init_batch(max_batch)
        self._huge_pages = huge_pages and not self._on_device
        self.memory = "device memory"
        self._back_memory()

    def _back_memory(self) -> None:
        """CPU: collapse the session's weights and the runner's buffers onto huge pages when asked, else say
        which ordinary backing they have (see hugepages.py)."""
        if not self._on_device:
            from trt_latency.engines.hugepages import back_memory

            self.memory = back_memory(self._huge_pages).describe()

    # -- buffers -----------------------------------------------------------------------------

    def _allocate(self) -> None:
        import onnxruntime as ort

        d, sig = self.dims, self.signature
        fused = sig.kv_layout == "fused"
        per_token = d.kv_heads * d.head_dim
        self._max_len = self.max_past_len + self.max_new_tokens  # KV tokens one buffer holds
        cap = self._max_len * per_token * (2 if fused else 1)
        self._per_token = per_token

        def filled(n: int, dtype: Any) -> np.ndarray:
            # Small finite values: the contents never matter for timing, only that they are finite.
            return (self._rng.standard_normal(n, dtype=np.float32) * 0.1).astype(dtype)

        ids = sig.token_input == "input_ids"
        self._token_width = 1 if ids else d.hidden  # values per token of the token input
        if ids:
            self._host_tokens = self._rng.integers(0, d.vocab, self.max_new_tokens).astype(d.token_dtype)
        else:
            self._host_tokens = filled(self.max_new_tokens * d.hidden, d.token_dtype)
        # M-RoPE: [3, 1, S] bound as a prefix, so the three rows of a step lie in the first 3 * S values
        self._mrope = sig.position_layout == "mrope"
        self._host_pos = np.zeros(self.max_new_tokens * (3 if self._mrope else 1), dtype=d.pos_dtype)
        self._prompt_positions: tuple[np.ndarray, int] | None = None  # the next prompt's ([3, S], delta)
        self._host_mask = np.ones(self._max_len, dtype=d.mask_dtype)  # a prefix of ones of length past + S
        # Greedy decoding of an embeddings model feeds the embedding of the chosen token back in (the
        # model has no embedding table of its own); a token-id model is fed the token id.
        self._embed_table = filled(d.vocab * d.hidden, d.token_dtype).reshape(d.vocab, d.hidden) if not ids else None
        self._host_logits = np.empty(self.max_new_tokens * d.vocab, dtype=d.logits_dtype)
        self._host_logits_step = np.empty(d.vocab, dtype=d.logits_dtype)
        n_sets = 1 if self.kv_mode == "shared" else 2  # shared: past and present are one buffer
        n_kv = len(sig.kv[0].pairs())
        # kv[set][block][j] flat buffers (j: key, value; or the one fused tensor).
        if not self._on_device:
            self._tokens: Any = self._host_tokens
            self._tokens_step: Any = self._host_tokens
            self._pos: Any = self._host_pos
            self._mask: Any = self._host_mask
            self._logits: Any = self._host_logits
            self._logits_step: Any = self._host_logits_step
            self._kv: Any = _kv_views(filled(n_sets * d.blocks * n_kv * cap, d.kv_dtype), cap, n_sets, d.blocks, n_kv)
            return
        ov = ort.OrtValue
        dev, did = self._ort_device, self._device_id
        self._tokens = ov.ortvalue_from_numpy(self._host_tokens, dev, did)
        # Decode steps update only this one-token buffer: update_inplace copies a whole OrtValue, and
        # the prompt-sized one is max_new_tokens x hidden (4 MB on the GPU tier) per generated token.
        self._tokens_step = ov.ortvalue_from_numpy(self._host_tokens[: self._token_width].copy(), dev, did)
        self._pos = ov.ortvalue_from_numpy(self._host_pos, dev, did)
        self._mask = ov.ortvalue_from_numpy(self._host_mask, dev, did)
        self._logits = ov.ortvalue_from_shape_and_type([self._host_logits.size], d.logits_dtype, dev, did)
        self._logits_step = ov.ortvalue_from_shape_and_type([d.vocab], d.logits_dtype, dev, did)
        # One random host pattern copied into every device buffer: the contents never matter for
        # timing, and 4 * blocks random fills of cap values cost about a minute of CPU on a 1B tier.
        pattern = filled(cap, d.kv_dtype)
        self._kv = [[tuple(ov.ortvalue_from_numpy(pattern, dev, did) for _ in range(n_kv)) for _ in range(d.blocks)]
                    for _ in range(n_sets)]

    def _ptr(self, buf: Any) -> int:
        return int(buf.ctypes.data) if isinstance(buf, np.ndarray) else int(buf.data_ptr())

    def _bind(self, past_len: int, new_tokens: int, past_set: int) -> Any:
        """Bind shapes for one step: past from set ``past_set``, present into the other set (concat) or the
        same buffer (shared)."""
        d, b, sig = self.dims, self._binding, self.signature
        dev, did = self._ort_device, self._device_id
        tokens = self._tokens_step if new_tokens == 1 else self._tokens
        tok_shape = [1, new_tokens] if sig.token_input == "input_ids" else [1, new_tokens, d.hidden]
        b.bind_input(sig.token_name, dev, did, d.token_dtype, tok_shape, self._ptr(tokens))
        if sig.attention_mask:
            b.bind_input(sig.attention_mask, dev, did, d.mask_dtype, [1, past_len + new_tokens], self._ptr(self._mask))
        if sig.position_ids:
            b.bind_input(sig.position_ids, dev, did, d.pos_dtype, sig.position_shape(new_tokens), self._ptr(self._pos))
        logits = self._logits_step if new_tokens == 1 else self._logits
        b.bind_output(sig.logits, dev, did, d.logits_dtype, [1, new_tokens, d.vocab], self._ptr(logits))
        if self.kv_mode == "shared":
            past_shape = present_shape = sig.kv_shape(self._max_len)
            present_set = past_set = 0
        else:
            past_shape, present_shape = sig.kv_shape(past_len), sig.kv_shape(past_len + new_tokens)
            present_set = 1 - past_set
        for i, block in enumerate(sig.kv):
            for j, (past, present) in enumerate(block.pairs()):
                b.bind_input(past, dev, did, d.kv_dtype, past_shape, self._ptr(self._kv[past_set][i][j]))
                b.bind_output(present, dev, did, d.kv_dtype, present_shape, self._ptr(self._kv[present_set][i][j]))
        return b

    def _set_positions(self, start: int, new_tokens: int, grid: np.ndarray | None = None) -> None:
        """Positions start .. start + S - 1 (the same on M-RoPE's three rows), or a prompt's ``grid`` [3, S]."""
        if not self.signature.position_ids:
            return
        if self._mrope:
            rows = self._host_pos[: 3 * new_tokens].reshape(3, new_tokens)
            rows[:] = grid if grid is not None else np.arange(start, start + new_tokens)  # text: one per row
        else:
            self._host_pos[:new_tokens] = np.arange(start, start + new_tokens, dtype=self._host_pos.dtype)
        if self._on_device:
            self._pos.update_inplace(self._host_pos)

    @property
    def mrope(self) -> bool:
        """The model takes 3-D M-RoPE position_ids [3, B, S] (a VLM chain announces its prompts' image grids)."""
        return self._mrope

    def set_prompt_positions(self, positions: np.ndarray, delta: int) -> None:
        """The next ``generate``'s prompt positions [3, S] and rope delta (engines.mrope.prompt_positions): its
        prefill is fed them and its decode steps KV length + delta. Used once; a prompt of another length
        falls back to text positions."""
        pos = np.asarray(positions)
        if pos.ndim != 2 or pos.shape[0] != 3:
            raise ValueError(f"prompt positions must be [3, S], got {list(pos.shape)}")
        self._prompt_positions = (pos, int(delta))

    def _set_tokens(self, values: np.ndarray) -> None:
        flat = np.ascontiguousarray(values, dtype=self.dims.token_dtype).reshape(-1)
        self._host_tokens[: flat.size] = flat
        if self._on_device:
            if flat.size == self._token_width:
                self._tokens_step.update_inplace(flat)
            else:
                self._tokens.update_inplace(self._host_tokens)

    def _feed_token(self, token: int) -> None:
        """Feed the greedy token back: its id (token-id model) or its embedding (embeddings model)."""
        if self._embed_table is None:
            self._set_tokens(np.asarray([token]))
        else:
            self._set_tokens(self._embed_table[token])

    def _last_token(self, new_tokens: int) -> int:
        v = self.dims.vocab
        if new_tokens == 1:
            row = self._logits_step if not self._on_device else self._logits_step.numpy()
        else:
            full = self._logits if not self._on_device else self._logits.numpy()
            row = full[(new_tokens - 1) * v: new_tokens * v]
        return int(np.argmax(row))

    def last_logits(self, new_tokens: int) -> np.ndarray:
        """Copy of the last step's last-token logits (tests compare them with a full recompute)."""
        v = self.dims.vocab
        buf = self._logits_step if new_tokens == 1 else self._logits
        host = buf if isinstance(buf, np.ndarray) else buf.numpy()
        return np.array(host[(new_tokens - 1) * v: new_tokens * v] if new_tokens > 1 else host[:v])

    def _check(self, past_len: int, new_tokens: int) -> None:
        if not 0 <= past_len <= self.max_past_len:
            raise ValueError(f"past_len must be in [0, {self.max_past_len}], got {past_len}")
        if not 1 <= new_tokens <= self.max_new_tokens:
            raise ValueError(f"new_tokens must be in [1, {self.max_new_tokens}], got {new_tokens}")

    # -- Runner contract -----------------------------------------------------------------------

    def prepare(self, past_len: int, new_tokens: int) -> Any:
        """Bind everything for (past_len, new_tokens) and return the IOBinding (for harness checks)."""
        self._check(past_len, new_tokens)
        self._set_positions(past_len, new_tokens)
        return self._bind(past_len, new_tokens, past_set=0)

    def time_step(self, past_len: int, new_tokens: int, reps: int) -> np.ndarray:
        return self._timed_runs(self.prepare(past_len, new_tokens), reps, past_len, new_tokens)

    def _timed_runs(self, binding: Any, reps: int, past_len: int, new_tokens: int) -> np.ndarray:
        """Float64 ms of ``reps`` runs of an already-bound step; the timed region is the engine call only."""
        run = self.session.run_with_iobinding
        out = np.empty(reps, dtype=np.float64)
        clock = time.perf_counter_ns
        try:
            for r in range(reps):
                t0 = clock()
                run(binding)
                out[r] = (clock() - t0) * 1e-6
        except Exception as exc:  # noqa: BLE001 - ORT raises RuntimeError/Fail/...: one line that says where
            raise self._run_error(exc, past_len, new_tokens) from None
        return out

    def _run_error(self, exc: Exception, past_len: int, new_tokens: int) -> InputError:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return InputError(f"ONNX Runtime failed on a step at past_len {past_len} with {new_tokens} new token(s) "
                          f"(kv_mode {self.kv_mode}): {msg[:300]}", path=str(self.path), field="step",
                          expected="a model that supports this length (--max-past-len N below its context, "
                                   "or --kv-mode concat)")

    def random_prompt(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """A random prompt of ``length`` tokens in the model's own input kind: ids [1, S] or embeddings [1, S, H]."""
        ids = self.token_input == "input_ids"
        return draw_prompt(rng, length, vocab=self.dims.vocab if ids else 0, hidden=self.hidden,
                           dtype=self.dims.token_dtype)

    def prompt_values(self, prompt: np.ndarray) -> np.ndarray:
        """``prompt`` as the model's token input: ids [1, S] (token-id model) or embeddings [1, S, H].

        A prompt of the other kind is converted: embeddings for a token-id model become S token ids
        drawn deterministically from their values (only the length matters for timing; this keeps
        callers that make random embeddings working); ids for an embeddings model are looked up in
        the runner's random embedding table."""
        arr = np.asarray(prompt)
        ids_model = self.token_input == "input_ids"
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            if arr.shape[0] != 1 or arr.shape[1] < 1:
                raise ValueError(f"input_ids must be [1, S], got {list(arr.shape)}")
            if (arr < 0).any() or (arr >= self.dims.vocab).any():
                raise ValueError(f"token ids must be in [0, {self.dims.vocab})")
            return arr if ids_model else self._embed_table[arr[0]][None]  # type: ignore[index]
        if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[1] < 1 or (not ids_model and arr.shape[2] != self.hidden):
            raise ValueError(f"inputs_embeds must be [1, S, {self.hidden}] (or input_ids [1, S]), got {list(arr.shape)}")
        if not ids_model:
            return arr
        bits = np.abs(np.asarray(arr[0, :, 0], dtype=np.float64)) * 1e6
        return (bits.astype(np.int64) % self.dims.vocab)[None]

    def generate(self, inputs_embeds: np.ndarray, output_tokens: int) -> GenerateResult:
        """Prefill the prompt (ids [1, S] or embeddings [1, S, H]), then output_tokens - 1 greedy decode steps."""
        values = self.prompt_values(inputs_embeds)
        prompt = values.shape[1]
        self._check(0, prompt)
        if output_tokens < 1 or prompt + output_tokens - 1 > self.max_past_len + 1:
            raise ValueError(f"output_tokens must be in [1, {self.max_past_len + 2 - prompt}], got {output_tokens}")
        run = self.session.run_with_iobinding
        clock = time.perf_counter_ns
        shared = self.kv_mode == "shared"
        announced, self._prompt_positions = self._prompt_positions, None
        grid, delta = announced if announced is not None and announced[0].shape[1] == prompt else (None, 0)
        t_start = clock()
        self._set_tokens(values)
        self._set_positions(0, prompt, grid)
        try:
            run(self._bind(0, prompt, past_set=0))
        except Exception as exc:  # noqa: BLE001 - one line instead of ORT's traceback
            raise self._run_error(exc, 0, prompt) from None
        token = self._last_token(prompt)
        ttft = clock()
        tokens, steps = [token], []
        past_len, past_set = prompt, 0 if shared else 1  # concat: present of the prefill landed in set 1
        for _ in range(output_tokens - 1):
            t0 = clock()
            self._feed_token(token)
            self._set_positions(past_len + delta, 1)
            run(self._bind(past_len, 1, past_set))
            token = self._last_token(1)
            steps.append((clock() - t0) * 1e-6)
            tokens.append(token)
            past_len = past_len + 1
            past_set = past_set if shared else 1 - past_set
        end = clock()
        self._last_past_set = past_set
        return GenerateResult(ttft_ms=(ttft - t_start) * 1e-6, total_ms=(end - t_start) * 1e-6, step_ms=steps,
                              tokens=tokens)

    def present(self, block: int, kind: str, length: int, kv_set: int) -> np.ndarray:
        """Copy of a KV buffer's first ``length`` tokens as [1, kv_heads, length, head_dim] (tests, debugging).

        Fused layout: ``kind`` "key" / "value" picks the first / second half of the [2, ...] tensor."""
        d, sig = self.dims, self.signature
        fused = sig.kv_layout == "fused"
        j = 0 if fused or kind == "key" else 1
        buf = self._kv[0 if self.kv_mode == "shared" else kv_set][block][j]
        host = buf if isinstance(buf, np.ndarray) else buf.numpy()
        stride = self._max_len if self.kv_mode == "shared" else length
        lead = 2 if fused else 1
        full = host[: lead * d.kv_heads * stride * d.head_dim].reshape(lead, d.kv_heads, stride, d.head_dim)
        half = 1 if fused and kind == "value" else 0
        return np.array(full[half: half + 1, :, :length])

    # -- batched decode steps (in-flight batching) ------------------------------------------------

    def _init_batch(self, max_batch: int) -> None:
        sig = self.signature
        gqa = "GroupQueryAttention" in sig.attention_ops
        self.batch_padding = "right" if gqa else "left"
        # What a step reads: GroupQueryAttention loops over each row's own length (packed); a dense
        # MatMul attention reads the padded [B, kv, max L, D] cache in full (padded).
        self.batch_kv_read = "packed" if gqa else "padded"
        self.prefill_with_batch = "separate"  # ONNX Runtime: a prefill is its own call, it stalls the batch
        mask = sig.attention_mask
        if mask is None:  # our reference decoder: the mask is an input with a default (ones), fed when batching
            names = {i.name for i in self.session.get_overridable_initializers()}
            mask = MASK_INPUT if MASK_INPUT in names else None
        self._batch_mask_name = mask
        self._batch_mask_dtype = self.dims.mask_dtype if sig.attention_mask else np.int64
        lead = next((i.shape[0] for i in self.session.get_inputs() if i.name == sig.token_name), None)
        static = lead if isinstance(lead, int) and lead > 0 else None  # a fixed batch dim caps the batch
        self.max_batch = max(1, min(int(max_batch), static)) if static is not None else max(1, int(max_batch))
        self._batch: dict[str, Any] | None = None

    def _batch_buffers(self) -> dict[str, Any]:
        """The batch buffers, allocated once at (max_batch, max_past_len + 1) on first use."""
        if self._batch is not None:
            return self._batch
        import onnxruntime as ort

        d, sig = self.dims, self.signature
        nb, length = self.max_batch, self.max_past_len + 1
        cap = nb * length * self._per_token * (2 if sig.kv_layout == "fused" else 1)
        # A short random pattern tiled: contents never matter for timing, only that they are finite.
        pattern = (self._rng.standard_normal(min(cap, 1 << 16), dtype=np.float32) * 0.1).astype(d.kv_dtype)
        kv_host = np.resize(pattern, cap)
        ids = sig.token_input == "input_ids"
        tokens = (self._rng.integers(0, d.vocab, nb).astype(d.token_dtype) if ids else
                  (self._rng.standard_normal(nb * d.hidden, dtype=np.float32) * 0.1).astype(d.token_dtype))
        host = {"tokens": tokens, "pos": np.zeros(nb * (3 if self._mrope else 1), dtype=d.pos_dtype),
                "mask": np.zeros(nb * length, dtype=self._batch_mask_dtype),
                "logits": np.empty(nb * d.vocab, dtype=d.logits_dtype)}
        n_sets = 1 if self.kv_mode == "shared" else 2
        n_kv = len(sig.kv[0].pairs())
        buf: dict[str, Any] = {"host": host, "length": length}
        if not self._on_device:
            buf.update(host)
            buf["kv"] = _kv_views(np.tile(kv_host, n_sets * d.blocks * n_kv), cap, n_sets, d.blocks, n_kv)
        else:
            ov, dev, did = ort.OrtValue, self._ort_device, self._device_id
            for name in ("tokens", "pos", "mask"):
                buf[name] = ov.ortvalue_from_numpy(host[name], dev, did)
            buf["logits"] = ov.ortvalue_from_shape_and_type([host["logits"].size], d.logits_dtype, dev, did)
            buf["kv"] = [[tuple(ov.ortvalue_from_numpy(kv_host, dev, did) for _ in range(n_kv))
                          for _ in range(d.blocks)] for _ in range(n_sets)]
        self._batch = buf
        self._back_memory()  # the batch buffers are new memory: same backing as the rest (CPU only)
        return buf

    def _check_batch(self, kv_lens: Any) -> list[int]:
        lens = [int(v) for v in kv_lens]
        if not 1 <= len(lens) <= self.max_batch:
            raise ValueError(f"batch size must be in [1, {self.max_batch}] (max_batch), got {len(lens)}")
        if min(lens) < 0 or max(lens) > self.max_past_len:
            raise ValueError(f"kv_lens must be in [0, {self.max_past_len}], got {min(lens)}..{max(lens)}")
        return lens

    def _row_slots(self, lens: list[int]) -> list[slice]:
        """Where row i's past KV lies along the length axis: left-padded to max(L) or right-padded from 0."""
        lmax = max(lens)
        return [slice(lmax - n, lmax) if self.batch_padding == "left" else slice(0, n) for n in lens]

    def prepare_batch(self, kv_lens: Any) -> Any:
        """Bind one batched decode step (S = 1 per row) for rows with past lengths ``kv_lens``."""
        lens = self._check_batch(kv_lens)
        buf = self._batch_buffers()
        d, sig = self.dims, self.signature
        # Its own IOBinding: the mask bound here must never leak into a single-request step.
        b = buf.setdefault("binding", self.session.io_binding())
        dev, did = self._ort_device, self._device_id
        n, lmax = len(lens), max(lens)
        total = lmax + 1
        host = buf["host"]
        mask = host["mask"][: n * total].reshape(n, total)
        mask[:] = 0
        for i, slot in enumerate(self._row_slots(lens)):
            mask[i, slot] = 1
            mask[i, lmax if self.batch_padding == "left" else lens[i]] = 1  # the new token
        host["pos"][: n * (3 if self._mrope else 1)] = np.tile(lens, 3 if self._mrope else 1)  # each row's own position
        if self._on_device:
            buf["mask"].update_inplace(host["mask"])
            buf["pos"].update_inplace(host["pos"])
        tok_shape = [n, 1] if sig.token_input == "input_ids" else [n, 1, d.hidden]
        b.bind_input(sig.token_name, dev, did, d.token_dtype, tok_shape, self._ptr(buf["tokens"]))
        if self._batch_mask_name:
            b.bind_input(self._batch_mask_name, dev, did, self._batch_mask_dtype, [n, total], self._ptr(buf["mask"]))
        if sig.position_ids:
            b.bind_input(sig.position_ids, dev, did, d.pos_dtype, sig.position_shape(1, batch=n), self._ptr(buf["pos"]))
        b.bind_output(sig.logits, dev, did, d.logits_dtype, [n, 1, d.vocab], self._ptr(buf["logits"]))
        if self.kv_mode == "shared":
            past_shape = present_shape = sig.kv_shape(buf["length"], batch=n)
            past_set = present_set = 0
        else:
            past_shape, present_shape = sig.kv_shape(lmax, batch=n), sig.kv_shape(total, batch=n)
            past_set, present_set = 0, 1
        for i, block in enumerate(sig.kv):
            for j, (past, present) in enumerate(block.pairs()):
                b.bind_input(past, dev, did, d.kv_dtype, past_shape, self._ptr(buf["kv"][past_set][i][j]))
                b.bind_output(present, dev, did, d.kv_dtype, present_shape, self._ptr(buf["kv"][present_set][i][j]))
        return b

    def time_batch_step(self, kv_lens: Any, reps: int) -> np.ndarray:
        """Float64 ms per repetition of ONE batched decode step, B = len(kv_lens) rows with those past
        lengths (ragged: padded to max(kv_lens), mask zero on the padding); timed region = the engine call."""
        return self._timed_runs(self.prepare_batch(kv_lens), reps, max(int(v) for v in kv_lens), 1)

    def batch_step_logits(self, kv_lens: Any, tokens: np.ndarray, kv_rows: Any) -> np.ndarray:
        """Run one batched step on given contents and return the logits [B, vocab] (correctness checks).

        ``tokens``: each row's new token (ids [B] or embeddings [B, H]); ``kv_rows[i][block][j]``: row i's
        past for that block's j-th KV tensor as returned by ``present`` ([1, kv, L_i, D] / fused [2, ...])."""
        if self._batch_mask_name is None:
            raise InputError("this model has no attention_mask: a ragged batch cannot be masked", path=str(self.path),
                             field="attention_mask", expected="a decoder with an attention_mask input")
        lens = self._check_batch(kv_lens)
        binding = self.prepare_batch(lens)
        buf, d, sig = self._batch, self.dims, self.signature
        assert buf is not None
        n = len(lens)
        length = buf["length"] if self.kv_mode == "shared" else max(lens)
        fused = sig.kv_layout == "fused"
        for i_block in range(d.blocks):
            for j in range(len(sig.kv[0].pairs())):
                flat = buf["kv"][0][i_block][j]
                host = flat if isinstance(flat, np.ndarray) else flat.numpy()
                shape = sig.kv_shape(length, batch=n)
                view = host[: int(np.prod(shape))].reshape(shape)
                for row, slot in enumerate(self._row_slots(lens)):
                    src = np.asarray(kv_rows[row][i_block][j])
                    if fused:
                        view[:, row, :, slot] = src[:, 0]
                    else:
                        view[row, :, slot] = src[0]
                if not isinstance(flat, np.ndarray):
                    flat.update_inplace(host)
        vals = np.ascontiguousarray(tokens, dtype=d.token_dtype).reshape(-1)
        buf["host"]["tokens"][: vals.size] = vals
        if self._on_device:
            buf["tokens"].update_inplace(buf["host"]["tokens"])
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001 - one line instead of ORT's traceback
            raise self._run_error(exc, max(lens), 1) from None
        logits = buf["logits"] if isinstance(buf["logits"], np.ndarray) else buf["logits"].numpy()
        return np.array(logits[: n * d.vocab]).reshape(n, d.vocab)

    def close(self) -> None:
        self._binding = None
        self.session = None
        self._batch = None


def _kv_views(pool: np.ndarray, cap: int, n_sets: int, blocks: int, n_kv: int) -> list[list[tuple[np.ndarray, ...]]]:
    """kv[set][block][j] as consecutive ``cap``-long views of one pool: a single mapping that huge pages can
    back whole (separate 2-3 MB arrays are separate mappings a 2 MiB page rarely covers), as a serving
    engine's KV cache is one allocation."""
    views = iter(pool[i * cap:(i + 1) * cap] for i in range(n_sets * blocks * n_kv))
    return [[tuple(next(views) for _ in range(n_kv)) for _ in range(blocks)] for _ in range(n_sets)]


def _open(device: str, path: Path, *, threads: int = 0, inter_threads: int = 0, **options: Any) -> OrtRunner:
    options.pop("trt_options", None)  # TensorRT-library options: not this runner's
    return OrtRunner(path, device, intra_op_threads=threads, inter_op_threads=inter_threads, **options)


def open_cpu(path: Path, **options: Any) -> OrtRunner:
    """Backend registry factory "ort-cpu" (engines/backends.py)."""
    return _open("cpu", path, **options)


def open_cuda(path: Path, **options: Any) -> OrtRunner:
    """Backend registry factory "ort-cuda"."""
    return _open("cuda", path, **options)


def open_trt(path: Path, **options: Any) -> OrtRunner:
    """Backend registry factory "ort-trt" (ONNX Runtime's TensorRT execution provider)."""
    return _open("trt", path, **options)
