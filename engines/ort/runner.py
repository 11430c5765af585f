"""ONNX Runtime session -> per-position step timings and real end-to-end requests (the Runner contract).

All buffers are allocated once, at the largest shape (max_past_len + max_new_tokens KV tokens per
block, two ping-pong sets so a decode loop can feed present KV back as past without copies). A step
binds contiguous prefixes of those flat buffers with the needed shape (IOBinding by pointer), so
the timed region of ``time_step`` is exactly ``session.run_with_iobinding``.

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

from trt_latency.engines.base import Closing, GenerateResult
from trt_latency.errors import BackendUnavailable, InputError

_BACKENDS = {"cpu": "ort-cpu", "cuda": "ort-cuda", "trt": "ort-trt"}


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


class _Dims:
    """What the runner needs to know about the model: from metadata, else from the session's inputs."""

    def __init__(self, path: Path, sess: Any, max_past_len: int | None, max_new_tokens: int | None) -> None:
        from trt_latency.engines.export import model_metadata

        meta = model_metadata(path)
        inputs = {i.name: i for i in sess.get_inputs()}
        if "inputs_embeds" not in inputs or "position_ids" not in inputs:
            raise InputError("not a decoder with explicit KV bindings", path=str(path), field="inputs",
                             expected="inputs inputs_embeds, position_ids, past_key_values.{i}.key|value",
                             got=",".join(inputs))
        self.blocks = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        if self.blocks == 0:
            raise InputError("no KV-cache inputs", path=str(path), field="inputs",
                             expected="past_key_values.{i}.key|value inputs", got=",".join(inputs))
        past0 = inputs["past_key_values.0.key"].shape
        emb = inputs["inputs_embeds"].shape
        self.kv_heads = int(meta.get("kv_heads", past0[1]))
        self.head_dim = int(meta.get("head_dim", past0[3]))
        self.hidden = int(meta.get("hidden", emb[2]))
        logits = next(o for o in sess.get_outputs() if o.name == "logits")
        self.vocab = int(meta.get("vocab", logits.shape[2]))
        for name, value in (("kv_heads", self.kv_heads), ("head_dim", self.head_dim), ("hidden", self.hidden),
                            ("vocab", self.vocab)):
            if not isinstance(value, int) or value <= 0:
                raise InputError("dimension not fixed in the model", path=str(path), field=name,
                                 expected="a static dimension or trt_latency metadata", got=value)
        self.dtype = np.float16 if "float16" in inputs["inputs_embeds"].type else np.float32
        self.max_past_len = int(max_past_len if max_past_len is not None else meta.get("max_past_len", 4096))
        self.max_new_tokens = int(max_new_tokens if max_new_tokens is not None else meta.get("max_prefill_len", 1024))
        self.meta = meta


def _trt_profile(path: Path, max_past_len: int | None, max_new_tokens: int | None) -> dict[str, tuple[str, str, str]] | None:
    """One explicit TensorRT EP profile (min/opt/max) over S and past_len, from the model's metadata.

    Without it the EP rebuilds its engine whenever a shape leaves the range seen so far, which a
    per-position sweep would time as a giant outlier.
    """
    from trt_latency.engines.export import model_metadata

    meta = model_metadata(path)
    if not meta:
        return None
    past = int(max_past_len if max_past_len is not None else meta["max_past_len"])
    new = int(max_new_tokens if max_new_tokens is not None else meta["max_prefill_len"])
    h, kv, d = meta["hidden"], meta["kv_heads"], meta["head_dim"]
    prof = {"inputs_embeds": (f"1x1x{h}", f"1x1x{h}", f"1x{new}x{h}"),
            "position_ids": ("1x1", "1x1", f"1x{new}")}
    for i in range(int(meta["num_active_blocks"])):
        for kind in ("key", "value"):
            prof[f"past_key_values.{i}.{kind}"] = (f"1x{kv}x0x{d}", f"1x{kv}x{past // 2}x{d}", f"1x{kv}x{past}x{d}")
    return prof


