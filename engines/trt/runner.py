"""TensorRT Runner: per-position timing and a real prefill + decode loop on one engine.

The engine has a decode and a prefill optimization profile (loader.decoder_profiles); the runner
keeps one execution context per profile and runs each step on the context whose profile fits it
best (loader.choose_profile: S = 1 on the decode profile, prompts on the prefill one). An engine
with a single profile (e.g. built by trtexec) runs everything on it. Each context is created with the
default STATIC allocation strategy (its own scratch memory, one fixed address), so graphs stay valid.

Buffers are allocated once at the profiles' maximum; each call sets the input shapes and tensor
addresses and enqueues ``execute_async_v3`` on a non-default, non-blocking stream, timed by CUDA
events around the enqueue only. Every copy and memset goes to that stream (a non-blocking stream
does not wait for the legacy default stream); ``generate`` stages its per-step inputs and logits in
pinned host memory so they really are asynchronous. With ``use_cuda_graph`` each
(past_len, new_tokens) gets a CUDA graph captured after one enqueue at that shape (TensorRT needs
one enqueue after a shape change before capture) and uploaded before its first timed launch; a
shape that cannot be captured falls back to plain enqueue, as trtexec does, and is recorded in
``graph_fallbacks``. The first ``generate`` is preceded by an untimed warm-up request, so lazy
kernel loading is not billed to the first replayed request's TTFT.

Every binding comes from the engine's DecoderSignature (engines/trt/loader.py plans the shapes per step):
token ids or embeddings, the attention mask (all ones, bound at past + S), position ids when the model has
them, and its KV pairs by their own names. KV cache: two buffers per past/present tensor, both sized for
``max_past_len + max_prefill_len`` tokens. A present tensor [1, kv_heads, past+S, head_dim] laid out contiguously is exactly the past
tensor of the next step, so ``generate`` swaps the two buffers' roles instead of copying.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trt_latency.engines import cuda
from trt_latency.engines.base import Closing
from trt_latency.engines.trt import loader
from trt_latency.errors import BackendUnavailable, InputError, TrtLatencyError

if TYPE_CHECKING:
    import tensorrt as trt

    from trt_latency.engines.base import GenerateResult
    from trt_latency.engines.signature import DecoderSignature

# One KV set: past name -> its two buffers, whose past / present roles swap between steps.
KvSet = Mapping[str, tuple[cuda.DeviceBuffer, cuda.DeviceBuffer]]

_EMBED_TABLE_ROWS = 4096  # host stand-in for the token embedding table used by generate()


def _numpy_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    import tensorrt as trt

    table: dict[trt.DataType, type[np.generic]] = {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT32: np.int32,
        trt.DataType.INT64: np.int64,
        trt.DataType.INT8: np.int8,
        trt.DataType.UINT8: np.uint8,
        trt.DataType.BOOL: np.bool_,
    }
    if dtype not in table:
        raise BackendUnavailable(f"engine I/O dtype {dtype} has no numpy equivalent (bf16/fp8 I/O unsupported)")
    return np.dtype(table[dtype])


class _Tensor:
    """One engine I/O tensor: name, numpy dtype, max shape and its device buffer(s)."""

    def __init__(self, name: str, dtype: np.dtype[Any], max_shape: tuple[int, ...],
                 min_shape: tuple[int, ...] = ()) -> None:
        self.name = name
        self.dtype = dtype
        self.max_shape = max_shape
        self.min_shape = min_shape
        self.nbytes = int(np.prod(max_shape, dtype=np.int64)) * dtype.itemsize


class TrtRunner(Closing):
    """Runner (ARCHITECTURE.md contract) over a deserialized TensorRT engine, bound by its DecoderSignature."""

    backend = "tensorrt"

    def __init__(
        self,
        runtime: trt.Runtime,
        engine: trt.ICudaEngine,
        *,
        source: str | os.PathLike[str] = "<engine>",
        use_cuda_graph: bool = False,
        seed: int = 0,
        graph_cache_size: int = 64,
        device_id: int = 0,
        signature: DecoderSignature | None = None,
        kv_mode: str = "auto",
        io: Mapping[str, str] | str | None = None,
        dims: Mapping[str, int] | str | None = None,
    ) -> None:
        """``signature``: the one read from the ONNX the engine was built from; without it, the roles are read
        from the engine's own I/O tensors (``io`` / ``dims`` as for the ONNX, configs beside ``source``)."""
        import tensorrt as trt

        cuda.require_device(device_id)
        self.source = str(source)
        self.device = cuda.device_name(device_id)
        self.use_cuda_graph = use_cuda_graph
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = engine
        self._graph_cache_size = graph_cache_size
        self._graphs: OrderedDict[tuple[int, int], cuda.CudaGraph] = OrderedDict()
        # (past_len, new_tokens) whose capture failed -> why; those shapes run as plain enqueues.
        self.graph_fallbacks: dict[tuple[int, int], str] = {}
        self._buffers: list[cuda.Closing] = []
        self._contexts: list[Any] = []
        self._active = 0
        self._warmed = False
        self._closed = False
        try:
            if signature is None:
                ins, outs = loader.engine_tensors(engine)
                signature = loader.engine_signature(self.source, ins, outs, io=io, dims=dims)
            self.signature = signature
            self.kv_mode = loader.tensorrt_kv_mode(signature, kv_mode)
            self.token_input = signature.token_input
            self._setup(trt, engine, seed)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt: Any, engine: trt.ICudaEngine, seed: int) -> None:
        sig = self.signature
        self._stream = cuda.Stream()  # first: profiles are selected and buffers filled on it
        self._timer = cuda.EventTimer()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        # Which axis carries what (batch, S, past_len, past_len + S), from the signature's roles.
        self._layouts = loader.input_layouts(
            sig, {n: loader.dims_tuple(engine.get_tensor_shape(n)) for n in input_names})

        # Per profile: its S and past_len ranges (to pick one per step) and its input extremes.
        num_profiles = int(engine.num_optimization_profiles)
        ranges: list[loader.ProfileRange] = []
        profile_max: list[dict[str, tuple[int, ...]]] = []
        inputs: dict[str, _Tensor] = {}
        for p in range(num_profiles):
            shapes = {n: loader.ProfileShape(*(loader.dims_tuple(d) for d in engine.get_tensor_profile_shape(n, p)))
                      for n in input_names}
            ranges.append(loader.profile_range(sig, self._layouts, shapes))
            profile_max.append({n: sh.max for n, sh in shapes.items()})
            for n, (lo, _opt, hi) in shapes.items():
                t = inputs.get(n)
                if t is None:
                    inputs[n] = _Tensor(n, _numpy_dtype(engine.get_tensor_dtype(n)), hi, lo)
                else:
                    t.max_shape = tuple(max(a, b) for a, b in zip(t.max_shape, hi, strict=True))
                    t.min_shape = tuple(min(a, b) for a, b in zip(t.min_shape, lo, strict=True))
        for t in inputs.values():
            t.nbytes = int(np.prod(t.max_shape, dtype=np.int64)) * t.dtype.itemsize
        self._ranges = ranges

        # One context per profile (profile p selected on context p), used one at a time on one stream.
        for p in range(num_profiles):
            context = engine.create_execution_context()
            if context is None:
                raise TrtLatencyError(f"{self.source}: TensorRT could not create an execution context "
                                      f"for profile {p} (out of memory?)")
            self._contexts.append(context)
            if p > 0 and not context.set_optimization_profile_async(p, self._stream.ptr):
                raise TrtLatencyError(f"{self.source}: TensorRT could not select optimization profile {p}")
        self._stream.synchronize()
        self._context = self._contexts[0]

        # Output max shapes: every input at its profile max on each context; TensorRT infers the rest.
        outputs: dict[str, _Tensor] = {}
        for p, context in enumerate(self._contexts):
            self._context = context
            for n, shape in profile_max[p].items():
                self._set_shape(n, shape)
            unspecified = context.infer_shapes()
            if unspecified:
                raise TrtLatencyError(f"{self.source}: engine inputs without a shape: {', '.join(unspecified)}")
            for name in names:
                if name in inputs:
                    continue
                shape = loader.dims_tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise TrtLatencyError(f"{self.source}: output {name} has no static max shape {shape}")
                t = outputs.get(name)
                if t is None:
                    outputs[name] = _Tensor(name, _numpy_dtype(engine.get_tensor_dtype(name)), shape)
                else:
                    t.max_shape = tuple(max(a, b) for a, b in zip(t.max_shape, shape, strict=True))
        for t in outputs.values():
            t.nbytes = int(np.prod(t.max_shape, dtype=np.int64)) * t.dtype.itemsize
        self._context = self._contexts[0]
        self._inputs = inputs
        self._outputs = outputs

        token = inputs[sig.token_name]
        seq_axis = self._layouts[sig.token_name].index("seq")
        self.hidden = sig.hidden or 1  # a token-id model needs no hidden size; 1 keeps the Runner contract's int
        self.max_prefill_len = int(token.max_shape[seq_axis])
        self.max_new_tokens = self.max_prefill_len  # the name the ORT runner uses
        self.num_blocks = sig.blocks
        self.max_past_len = max(r.past[2] for r in ranges)
        self.min_past_len = min(r.past[0] for r in ranges)
        self.kv_heads = sig.kv_heads
        self.head_dim = sig.head_dim
        self.vocab = int(outputs[sig.logits].max_shape[-1])
        # Which role each profile plays, for reports: "decode" when it only takes S = 1.
        self.profiles = ["decode" if r.seq[2] == 1 else "prefill" for r in ranges]

        self._addr: dict[str, cuda.DeviceBuffer] = {}
        # KV: past name -> (buffer A, buffer B), each big enough for past + S tokens; A starts as the past.
        self._kv: dict[str, tuple[cuda.DeviceBuffer, cuda.DeviceBuffer]] = {}
        self._present: dict[str, str] = {}  # past name -> its present output
        rng = np.random.default_rng(seed)
        stream = self._stream
        for block in sig.kv:
            for past, present in block.pairs():
                pin, pout = inputs[past], outputs.get(present)
                pair = (self._alloc(max(pin.nbytes, pout.nbytes if pout else 0)),
                        self._alloc(max(pin.nbytes, pout.nbytes if pout else 0)))
                # Realistic magnitudes so attention does ordinary work (no NaN/denormal paths).
                _fill_random(pair[0], pin.dtype, rng, stream)
                self._kv[past] = pair
                if pout is not None:
                    self._present[past] = present
        kv_names = set(self._kv) | set(self._present.values())
        for name, t in {**inputs, **outputs}.items():
            if name not in kv_names:
                self._addr[name] = self._alloc(t.nbytes)
        ids_model = sig.token_input == "input_ids"
        if not ids_model:
            _fill_random(self._addr[sig.token_name], token.dtype, rng, stream, scale=1 / np.sqrt(self.hidden))
            rows = min(self.vocab, _EMBED_TABLE_ROWS)
            self._embed_table: np.ndarray | None = (
                rng.standard_normal((rows, self.hidden)) / np.sqrt(self.hidden)).astype(token.dtype)
        else:
            self._embed_table = None
            self._addr[sig.token_name].memset(0, stream=stream)  # valid ids (0) until a request writes its own
        self._rng = rng
        # The attention mask attends to every position: ones over its longest length, bound by prefix.
        self._mask_ones: np.ndarray | None = None
        if sig.attention_mask:
            mask = inputs[sig.attention_mask]
            self._mask_ones = np.ones(int(np.prod(mask.max_shape, dtype=np.int64)), dtype=mask.dtype)
            self._addr[sig.attention_mask].copy_from_host(self._mask_ones, stream=stream)
        # Pinned staging for generate()/time_step(): per-step copies are truly async on the stream.
        logits = outputs[sig.logits]
        width = () if ids_model else (self.hidden,)
        self._pinned_tokens = self._pin(token.dtype, (1, self.max_prefill_len, *width))
        # Positions [B, S], or M-RoPE's [3, B, S] (text tokens: the same position in every row), staged flat so
        # the first rows * S values are the step's C-contiguous [rows, 1, S] array.
        self._position_rows = 1
        self._pinned_positions: np.ndarray | None = None
        if sig.position_ids:
            pos = inputs[sig.position_ids]
            self._position_rows = int(np.prod(pos.max_shape[:-2], dtype=np.int64))
            self._pinned_positions = self._pin(pos.dtype, (self._position_rows * self.max_prefill_len,))
        self._pinned_logits = self._pin(logits.dtype, (self.vocab,))
        stream.synchronize()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_onnx(
        cls,
        path: str | os.PathLike[str],
        *,
        max_past_len: int | None = None,
        max_new_tokens: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        opt_past_len: int | None = None,
        opt_prefill_len: int | None = None,
        min_past_len: int = 0,
        workspace_bytes: int | None = None,
        use_cuda_graph: bool = False,
        rebuild: bool = False,
        device_id: int = 0,
        seed: int = 0,
        kv_mode: str = "auto",
        io: Mapping[str, str] | str | None = None,
        dims: Mapping[str, int] | str | None = None,
    ) -> TrtRunner:
        """Build (or reuse from the cache) an engine for the decoder at ``path`` (any exporter the
        DecoderSignature reads: ours, optimum, torch.onnx, the genai builder).

        ``max_past_len`` / ``max_new_tokens`` (the profile max of S, i.e. the longest prefill)
        default to the tier's max_past_len / max_prefill_len stored in the ONNX metadata, else the model's
        context length from its config; never beyond the model's own limit.
        ``min_past_len`` 0 lets prefill run with an empty past; 1 is the fallback for a TensorRT
        that rejects empty-tensor profiles (prefill timing then needs past_len >= 1).
        ``opt_past_len`` / ``opt_prefill_len``: where the decode / prefill profiles are tuned;
        ``workspace_bytes``: TensorRT's workspace limit (part of the cache key).
        ``kv_mode`` / ``io`` / ``dims``: as for the ONNX Runtime runners (engines/signature.py); kv_mode
        shared is refused (:func:`loader.tensorrt_kv_mode`).
        """
        from trt_latency.engines.signature import read_signature

        sig = read_signature(path, io=io, dims=dims)
        loader.tensorrt_kv_mode(sig, kv_mode)  # refuse before minutes of engine build
        loader.import_tensorrt()
        cuda.require_device(device_id)
        past, prefill = _profile_limits(Path(path), sig, max_past_len, max_new_tokens)
        cached = loader.build_or_load_cached(
            path, sig, max_past_len=past, max_prefill_len=prefill, opt_past_len=opt_past_len,
            opt_prefill_len=opt_prefill_len, min_past_len=min_past_len, cache_dir=cache_dir, rebuild=rebuild,
            workspace_bytes=workspace_bytes, device_id=device_id,
        )
        runtime, engine = loader.deserialize_engine(cached.data, source=cached.path)
        return cls(runtime, engine, source=cached.path, use_cuda_graph=use_cuda_graph, device_id=device_id,
                   seed=seed, signature=sig, kv_mode=kv_mode)

    @classmethod
    def from_engine(
        cls,
        path: str | os.PathLike[str],
        *,
        use_cuda_graph: bool = False,
        device_id: int = 0,
        seed: int = 0,
        max_past_len: int | None = None,
        max_new_tokens: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        kv_mode: str = "auto",
        io: Mapping[str, str] | str | None = None,
        dims: Mapping[str, int] | str | None = None,
    ) -> TrtRunner:
        """Load a prebuilt serialized engine (``--engine``); its profile fixes the limits.

        The roles come from the engine's I/O tensors (``io`` / ``dims`` / configs beside the engine as
        for an ONNX). ``max_past_len`` / ``max_new_tokens``, when given, must fit inside the engine's profile.
        ``cache_dir`` is accepted for symmetry with :meth:`from_onnx` and unused (nothing is built).
        """
        del cache_dir
        cuda.require_device(device_id)
        runtime, engine = loader.load_engine_file(path)
        runner = cls(runtime, engine, source=path, use_cuda_graph=use_cuda_graph, device_id=device_id, seed=seed,
                     kv_mode=kv_mode, io=io, dims=dims)
        for name, wanted, have in (("max_past_len", max_past_len, runner.max_past_len),
                                   ("max_new_tokens", max_new_tokens, runner.max_prefill_len)):
            if wanted is not None and wanted > have:
                runner.close()
                raise InputError("the engine's optimization profile is smaller than requested", path=path,
                                 field=name, expected=f"<= {have}", got=wanted)
        return runner

    # ------------------------------------------------------------------ plumbing

    def _alloc(self, nbytes: int) -> cuda.DeviceBuffer:
        buf = cuda.DeviceBuffer(nbytes)
        self._buffers.append(buf)
        return buf

    @property
    def warmed(self) -> bool:
        """True once :meth:`warm_up` has run (lazily loaded kernels are ready)."""
        return self._warmed

    @property
    def own_kv(self) -> KvSet:
        """The runner's own KV set (past name -> buffers A, B), the one :meth:`generate` steps on."""
        return self._kv

    @property
    def pasts_without_present(self) -> list[str]:
        """Past inputs whose present output the engine lacks (sorted): their KV cannot grow step by step."""
        return sorted(set(self._kv) - set(self._present))

    def alloc_kv(self) -> KvSet:
        """Another KV set sized as the runner's own (past name -> buffers A, B): a serving slot's
        (engines/trt/slots.py), so its KV stays put between steps. Freed by :meth:`close`."""
        return {past: (self._alloc(a.nbytes), self._alloc(b.nbytes)) for past, (a, b) in self._kv.items()}

    def _pin(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        host = cuda.PinnedHostBuffer(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        self._buffers.append(host)
        return host.array(dtype, shape)

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise InputError("TensorRT rejected the input shape", path=self.source, field=name,
                             expected="a shape inside the engine's optimization profile", got=shape)

    def check_position(self, past_len: int, new_tokens: int) -> None:
        """InputError naming the profile unless a step of ``new_tokens`` after ``past_len`` fits the engine."""
        if not self.min_past_len <= past_len <= self.max_past_len:
            raise InputError(field="past_len", expected=f"{self.min_past_len}..{self.max_past_len} "
                             f"(the engine profile)", got=past_len)
        if not 1 <= new_tokens <= self.max_prefill_len:
            raise InputError(field="new_tokens", expected=f"1..{self.max_prefill_len} (the engine profile)",
                             got=new_tokens)
        if loader.choose_profile(self._ranges, past_len, new_tokens) < 0:
            raise InputError(field="new_tokens", expected="a (past_len, new_tokens) inside one of the engine's "
                             f"profiles {[tuple(r) for r in self._ranges]}", got=(past_len, new_tokens))

    def _bind(self, past_len: int, new_tokens: int, swap: bool = False, kv: KvSet | None = None) -> None:
        """Pick the profile's context for (past_len, new_tokens); set its shapes (loader.step_shapes over the
        signature's axes) and every tensor address (``swap``: KV roles; ``kv``: a set from :meth:`alloc_kv`
        in place of the runner's own)."""
        self._active = loader.choose_profile(self._ranges, past_len, new_tokens)
        self._context = self._contexts[self._active]
        for name, shape in loader.step_shapes(self._layouts, past_len, new_tokens).items():
            self._set_shape(name, shape)
        for past, (a, b) in (self._kv if kv is None else kv).items():
            past_buf, present_buf = (b, a) if swap else (a, b)
            self._set_address(past, past_buf)
            present = self._present.get(past)
            if present is not None:
                self._set_address(present, present_buf)
        for name, buf in self._addr.items():
            self._set_address(name, buf)

    def _set_address(self, name: str, buf: cuda.DeviceBuffer) -> None:
        if not self._context.set_tensor_address(name, buf.ptr):
            raise TrtLatencyError(f"{self.source}: set_tensor_address failed for {name}")

    def _write_positions(self, past_len: int, new_tokens: int) -> None:
        # Pinned staging: the caller syncs the stream before the next write reuses it.
        name = self.signature.position_ids
        if name is None or self._pinned_positions is None:
            return  # no position input (genai: rotary inside GroupQueryAttention, from the mask)
        rows = self._position_rows
        positions = self._pinned_positions[: rows * new_tokens].reshape(rows, new_tokens)
        positions[:] = np.arange(past_len, past_len + new_tokens, dtype=positions.dtype)
        self._addr[name].copy_from_host(positions, stream=self._stream)

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise TrtLatencyError(f"{self.source}: execute_async_v3 failed (see the TensorRT log above)")

    def _graph(self, past_len: int, new_tokens: int) -> cuda.CudaGraph | None:
        """The CUDA graph for this shape (captured on first use); None when it cannot be captured."""
        key = (past_len, new_tokens)
        if key in self.graph_fallbacks:
            return None
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = cuda.CudaGraph(self._stream, self._enqueue)
            except cuda.CaptureFailed as exc:
                # trtexec's rule: an engine (or shape) that cannot be captured runs as plain enqueues.
                if not self.graph_fallbacks:
                    print(f"trt-latency: {self.source}: CUDA graph capture failed at past_len={past_len}, "
                          f"new_tokens={new_tokens} ({exc}); timing plain enqueues for such shapes",
                          file=sys.stderr)
                self.graph_fallbacks[key] = str(exc)
                self._stream.synchronize()
                return None
            self._graphs[key] = graph
            while len(self._graphs) > self._graph_cache_size:
                _, old = self._graphs.popitem(last=False)
                old.close()
        else:
            self._graphs.move_to_end(key)
        return graph

    def warm_up(self, prompt_len: int | None = None) -> None:
        """One untimed request (prefill of ``prompt_len`` tokens, default the prefill profile's opt,
        then one decode step) through generate's path: lazily loaded kernels, both profiles'
        contexts and the pinned staging are ready before anything is timed."""
        if prompt_len is None:
            prefill = [r for r in self._ranges if r.seq[2] > 1]
            prompt_len = prefill[0].seq[1] if prefill else 1
        prompt = max(1, min(int(prompt_len), self.max_prefill_len))
        self._run_request(self.prompt_values(np.zeros((1, prompt), dtype=np.int64)),
                          2 if prompt <= self.max_past_len else 1)
        self._warmed = True

    # ------------------------------------------------------------------ Runner contract

    def time_step(self, past_len: int, new_tokens: int, reps: int) -> np.ndarray:
        """GPU ms per repetition of one engine call at (past_len, new_tokens), CUDA-event timed."""
        self.check_position(past_len, new_tokens)
        if reps < 1:
            raise InputError(field="reps", expected="an integer >= 1", got=reps)
        self._bind(past_len, new_tokens)
        self._write_positions(past_len, new_tokens)
        self._enqueue()  # first enqueue after a shape change; required before graph capture
        self._stream.synchronize()
        stream = self._stream
        graph = self._graph(past_len, new_tokens) if self.use_cuda_graph else None
        work: Any = self._enqueue if graph is None else (lambda: graph.launch(stream))
        times = np.empty(reps, dtype=np.float64)
        for r in range(reps):
            times[r] = self._timer.time_ms(stream, work)
        return times

    def prompt_values(self, prompt: np.ndarray) -> np.ndarray:
        """``prompt`` as the engine's token input: ids [1, S] for a token-id engine, embeddings [1, S, H] for an
        embeddings one. Ids for an embeddings engine are rows of the runner's random embedding table;
        embeddings for a token-id engine become S random ids (only the length matters for timing)."""
        arr = np.asarray(prompt)
        dtype = self._inputs[self.signature.token_name].dtype
        ids = arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer)
        if not ids and (arr.ndim != 3 or (self._embed_table is not None and arr.shape[2] != self.hidden)):
            raise InputError(field="inputs_embeds", expected=f"shape [1, S, {self.hidden}] (or input_ids [1, S])",
                             got=arr.shape)
        if arr.shape[0] != 1 or arr.shape[1] < 1:
            raise InputError(field="inputs_embeds", expected="one prompt of at least one token", got=arr.shape)
        if self._embed_table is None:
            values = arr if ids else self._rng.integers(0, self.vocab, arr.shape[:2])
            return np.ascontiguousarray(values, dtype=dtype)
        if ids:
            arr = self._embed_table[arr[0] % self._embed_table.shape[0]][None]
        return np.ascontiguousarray(arr, dtype=dtype)

    def generate(self, inputs_embeds: np.ndarray, output_tokens: int) -> GenerateResult:
        """Prefill, then ``output_tokens - 1`` greedy decode steps, wall-clock timed on the host.

        Each step reads the last token's logits back, takes the argmax and feeds that token back: its id
        (token-id engine) or its row of a fixed random embedding table (embeddings engine), so the loop pays
        what a serving loop pays: H2D input, enqueue, D2H logits, sync. The first call is preceded by
        :meth:`warm_up` at the same prompt length (untimed).
        """
        x = self.prompt_values(inputs_embeds)
        prompt = int(x.shape[1])
        if output_tokens < 1:
            raise InputError(field="output_tokens", expected="an integer >= 1", got=output_tokens)
        self.check_position(0, prompt)
        last_past = prompt + output_tokens - 2
        if output_tokens > 1 and last_past > self.max_past_len:
            raise InputError(field="output_tokens", expected=f"prompt + output_tokens - 2 <= {self.max_past_len}",
                             got=output_tokens)
        if not self._warmed:
            self.warm_up(prompt)
        return self._run_request(x, output_tokens)

    def greedy_step(self, x: np.ndarray, past_len: int, swap: bool, kv: KvSet) -> int:
        """One engine call of the token input ``x`` ([1, S] or [1, S, H], as :meth:`prompt_values` makes it)
        after ``past_len`` positions held in ``kv`` (``swap``: its roles, as for :meth:`_bind`); the argmax of
        the last position's logits. The steps of :meth:`_run_request`, on a KV set of the caller's."""
        sig = self.signature
        new_tokens = int(x.shape[1])
        self._bind(past_len, new_tokens, swap, kv)
        staged = self._pinned_tokens[:, :new_tokens]
        staged[:] = x
        self._addr[sig.token_name].copy_from_host(staged, stream=self._stream)
        self._write_positions(past_len, new_tokens)
        self._enqueue()
        row_bytes = self.vocab * self._outputs[sig.logits].dtype.itemsize
        logits = self._pinned_logits
        self._addr[sig.logits].copy_to_host(logits, offset=(new_tokens - 1) * row_bytes,
                                            stream=self._stream)  # syncs the stream
        return int(np.argmax(logits))

    def _run_request(self, x: np.ndarray, output_tokens: int) -> GenerateResult:
        from trt_latency.engines.base import GenerateResult

        sig = self.signature
        prompt = int(x.shape[1])
        logits_t = self._outputs[sig.logits]
        row_bytes = self.vocab * logits_t.dtype.itemsize
        logits = self._pinned_logits
        tokens_buf = self._addr[sig.token_name]
        logits_buf = self._addr[sig.logits]
        staged = self._pinned_tokens
        table = self._embed_table
        stream = self._stream

        start = time.perf_counter()
        swap = False
        self._bind(0, prompt, swap)
        staged[:, :prompt] = x
        tokens_buf.copy_from_host(staged[:, :prompt], stream=stream)
        self._write_positions(0, prompt)
        self._enqueue()
        logits_buf.copy_to_host(logits, offset=(prompt - 1) * row_bytes, stream=stream)  # syncs the stream
        ttft_ms = (time.perf_counter() - start) * 1e3

        token = int(np.argmax(logits))
        tokens = [token]
        step_ms: list[float] = []
        past_len = prompt
        for _ in range(output_tokens - 1):
            t0 = time.perf_counter()
            swap = not swap  # this step's past is the previous step's present
            self._bind(past_len, 1, swap)
            staged[0, 0] = token if table is None else table[token % table.shape[0]]
            tokens_buf.copy_from_host(staged[:, :1], stream=stream)
            self._write_positions(past_len, 1)
            self._enqueue()
            logits_buf.copy_to_host(logits, stream=stream)
            token = int(np.argmax(logits))
            step_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(token)
            past_len += 1
        total_ms = (time.perf_counter() - start) * 1e3
        return GenerateResult(ttft_ms=ttft_ms, total_ms=total_ms, step_ms=step_ms, tokens=tokens)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine once on host arrays; every output back on the host (for accuracy checks).

        ``feeds`` holds every engine input (token input, mask / positions if any, past KV) in the engine's
        shapes, by the engine's own names.
        """
        sig = self.signature
        token = np.asarray(feeds[sig.token_name])
        past0 = np.asarray(feeds[sig.kv[0].past_key])
        past_len = int(past0.shape[self._layouts[sig.kv[0].past_key].index("past")])
        new_tokens = int(token.shape[self._layouts[sig.token_name].index("seq")])
        self.check_position(past_len, new_tokens)
        self._bind(past_len, new_tokens)
        held: list[np.ndarray] = []
        for name, value in feeds.items():
            t = self._inputs.get(name)
            if t is None:
                raise InputError("not an engine input", field=name, expected=", ".join(sorted(self._inputs)))
            arr = np.ascontiguousarray(value, dtype=t.dtype)
            buf = self._kv[name][0] if name in self._kv else self._addr[name]
            buf.copy_from_host(arr, stream=self._stream)
            held.append(arr)
        self._enqueue()
        results: dict[str, np.ndarray] = {}
        present_of = {present: past for past, present in self._present.items()}
        for name, t in self._outputs.items():
            shape = loader.dims_tuple(self._context.get_tensor_shape(name))
            buf = self._kv[present_of[name]][1] if name in present_of else self._addr[name]
            results[name] = buf.copy_to_host(np.empty(shape, dtype=t.dtype), stream=self._stream)
        mask = self.signature.attention_mask
        if mask is not None and mask in feeds and self._mask_ones is not None:
            self._addr[mask].copy_from_host(self._mask_ones, stream=self._stream)  # timing attends to everything
            self._stream.synchronize()
        del held
        return results

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
        stream: cuda.Stream | None = getattr(self, "_stream", None)  # absent if setup failed early
        timer: cuda.EventTimer | None = getattr(self, "_timer", None)
        if stream is not None:
            stream.synchronize()
        if timer is not None:
            timer.close()
        # Contexts before the buffers they point at and before the engine.
        self.__dict__.pop("_context", None)
        self._contexts.clear()
        for buf in self._buffers:
            buf.close()
        self._buffers.clear()
        if stream is not None:
            stream.close()


def _fill_random(buf: cuda.DeviceBuffer, dtype: np.dtype[Any], rng: np.random.Generator, stream: cuda.Stream,
                 scale: float = 1.0, chunk_bytes: int = 16 << 20) -> None:
    """Fill a device buffer with N(0, scale) values, tiling one bounded host chunk (huge KV caches).

    On the runner's stream: the stream is non-blocking, so a stream-less copy could race with work
    on it. The pageable chunk is reused, so each copy is synchronized before the next.
    """
    count = max(1, min(buf.nbytes, chunk_bytes) // dtype.itemsize)
    chunk = (rng.standard_normal(count) * scale).astype(dtype)
    offset = 0
    while offset < buf.nbytes:
        part = chunk[: (buf.nbytes - offset) // dtype.itemsize]
        if part.nbytes == 0:
            break
        buf.copy_from_host(part, offset=offset, stream=stream)
        stream.synchronize()
        offset += part.nbytes


def _profile_limits(path: Path, sig: DecoderSignature, max_past_len: int | None, max_new_tokens: int | None
                    ) -> tuple[int, int]:
    """(max_past_len, max_prefill_len) for the profile: arguments, else the model's metadata or config."""
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    from trt_latency.engines.export import model_metadata

    prefill = model_metadata(path).get("max_prefill_len") if max_new_tokens is None else max_new_tokens
    return loader.profile_limits(sig, max_past_len, prefill)
