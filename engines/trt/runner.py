"""TensorRT Runner: per-position timing and a real prefill + decode loop on one engine.

Buffers are allocated once at the profile maximum; each call sets the input shapes and tensor
addresses and enqueues ``execute_async_v3`` on a non-default stream, timed by CUDA events around
the enqueue only. With ``use_cuda_graph`` each (past_len, new_tokens) gets a CUDA graph captured
after one warm-up enqueue at that shape (TensorRT needs one enqueue after a shape change before
capture); the context is created with the default STATIC allocation strategy, so its scratch memory
keeps one address and the graphs stay valid.

KV cache: two buffers per past/present tensor, both sized for ``max_past_len + max_prefill_len``
tokens. A present tensor [1, kv_heads, past+S, head_dim] laid out contiguously is exactly the past
tensor of the next step, so ``generate`` swaps the two buffers' roles instead of copying.
"""

from __future__ import annotations

import os
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
    """Runner (ARCHITECTURE.md contract) over a deserialized TensorRT engine."""

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
    ) -> None:
        import tensorrt as trt

        cuda.require_device(device_id)
        self.source = str(source)
        self.device = cuda.device_name(device_id)
        self.use_cuda_graph = use_cuda_graph
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = engine
        self._graph_cache_size = graph_cache_size
        self._graphs: OrderedDict[tuple[int, int], cuda.CudaGraph] = OrderedDict()
        self._buffers: list[cuda.DeviceBuffer] = []
        self._closed = False
        try:
            self._setup(trt, engine, seed)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt: Any, engine: trt.ICudaEngine, seed: int) -> None:
        context = engine.create_execution_context()
        if context is None:
            raise TrtLatencyError(f"{self.source}: TensorRT could not create an execution context (out of memory?)")
        self._context = context

        inputs: dict[str, _Tensor] = {}
        outputs: dict[str, _Tensor] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = _numpy_dtype(engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
                inputs[name] = _Tensor(name, dtype, loader.dims_tuple(hi), loader.dims_tuple(lo))
            else:
                outputs[name] = _Tensor(name, dtype, ())
        for required, group in ((loader.INPUTS_EMBEDS, inputs), (loader.POSITION_IDS, inputs),
                                (loader.LOGITS, outputs)):
            if required not in group:
                raise InputError("engine lacks a decoder tensor", path=self.source, field=required,
                                 expected="inputs_embeds, position_ids, past_key_values.*, logits, present.*")
        self._inputs = inputs
        self._outputs = outputs

        embeds = inputs[loader.INPUTS_EMBEDS]
        self.hidden = int(embeds.max_shape[2])
        self.max_prefill_len = int(embeds.max_shape[1])
        self.max_new_tokens = self.max_prefill_len  # the name the ORT runner uses
        blocks = sorted({kv[1] for n in inputs if (kv := loader.parse_kv_name(n)) and kv[0] == "past"})
        if not blocks:
            raise InputError("engine has no past_key_values inputs", path=self.source,
                             field="past_key_values.0.key")
        self.num_blocks = len(blocks)
        past0 = inputs[loader.past_name(blocks[0], "key")]
        self.max_past_len = int(past0.max_shape[2])
        self.min_past_len = int(past0.min_shape[2])
        self.kv_heads = int(past0.max_shape[1])
        self.head_dim = int(past0.max_shape[3])
        self._blocks = blocks

        # Output max shapes: set every input to its profile max and let TensorRT infer.
        for t in inputs.values():
            self._set_shape(t.name, t.max_shape)
        unspecified = context.infer_shapes()
        if unspecified:
            raise TrtLatencyError(f"{self.source}: engine inputs without a shape: {', '.join(unspecified)}")
        for name, t in outputs.items():
            t.max_shape = loader.dims_tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in t.max_shape):
                raise TrtLatencyError(f"{self.source}: output {name} has no static max shape {t.max_shape}")
            t.nbytes = int(np.prod(t.max_shape, dtype=np.int64)) * t.dtype.itemsize
        self.vocab = int(outputs[loader.LOGITS].max_shape[-1])

        self._stream = cuda.Stream()
        self._timer = cuda.EventTimer()
        self._addr: dict[str, cuda.DeviceBuffer] = {}
        # KV pairs: index 0 = canonical past, 1 = canonical present; both fit past+S tokens.
        self._kv: dict[tuple[int, str], tuple[cuda.DeviceBuffer, cuda.DeviceBuffer]] = {}
        rng = np.random.default_rng(seed)
        for block in blocks:
            for kind in ("key", "value"):
                pin = inputs[loader.past_name(block, kind)]
                pout = outputs.get(loader.present_name(block, kind))
                size = max(pin.nbytes, pout.nbytes if pout else 0)
                pair = (self._alloc(size), self._alloc(size))
                # Realistic magnitudes so attention does ordinary work (no NaN/denormal paths).
                _fill_random(pair[0], pin.dtype, rng)
                self._kv[(block, kind)] = pair
        for name, t in {**inputs, **outputs}.items():
            if loader.parse_kv_name(name) is None:
                self._addr[name] = self._alloc(t.nbytes)
        _fill_random(self._addr[loader.INPUTS_EMBEDS], embeds.dtype, rng, scale=1 / np.sqrt(self.hidden))
        rows = min(self.vocab, _EMBED_TABLE_ROWS)
        self._embed_table = (rng.standard_normal((rows, self.hidden)) / np.sqrt(self.hidden)).astype(embeds.dtype)
        self._positions_dtype = inputs[loader.POSITION_IDS].dtype

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
        min_past_len: int = 0,
        use_cuda_graph: bool = False,
        rebuild: bool = False,
        device_id: int = 0,
        seed: int = 0,
    ) -> TrtRunner:
        """Build (or reuse from the cache) an engine for the exported decoder at ``path``.

        ``max_past_len`` / ``max_new_tokens`` (the profile max of S, i.e. the longest prefill)
        default to the tier's max_past_len / max_prefill_len stored in the ONNX metadata.
        ``min_past_len`` 0 lets prefill run with an empty past; 1 is the fallback for a TensorRT
        that rejects empty-tensor profiles (prefill timing then needs past_len >= 1).
        """
        loader.import_tensorrt()
        cuda.require_device(device_id)
        past, prefill = _profile_limits(Path(path), max_past_len, max_new_tokens)
        cached = loader.build_or_load_cached(
            path, max_past_len=past, max_prefill_len=prefill, opt_past_len=opt_past_len,
            min_past_len=min_past_len, cache_dir=cache_dir, rebuild=rebuild, device_id=device_id,
        )
        runtime, engine = loader.deserialize_engine(cached.data, source=cached.path)
        return cls(runtime, engine, source=cached.path, use_cuda_graph=use_cuda_graph, device_id=device_id,
                   seed=seed)

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
    ) -> TrtRunner:
        """Load a prebuilt serialized engine (``--engine``); its profile fixes the limits.

        ``max_past_len`` / ``max_new_tokens``, when given, must fit inside the engine's profile.
        ``cache_dir`` is accepted for symmetry with :meth:`from_onnx` and unused (nothing is built).
        """
        del cache_dir
        cuda.require_device(device_id)
        runtime, engine = loader.load_engine_file(path)
        runner = cls(runtime, engine, source=path, use_cuda_graph=use_cuda_graph, device_id=device_id, seed=seed)
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

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise InputError("TensorRT rejected the input shape", path=self.source, field=name,
                             expected="a shape inside the engine's optimization profile", got=shape)

    def _check_position(self, past_len: int, new_tokens: int) -> None:
        if not self.min_past_len <= past_len <= self.max_past_len:
            raise InputError(field="past_len", expected=f"{self.min_past_len}..{self.max_past_len} "
                             f"(the engine profile)", got=past_len)
        if not 1 <= new_tokens <= self.max_prefill_len:
            raise InputError(field="new_tokens", expected=f"1..{self.max_prefill_len} (the engine profile)",
                             got=new_tokens)

    def _bind(self, past_len: int, new_tokens: int, swap: bool = False) -> None:
        """Set shapes for (past_len, new_tokens) and every tensor address (``swap``: KV roles)."""
        self._set_shape(loader.INPUTS_EMBEDS, (1, new_tokens, self.hidden))
        self._set_shape(loader.POSITION_IDS, (1, new_tokens))
        past_shape = (1, self.kv_heads, past_len, self.head_dim)
        for (block, kind), (a, b) in self._kv.items():
            past_buf, present_buf = (b, a) if swap else (a, b)
            self._set_shape(loader.past_name(block, kind), past_shape)
            self._set_address(loader.past_name(block, kind), past_buf)
            if loader.present_name(block, kind) in self._outputs:
                self._set_address(loader.present_name(block, kind), present_buf)
        for name, buf in self._addr.items():
            self._set_address(name, buf)

    def _set_address(self, name: str, buf: cuda.DeviceBuffer) -> None:
        if not self._context.set_tensor_address(name, buf.ptr):
            raise TrtLatencyError(f"{self.source}: set_tensor_address failed for {name}")

    def _write_positions(self, past_len: int, new_tokens: int) -> np.ndarray:
        positions = np.arange(past_len, past_len + new_tokens, dtype=self._positions_dtype).reshape(1, -1)
        self._addr[loader.POSITION_IDS].copy_from_host(positions, stream=self._stream)
        return positions  # caller keeps it alive until the stream syncs

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise TrtLatencyError(f"{self.source}: execute_async_v3 failed (see the TensorRT log above)")

    def _graph(self, past_len: int, new_tokens: int) -> cuda.CudaGraph:
        key = (past_len, new_tokens)
        graph = self._graphs.get(key)
        if graph is None:
            graph = cuda.CudaGraph(self._stream, self._enqueue)
            self._graphs[key] = graph
            while len(self._graphs) > self._graph_cache_size:
                _, old = self._graphs.popitem(last=False)
                old.close()
        else:
            self._graphs.move_to_end(key)
        return graph

    # ------------------------------------------------------------------ Runner contract

    def time_step(self, past_len: int, new_tokens: int, reps: int) -> np.ndarray:
        """GPU ms per repetition of one engine call at (past_len, new_tokens), CUDA-event timed."""
        self._check_position(past_len, new_tokens)
        if reps < 1:
            raise InputError(field="reps", expected="an integer >= 1", got=reps)
        self._bind(past_len, new_tokens)
        positions = self._write_positions(past_len, new_tokens)
        self._enqueue()  # first enqueue after a shape change; required before graph capture
        self._stream.synchronize()
        del positions
        stream = self._stream
        if self.use_cuda_graph:
            graph = self._graph(past_len, new_tokens)
            work = lambda: graph.launch(stream)  # noqa: E731
        else:
            work = self._enqueue
        times = np.empty(reps, dtype=np.float64)
        for r in range(reps):
            times[r] = self._timer.time_ms(stream, work)
        return times

    def generate(self, inputs_embeds: np.ndarray, output_tokens: int) -> GenerateResult:
        """Prefill, then ``output_tokens - 1`` greedy decode steps, wall-clock timed on the host.

        Each step reads the last token's logits back, takes the argmax and feeds that token's row
        of a fixed random embedding table (the exported decoder takes embeddings, not ids), so
        the loop pays what a serving loop pays: H2D input, enqueue, D2H logits, sync.
        """
        from trt_latency.engines.base import GenerateResult

        x = np.asarray(inputs_embeds)
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != self.hidden:
            raise InputError(field="inputs_embeds", expected=f"shape [1, S, {self.hidden}]", got=x.shape)
        prompt = int(x.shape[1])
        if output_tokens < 1:
            raise InputError(field="output_tokens", expected="an integer >= 1", got=output_tokens)
        self._check_position(0, prompt)
        last_past = prompt + output_tokens - 2
        if output_tokens > 1 and last_past > self.max_past_len:
            raise InputError(field="output_tokens", expected=f"prompt + output_tokens - 2 <= {self.max_past_len}",
                             got=output_tokens)
        x = np.ascontiguousarray(x, dtype=self._inputs[loader.INPUTS_EMBEDS].dtype)
        logits_t = self._outputs[loader.LOGITS]
        row_bytes = self.vocab * logits_t.dtype.itemsize
        logits = np.empty(self.vocab, dtype=logits_t.dtype)
        embeds_buf = self._addr[loader.INPUTS_EMBEDS]
        logits_buf = self._addr[loader.LOGITS]
        stream = self._stream

        start = time.perf_counter()
        swap = False
        self._bind(0, prompt, swap)
        embeds_buf.copy_from_host(x, stream=stream)
        positions = self._write_positions(0, prompt)
        self._enqueue()
        logits_buf.copy_to_host(logits, offset=(prompt - 1) * row_bytes, stream=stream)
        ttft_ms = (time.perf_counter() - start) * 1e3

        token = int(np.argmax(logits))
        tokens = [token]
        step_ms: list[float] = []
        past_len = prompt
        for _ in range(output_tokens - 1):
            t0 = time.perf_counter()
            swap = not swap  # this step's past is the previous step's present
            self._bind(past_len, 1, swap)
            row = self._embed_table[token % self._embed_table.shape[0]]
            embeds_buf.copy_from_host(row, stream=stream)
            positions = self._write_positions(past_len, 1)
            self._enqueue()
            logits_buf.copy_to_host(logits, stream=stream)
            token = int(np.argmax(logits))
            step_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(token)
            past_len += 1
        total_ms = (time.perf_counter() - start) * 1e3
        del positions
        return GenerateResult(ttft_ms=ttft_ms, total_ms=total_ms, step_ms=step_ms, tokens=tokens)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine once on host arrays; every output back on the host (for accuracy checks).

        ``feeds`` holds inputs_embeds, position_ids and past_key_values.* in the engine's shapes.
        """
        embeds = np.asarray(feeds[loader.INPUTS_EMBEDS])
        past0 = np.asarray(feeds[loader.past_name(self._blocks[0], "key")])
        past_len, new_tokens = int(past0.shape[2]), int(embeds.shape[1])
        self._check_position(past_len, new_tokens)
        self._bind(past_len, new_tokens)
        held: list[np.ndarray] = []
        for name, value in feeds.items():
            t = self._inputs.get(name)
            if t is None:
                raise InputError("not an engine input", field=name, expected=", ".join(sorted(self._inputs)))
            arr = np.ascontiguousarray(value, dtype=t.dtype)
            kv = loader.parse_kv_name(name)
            buf = self._kv[(kv[1], kv[2])][0] if kv else self._addr[name]
            buf.copy_from_host(arr, stream=self._stream)
            held.append(arr)
        self._enqueue()
        results: dict[str, np.ndarray] = {}
        for name, t in self._outputs.items():
            shape = loader.dims_tuple(self._context.get_tensor_shape(name))
            kv = loader.parse_kv_name(name)
            buf = self._kv[(kv[1], kv[2])][1] if kv else self._addr[name]
            results[name] = buf.copy_to_host(np.empty(shape, dtype=t.dtype), stream=self._stream)
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
        self.__dict__.pop("_context", None)  # before the buffers it points at and before the engine
        for buf in self._buffers:
            buf.close()
        self._buffers.clear()
        if stream is not None:
            stream.close()



def _fill_random(buf: cuda.DeviceBuffer, dtype: np.dtype[Any], rng: np.random.Generator,
                 scale: float = 1.0, chunk_bytes: int = 16 << 20) -> None:
    """Fill a device buffer with N(0, scale) values, tiling one bounded host chunk (huge KV caches)."""
    count = max(1, min(buf.nbytes, chunk_bytes) // dtype.itemsize)
    chunk = (rng.standard_normal(count) * scale).astype(dtype)
    offset = 0
    while offset < buf.nbytes:
        part = chunk[: (buf.nbytes - offset) // dtype.itemsize]
        if part.nbytes == 0:
            break
        buf.copy_from_host(part, offset=offset)
        offset += part.nbytes


def _profile_limits(path: Path, max_past_len: int | None, max_new_tokens: int | None) -> tuple[int, int]:
    """(max_past_len, max_prefill_len) for the profile: arguments first, else the model's metadata."""
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    from trt_latency.engines.export import model_metadata

    meta = model_metadata(path) if max_past_len is None or max_new_tokens is None else {}
    past = max_past_len if max_past_len is not None else meta.get("max_past_len")
    if past is None:
        raise InputError("no tier dims in the model's metadata: pass max_past_len", path=path,
                         field="max_past_len", expected="an integer")
    prefill = max_new_tokens if max_new_tokens is not None else meta.get("max_prefill_len", past)
    return int(past), int(prefill)