class OrtRunner(Closing):
    """Runner on ONNX Runtime with IOBinding over preallocated flat buffers."""

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", *, intra_op_threads: int = 0,
                 inter_op_threads: int = 0, max_past_len: int | None = None, max_new_tokens: int | None = None,
                 device_id: int = 0, seed: int = 0, trt_cache_dir: str | None = None) -> None:
        from trt_latency.engines.ort.loader import create_session

        if device not in _BACKENDS:
            raise BackendUnavailable(f"unknown ONNX Runtime device {device!r}; expected cpu, cuda or trt")
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("file not found", path=str(self.path), expected="an ONNX model")
        trt_options = None
        if device == "trt":
            from trt_latency.engines.ort.loader import trt_provider_options

            trt_options = trt_provider_options(trt_cache_dir or str(self.path.parent / "ort_trt_cache"),
                                               _trt_profile(self.path, max_past_len, max_new_tokens))
        self.session, self.provider = create_session(self.path, device, intra_op_threads=intra_op_threads,
                                                     inter_op_threads=inter_op_threads, device_id=device_id,
                                                     trt_options=trt_options)
        dims = _Dims(self.path, self.session, max_past_len, max_new_tokens)
        self.dims = dims
        self.backend = _BACKENDS[device]
        self.device = cpu_name() if device == "cpu" else _gpu_name(device_id)
        self.max_past_len = dims.max_past_len
        self.max_new_tokens = dims.max_new_tokens
        self.hidden = dims.hidden
        self.threads = (intra_op_threads, inter_op_threads)
        self._on_device = device != "cpu"
        self._device_id = device_id
        self._ort_device = "cuda" if self._on_device else "cpu"
        self._rng = np.random.default_rng(seed)
        self._allocate()
        self._binding = self.session.io_binding()

    # -- buffers -----------------------------------------------------------------------------

    def _allocate(self) -> None:
        import onnxruntime as ort

        d = self.dims
        per_token = d.kv_heads * d.head_dim
        cap = (self.max_past_len + self.max_new_tokens) * per_token
        self._per_token = per_token

        def filled(n: int) -> np.ndarray:
            # Small finite values: the contents never matter for timing, only that they are finite.
            return (self._rng.standard_normal(n, dtype=np.float32) * 0.1).astype(d.dtype)

        self._host_embeds = filled(self.max_new_tokens * d.hidden)
        self._host_pos = np.zeros(self.max_new_tokens, dtype=np.int64)
        # Greedy decoding feeds the embedding of the chosen token back in (the model has no embedding table).
        self._embed_table = filled(d.vocab * d.hidden).reshape(d.vocab, d.hidden)
        self._host_logits = np.empty(self.max_new_tokens * d.vocab, dtype=d.dtype)
        self._host_logits_step = np.empty(d.vocab, dtype=d.dtype)
        # kv[set][block] = (key, value) flat buffers; set 0 / 1 ping-pong between past and present.
        if not self._on_device:
            self._embeds: Any = self._host_embeds
            self._embeds_step: Any = self._host_embeds
            self._pos: Any = self._host_pos
            self._logits: Any = self._host_logits
            self._logits_step: Any = self._host_logits_step
            self._kv: Any = [[(filled(cap), filled(cap)) for _ in range(d.blocks)] for _ in range(2)]
            return
        ov = ort.OrtValue
        dev, did = self._ort_device, self._device_id
        self._embeds = ov.ortvalue_from_numpy(self._host_embeds, dev, did)
        # Decode steps update only this one-token buffer: update_inplace copies a whole OrtValue, and
        # the prompt-sized one is max_new_tokens x hidden (4 MB on the GPU tier) per generated token.
        self._embeds_step = ov.ortvalue_from_numpy(self._host_embeds[: d.hidden].copy(), dev, did)
        self._pos = ov.ortvalue_from_numpy(self._host_pos, dev, did)
        self._logits = ov.ortvalue_from_shape_and_type([self._host_logits.size], d.dtype, dev, did)
        self._logits_step = ov.ortvalue_from_shape_and_type([d.vocab], d.dtype, dev, did)
        # One random host pattern copied into every device buffer: the contents never matter for
        # timing, and 4 * blocks random fills of cap values cost about a minute of CPU on a 1B tier.
        pattern = filled(cap)
        self._kv = [[(ov.ortvalue_from_numpy(pattern, dev, did), ov.ortvalue_from_numpy(pattern, dev, did))
                     for _ in range(d.blocks)] for _ in range(2)]

    def _ptr(self, buf: Any) -> int:
        return int(buf.ctypes.data) if isinstance(buf, np.ndarray) else int(buf.data_ptr())

    def _bind(self, past_len: int, new_tokens: int, past_set: int) -> Any:
        """Bind shapes for one step: past from set ``past_set``, present into the other set."""
        d, b = self.dims, self._binding
        dev, did = self._ort_device, self._device_id
        embeds = self._embeds_step if new_tokens == 1 else self._embeds
        b.bind_input("inputs_embeds", dev, did, d.dtype, [1, new_tokens, d.hidden], self._ptr(embeds))
        b.bind_input("position_ids", dev, did, np.int64, [1, new_tokens], self._ptr(self._pos))
        logits = self._logits_step if new_tokens == 1 else self._logits
        b.bind_output("logits", dev, did, d.dtype, [1, new_tokens, d.vocab], self._ptr(logits))
        past_shape = [1, d.kv_heads, past_len, d.head_dim]
        present_shape = [1, d.kv_heads, past_len + new_tokens, d.head_dim]
        for i in range(d.blocks):
            for j, kv in enumerate(("key", "value")):
                b.bind_input(f"past_key_values.{i}.{kv}", dev, did, d.dtype, past_shape,
                             self._ptr(self._kv[past_set][i][j]))
                b.bind_output(f"present.{i}.{kv}", dev, did, d.dtype, present_shape,
                              self._ptr(self._kv[1 - past_set][i][j]))
        return b

    def _set_positions(self, start: int, new_tokens: int) -> None:
        self._host_pos[:new_tokens] = np.arange(start, start + new_tokens, dtype=np.int64)
        if self._on_device:
            self._pos.update_inplace(self._host_pos)

    def _set_embeds(self, embeds: np.ndarray) -> None:
        flat = np.ascontiguousarray(embeds, dtype=self.dims.dtype).reshape(-1)
        self._host_embeds[: flat.size] = flat
        if self._on_device:
            if flat.size == self.dims.hidden:
                self._embeds_step.update_inplace(flat)
            else:
                self._embeds.update_inplace(self._host_embeds)

    def _last_token(self, new_tokens: int) -> int:
        v = self.dims.vocab
        if new_tokens == 1:
            row = self._logits_step if not self._on_device else self._logits_step.numpy()
        else:
            full = self._logits if not self._on_device else self._logits.numpy()
            row = full[(new_tokens - 1) * v: new_tokens * v]
        return int(np.argmax(row))

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
        binding = self.prepare(past_len, new_tokens)
        run = self.session.run_with_iobinding
        out = np.empty(reps, dtype=np.float64)
        clock = time.perf_counter_ns
        for r in range(reps):
            t0 = clock()
            run(binding)
            out[r] = (clock() - t0) * 1e-6
        return out

    def generate(self, inputs_embeds: np.ndarray, output_tokens: int) -> GenerateResult:
        embeds = np.asarray(inputs_embeds)
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.hidden:
            raise ValueError(f"inputs_embeds must be [1, S, {self.hidden}], got {list(embeds.shape)}")
        prompt = embeds.shape[1]
        self._check(0, prompt)
        if output_tokens < 1 or prompt + output_tokens - 1 > self.max_past_len + 1:
            raise ValueError(f"output_tokens must be in [1, {self.max_past_len + 2 - prompt}], got {output_tokens}")
        run = self.session.run_with_iobinding
        clock = time.perf_counter_ns
        t_start = clock()
        self._set_embeds(embeds)
        self._set_positions(0, prompt)
        run(self._bind(0, prompt, past_set=0))
        token = self._last_token(prompt)
        ttft = clock()
        tokens, steps = [token], []
        past_len, past_set = prompt, 1  # present of the prefill landed in set 1
        for _ in range(output_tokens - 1):
            t0 = clock()
            self._set_embeds(self._embed_table[token])
            self._set_positions(past_len, 1)
            run(self._bind(past_len, 1, past_set))
            token = self._last_token(1)
            steps.append((clock() - t0) * 1e-6)
            tokens.append(token)
            past_len, past_set = past_len + 1, 1 - past_set
        end = clock()
        self._last_past_set = past_set
        return GenerateResult(ttft_ms=(ttft - t_start) * 1e-6, total_ms=(end - t_start) * 1e-6, step_ms=steps,
                              tokens=tokens)

    def present(self, block: int, kind: str, length: int, kv_set: int) -> np.ndarray:
        """Copy of a KV buffer's first ``length`` tokens as [1, kv_heads, length, head_dim] (tests, debugging)."""
        buf = self._kv[kv_set][block][0 if kind == "key" else 1]
        host = buf if isinstance(buf, np.ndarray) else buf.numpy()
        d = self.dims
        return np.array(host[: length * self._per_token].reshape(1, d.kv_heads, length, d.head_dim))

    def close(self) -> None:
        self._binding = None
        self.session = None

