"""Build, cache and load TensorRT engines for a decoder from any exporter the DecoderSignature reads.

Which input carries what comes only from the model's DecoderSignature (engines/signature.py): the ONNX's
(read_signature) when building, the engine's own I/O tensors (:func:`engine_tensors` ->
signature_from_tensors) for a prebuilt one. :func:`input_layouts` turns the roles into each input's axes:
the token input (ids [B, S] or embeddings [B, S, H]), the attention mask [B, past + S], position ids
([B, S] or M-RoPE's [3, B, S]) and past KV ([B, H, past, D], or fused [2, B, H, past, D]) under whatever
names the exporter used. These planning functions are pure (no tensorrt import), so CI tests them against
every third-party fixture. KV is timed as concat (separate past and present buffers); a shared
(genai past_present_share_buffer) KV is refused by :func:`tensorrt_kv_mode`.

Two optimization profiles, as production LLM builds do, so prefill is not timed with kernels
tuned for decode: profile 0 ("decode") fixes the new-token axis ``S`` at 1 with ``past_len`` from 0
to the tier's ``max_past_len`` (opt in the middle); profile 1 ("prefill") spans ``S`` from 1 to
``max_prefill_len`` (opt at half of it) with the same ``past_len`` range (opt 1: a prompt starts
with an (almost) empty cache). The runner keeps one execution context per profile and picks it
per step (:func:`choose_profile`). Networks are
created strongly typed, so an fp16 ONNX runs fp16 kernels: TensorRT 11 removed ``BuilderFlag.FP16``
(weak typing) and always types networks from the ONNX; on TensorRT 10 the ``STRONGLY_TYPED`` flag
gives the same behaviour. Only APIs present in both 10.x and 11.x are used (no implicit batch,
no binding-index APIs, ``build_serialized_network``, ``set_memory_pool_limit``).

Serialized engines are cached on disk under a key of sha256 over the ONNX file and every
external-data (weights) file it references, the TensorRT version, the device name, the profiles
and the build settings (workspace limit), so new weights, another TensorRT, another GPU, another
profile or another workspace never reuse a stale plan. A TensorRT timing cache per (TensorRT
version, device) is kept next to the engines, so a rebuild reuses the measured tactics instead of
re-timing (and possibly picking other kernels). ``tensorrt`` is imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from trt_latency.engines.signature import (
    DecoderSignature,
    SignatureError,
    Tensor,
    normalize_dtype,
    parse_dims,
    parse_io,
    signature_from_tensors,
)
from trt_latency.errors import BackendUnavailable, InputError, TrtLatencyError

if TYPE_CHECKING:
    import tensorrt as trt

CACHE_FORMAT = 3  # bump when the cache layout or the profile rule changes (3: axes from the DecoderSignature)
PROFILES = ("decode", "prefill")  # optimization profile index -> role


# ----------------------------------------------------------------------------- availability


def import_tensorrt() -> ModuleType:
    """The real ``tensorrt`` module, or :class:`BackendUnavailable`.

    ``tensorrt-stubs`` installs a bare ``tensorrt/`` folder of .pyi files that imports as an empty
    namespace package, so a successful import alone proves nothing: require ``Builder``.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "TensorRT is not installed: pip install 'trt-latency[tensorrt-cu12]' (NVIDIA driver with CUDA 12) "
            "or 'trt-latency[tensorrt-cu13]' (CUDA 13), matching nvidia-smi's CUDA Version"
        ) from exc
    if not hasattr(tensorrt, "Builder"):
        raise BackendUnavailable(
            "the 'tensorrt' module found has no Builder: only type stubs are installed, not TensorRT"
        )
    return tensorrt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    return True


def make_logger(verbose: bool = False) -> trt.Logger:
    import_tensorrt()
    import tensorrt as trt

    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


# ----------------------------------------------------------------------------- profile


class ProfileShape(NamedTuple):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


# An input's axis: a fixed size, or the dynamic quantity it carries: "batch", "seq" (new tokens S),
# "past" (past_len) or "total" (past_len + S, the attention mask's length).
Axis = int | str
DYNAMIC = ("batch", "seq", "past", "total")
KV_MODES = ("auto", "concat")  # what backend tensorrt binds (shared is refused by tensorrt_kv_mode)


def tensorrt_kv_mode(sig: DecoderSignature, kv_mode: str = "auto") -> str:
    """The KV mode a TensorRT engine of ``sig`` is timed in: always "concat" (past and present are separate
    buffers, ping-ponged between steps). Refuses "shared" in one line, whether asked for or implied by
    genai_config.json (kv_mode auto): the runner never binds an output to the memory of an input."""
    mode = sig.resolve_kv_mode(kv_mode)
    if mode == "shared":
        why = ("--kv-mode shared" if kv_mode == "shared" else
               "kv_mode auto resolves to shared (genai_config.json search.past_present_share_buffer)")
        raise SignatureError(
            f"backend tensorrt binds past and present KV as separate buffers (it never aliases an engine output "
            f"to an input), so {why} cannot be timed on it", path=sig.model, field="kv_mode",
            expected="--kv-mode concat on tensorrt, or an ONNX Runtime backend (ort-cpu, ort-cuda) for shared",
            got="shared")
    return mode


def signature_layouts(sig: DecoderSignature, ranks: Mapping[str, int]) -> dict[str, tuple[Axis, ...]]:
    """What each input's axes carry, from the signature's roles (never from tensor names).

    ``ranks``: each input's rank (position_ids may be [B, S] or M-RoPE's [3, B, S]). Token ids [batch, seq];
    embeddings [batch, seq, hidden]; attention_mask [batch, total]; position_ids [..., batch, seq]; KV
    [batch, kv_heads, past, head_dim], fused [2, batch, kv_heads, past, head_dim]."""
    out: dict[str, tuple[Axis, ...]] = {}
    out[sig.token_name] = ("batch", "seq") if sig.token_input == "input_ids" else ("batch", "seq", sig.hidden)
    if sig.attention_mask:
        out[sig.attention_mask] = ("batch", "total")
    if sig.position_ids:
        rank = ranks.get(sig.position_ids, 2)
        # M-RoPE: one row of positions per rotary section (temporal, height, width) ahead of [B, S].
        out[sig.position_ids] = ("batch", "seq") if rank == 2 else (3, "batch", "seq")
    kv: tuple[Axis, ...] = ("batch", sig.kv_heads, "past", sig.head_dim)
    if sig.kv_layout == "fused":
        kv = (2, *kv)
    for block in sig.kv:
        for past, _ in block.pairs():
            out[past] = kv
    return out


def input_layouts(sig: DecoderSignature, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[Axis, ...]]:
    """Each input's axes as the engine has them: a static axis keeps its size (a batch fixed at 1 stays 1),
    a dynamic one (-1) takes its role from :func:`signature_layouts`, and a dynamic size the signature knows
    (hidden, kv_heads, head_dim: from shapes, configs or ``--dims``) is fixed at that size."""
    want = signature_layouts(sig, {n: len(s) for n, s in input_shapes.items()})
    missing = sorted(set(want) - set(input_shapes))
    if missing:
        raise SignatureError(f"the engine has no input '{missing[0]}' that the decoder signature binds",
                             path=sig.model, field=missing[0], expected="inputs " + ", ".join(sorted(want)),
                             got=sorted(input_shapes))
    out: dict[str, tuple[Axis, ...]] = {}
    for name, shape in input_shapes.items():
        axes = want.get(name)
        if axes is None:
            raise SignatureError(f"input '{name}' has no role in the decoder signature", path=sig.model, field=name,
                                 expected="inputs " + ", ".join(sorted(want)), got=name)
        if len(shape) != len(axes):
            raise SignatureError(f"input '{name}' has rank {len(shape)}", path=sig.model, field=name,
                                 expected=f"rank {len(axes)} {list(axes)}", got=tuple(shape))
        merged: list[Axis] = []
        for axis, (dim, role) in enumerate(zip(shape, axes, strict=True)):
            if dim >= 0 and isinstance(role, int) and role != dim:
                raise SignatureError(f"axis {axis} of '{name}' is {dim} in the engine but {role} in the signature "
                                     "(--dims?)", path=sig.model, field=name, expected=role, got=dim)
            merged.append(int(dim) if dim >= 0 else role)
        out[name] = tuple(merged)
    return out


def _check_limits(max_past_len: int, max_prefill_len: int, min_past_len: int) -> None:
    if max_past_len < 1:
        raise InputError(field="max_past_len", expected="an integer >= 1", got=max_past_len)
    if max_prefill_len < 1:
        raise InputError(field="max_prefill_len", expected="an integer >= 1", got=max_prefill_len)
    if not 0 <= min_past_len <= max_past_len:
        raise InputError(field="min_past_len", expected=f"0..{max_past_len}", got=min_past_len)


def _shapes_for(layouts: Mapping[str, Sequence[Axis]], ranges: Mapping[str, tuple[int, int, int]]
                ) -> dict[str, ProfileShape]:
    """min/opt/max of every input from the (min, opt, max) of each dynamic role."""
    rng = dict(ranges)
    seq, past = rng["seq"], rng["past"]
    rng["total"] = (past[0] + seq[0], past[1] + seq[1], past[2] + seq[2])
    shapes: dict[str, ProfileShape] = {}
    for name, axes in layouts.items():
        triples = [(a, a, a) if isinstance(a, int) else rng[a] for a in axes]
        shapes[name] = ProfileShape(*(tuple(t[k] for t in triples) for k in range(3)))
    return shapes


def _past_opt(max_past_len: int, min_past_len: int, opt_past_len: int | None) -> int:
    opt_past = max(max_past_len // 2, min_past_len) if opt_past_len is None else opt_past_len
    if not min_past_len <= opt_past <= max_past_len:
        raise InputError(field="opt_past_len", expected=f"{min_past_len}..{max_past_len}", got=opt_past)
    return opt_past


def profile_shapes(
    layouts: Mapping[str, Sequence[Axis]],
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_new_tokens: int = 1,
    batch: int = 1,
    min_past_len: int = 0,
) -> dict[str, ProfileShape]:
    """min/opt/max shapes of every decoder input (``layouts``: :func:`input_layouts`) for one profile
    over both phases.

    batch = ``batch``; S from 1 over ``opt_new_tokens`` to ``max_prefill_len``; past_len from
    ``min_past_len`` (default 0: prefill runs with an empty past, which TensorRT accepts as an empty
    tensor) over ``opt_past_len`` (default max_past_len // 2) to ``max_past_len``; the mask's length is
    past_len + S. :func:`decoder_profiles` builds the decode and prefill profiles the engines use.
    """
    _check_limits(max_past_len, max_prefill_len, min_past_len)
    opt_past = _past_opt(max_past_len, min_past_len, opt_past_len)
    if not 1 <= opt_new_tokens <= max_prefill_len:
        raise InputError(field="opt_new_tokens", expected=f"1..{max_prefill_len}", got=opt_new_tokens)
    return _shapes_for(layouts, {"batch": (batch, batch, batch), "seq": (1, opt_new_tokens, max_prefill_len),
                                 "past": (min_past_len, opt_past, max_past_len)})


def default_opt_prefill_len(max_prefill_len: int) -> int:
    return max(1, max_prefill_len // 2)


def prefill_opt_past_len(min_past_len: int, max_past_len: int) -> int:
    # 1, not 0: tactics are timed at opt, and an empty past leaves attention nothing to time.
    return min(max(min_past_len, 1), max_past_len)


def decoder_profiles(
    layouts: Mapping[str, Sequence[Axis]],
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_prefill_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
) -> dict[str, dict[str, ProfileShape]]:
    """The engine's optimization profiles, in index order (:data:`PROFILES`): decode, then prefill.

    ``layouts``: :func:`input_layouts`. decode: S = 1, past_len ``min_past_len`` .. ``max_past_len`` with opt
    ``opt_past_len`` (default the middle). prefill: S 1 .. ``max_prefill_len`` with opt ``opt_prefill_len``
    (default half the max), past_len over the same range with opt :func:`prefill_opt_past_len`.
    """
    _check_limits(max_past_len, max_prefill_len, min_past_len)
    opt_past = _past_opt(max_past_len, min_past_len, opt_past_len)
    opt_seq = default_opt_prefill_len(max_prefill_len) if opt_prefill_len is None else opt_prefill_len
    if not 1 <= opt_seq <= max_prefill_len:
        raise InputError(field="opt_prefill_len", expected=f"1..{max_prefill_len}", got=opt_seq)
    batch_range = (batch, batch, batch)
    decode = _shapes_for(layouts, {"batch": batch_range, "seq": (1, 1, 1),
                                   "past": (min_past_len, opt_past, max_past_len)})
    prefill = _shapes_for(layouts, {
        "batch": batch_range, "seq": (1, opt_seq, max_prefill_len),
        "past": (min_past_len, prefill_opt_past_len(min_past_len, max_past_len), max_past_len)})
    return {"decode": decode, "prefill": prefill}


def step_shapes(layouts: Mapping[str, Sequence[Axis]], past_len: int, new_tokens: int) -> dict[str, tuple[int, ...]]:
    """Every input's shape for one batch-1 step at (past_len, new_tokens): what the runner sets."""
    value = {"batch": 1, "seq": new_tokens, "past": past_len, "total": past_len + new_tokens}
    return {name: tuple(a if isinstance(a, int) else value[a] for a in axes) for name, axes in layouts.items()}


def profile_limits(sig: DecoderSignature, max_past_len: int | None, max_prefill_len: int | None
                   ) -> tuple[int, int]:
    """(max_past_len, max_prefill_len) of the profiles: the arguments, else the model's longest past (our
    metadata, or its context length - 1 from its config); never beyond the model's own limit. The longest
    prefill defaults to the longest past."""
    model = sig.max_past_len
    past = max_past_len if max_past_len is not None else model
    if past is None:
        raise InputError("the model says nothing of its context length (no trt_latency metadata, no "
                         "config beside it): pass max_past_len", path=sig.model, field="max_past_len",
                         expected="an integer (--max-past-len, or the plan's)")
    past = min(int(past), model) if model is not None else int(past)
    prefill = int(max_prefill_len) if max_prefill_len is not None else past
    return past, min(prefill, model + 1) if model is not None else prefill


class ProfileRange(NamedTuple):
    """What one optimization profile allows: (min, opt, max) of S and of past_len."""

    seq: tuple[int, int, int]
    past: tuple[int, int, int]


def _role_axis(axes: Sequence[Axis], role: str, name: str) -> int:
    if role not in axes:
        raise SignatureError(f"input '{name}' has no dynamic {role} axis, so the engine cannot time a "
                             f"position-dependent step", field=name, expected=f"a dynamic {role} axis", got=list(axes))
    return list(axes).index(role)


def profile_range(sig: DecoderSignature, layouts: Mapping[str, Sequence[Axis]],
                  shapes: Mapping[str, ProfileShape]) -> ProfileRange:
    """The (min, opt, max) of S and past_len one profile allows: the token input's seq axis, the first
    past KV input's past axis (by the signature's roles)."""
    past0 = sig.kv[0].past_key
    s = _role_axis(layouts[sig.token_name], "seq", sig.token_name)
    p = _role_axis(layouts[past0], "past", past0)
    tok, past = shapes[sig.token_name], shapes[past0]
    return ProfileRange((tok.min[s], tok.opt[s], tok.max[s]), (past.min[p], past.opt[p], past.max[p]))


def choose_profile(ranges: Sequence[ProfileRange], past_len: int, new_tokens: int) -> int:
    """Index of the profile to run (past_len, new_tokens) with: among those that contain it, the one
    whose opt S is closest to ``new_tokens`` (decode steps get the decode profile, prompts the
    prefill one); ties go to the lower index. -1 when none contains it."""
    best, best_gap = -1, 0
    for i, r in enumerate(ranges):
        if not (r.seq[0] <= new_tokens <= r.seq[2] and r.past[0] <= past_len <= r.past[2]):
            continue
        gap = abs(r.seq[1] - new_tokens)
        if best < 0 or gap < best_gap:
            best, best_gap = i, gap
    return best


def layouts_digest(layouts: Mapping[str, Sequence[Axis]]) -> str:
    """A short stable digest of the planned axes (part of the engine key: --io / --dims change the plan)."""
    blob = json.dumps({n: list(a) for n, a in sorted(layouts.items())}, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def trt_dtype_name(dtype: object) -> str:
    """A TensorRT DataType as signature.normalize_dtype reads it ('DataType.HALF' -> 'float16')."""
    return normalize_dtype(str(dtype))


def engine_signature(source: str | os.PathLike[str], inputs: Sequence[Tensor], outputs: Sequence[Tensor], *,
                     io: Mapping[str, str] | str | None = None, dims: Mapping[str, int] | str | None = None,
                     model_dir: str | os.PathLike[str] | None = None) -> DecoderSignature:
    """The DecoderSignature of an engine's I/O tensor lists ((name, shape with -1 dynamic, dtype) each): the
    same roles as the ONNX it came from, with configs read beside ``model_dir`` (default: the engine's folder)."""
    return signature_from_tensors(source, inputs, outputs, model_dir=model_dir,
                                  io=parse_io(io) if isinstance(io, str) or io is None else io,
                                  dims=parse_dims(dims) if isinstance(dims, str) or dims is None else dims)


def onnx_input_shapes(onnx_path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Graph input shapes of an ONNX file as TensorRT's parser reports them (-1 = dynamic axis).

    Lets the profile be planned (and tested) without TensorRT.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return shapes


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("TRT_LATENCY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "trt-latency"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, sparse initializers, Constant/attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def model_files(onnx_path: str | os.PathLike[str]) -> list[Path]:
    """The ONNX file followed by every external-data file it references (sorted, each once).

    TensorRT's parser reads these files too (``parse_from_file`` resolves them next to the model),
    so an engine depends on all of them.
    """
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    files = [path]
    for location in sorted(locations):
        data = path.parent / location
        if not data.is_file():
            raise InputError("external data file of the model not found", path=data, field="location",
                             expected=f"a file next to {path.name}")
        files.append(data)
    return files


def model_sha256(onnx_path: str | os.PathLike[str]) -> str:
    """One sha256 over the model and every weight file it references (names and contents)."""
    files = model_files(onnx_path)
    digest = hashlib.sha256()
    for i, f in enumerate(files):
        name = "<model>" if i == 0 else f.name  # the model's own name does not change the engine
        digest.update(f"{name}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; its digest names the cache file."""

    model_sha256: str  # model.onnx and every external weight file (model_sha256())
    tensorrt_version: str
    device: str
    max_past_len: int
    max_prefill_len: int
    opt_past_len: int
    batch: int = 1
    min_past_len: int = 0
    opt_prefill_len: int = 1
    profiles: str = "+".join(PROFILES)
    layouts: str = ""  # layouts_digest(): which axis carries what, from the DecoderSignature (--io, --dims)
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)

    def as_dict(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, **self.__dict__}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def filename(self) -> str:
        return (
            f"{self.model_sha256[:12]}-trt{_slug(self.tensorrt_version)}-{_slug(self.device)}"
            f"-{self.digest[:16]}.engine"
        )


def engine_key(
    model_digest: str,
    tensorrt_version: str,
    device: str,
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_prefill_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
    workspace_bytes: int | None = None,
    layouts: Mapping[str, Sequence[Axis]] | None = None,
) -> EngineKey:
    return EngineKey(
        model_sha256=model_digest,
        tensorrt_version=tensorrt_version,
        device=device,
        max_past_len=int(max_past_len),
        max_prefill_len=int(max_prefill_len),
        opt_past_len=int(max(max_past_len // 2, min_past_len) if opt_past_len is None else opt_past_len),
        batch=int(batch),
        min_past_len=int(min_past_len),
        opt_prefill_len=int(default_opt_prefill_len(max_prefill_len) if opt_prefill_len is None
                            else opt_prefill_len),
        workspace_bytes=None if workspace_bytes is None else int(workspace_bytes),
        layouts="" if layouts is None else layouts_digest(layouts),
    )


def timing_cache_path(cache_dir: str | os.PathLike[str], tensorrt_version: str, device: str) -> Path:
    """Where the TensorRT timing cache for (TensorRT version, device) lives: beside the engines.

    One file serves every model: its entries are per layer configuration, and TensorRT rejects a
    cache from another version or device (which is also why both are in the name).
    """
    return Path(cache_dir) / f"timing-trt{_slug(tensorrt_version)}-{_slug(device)}.cache"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- build / load


def _parse_onnx(
    builder: trt.Builder, onnx_path: Path, logger: trt.Logger
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    import tensorrt as trt

    flags = 0
    # Deprecated-but-present (ignored, always on) in TensorRT 11; makes 10.x follow the ONNX types.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data files next to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InputError(
            "TensorRT's ONNX parser rejected the model: " + "; ".join(errors or ["no detail"]),
            path=onnx_path,
        )
    return network, parser


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (-1 for a dynamic axis)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def network_input_shapes(network: trt.INetworkDefinition) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes[tensor.name] = dims_tuple(tensor.shape)
    return shapes


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    """The timing cache at ``path`` (empty when absent or unusable), attached to ``config``."""
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        # A cache from another TensorRT / device / corrupted: start empty rather than fail the build.
        print(f"trt-latency: ignoring the unusable TensorRT timing cache {path}", file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def build_serialized_engine(
    onnx_path: str | os.PathLike[str],
    signature: DecoderSignature,
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_prefill_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
    workspace_bytes: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    verbose: bool = False,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with the decode and prefill profiles, whose axes
    come from ``signature`` (:func:`input_layouts` over the parsed network's inputs).

    ``timing_cache``: a file to read the TensorRT timing cache from (if present) and to write the
    updated cache back to after the build.
    """
    import_tensorrt()
    import tensorrt as trt

    path = Path(onnx_path)
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    logger = make_logger(verbose)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(builder, path, logger)
    profiles = decoder_profiles(
        input_layouts(signature, network_input_shapes(network)), max_past_len=max_past_len, max_prefill_len=max_prefill_len,
        opt_past_len=opt_past_len, opt_prefill_len=opt_prefill_len, batch=batch, min_past_len=min_past_len,
    )
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache_path = None if timing_cache is None else Path(timing_cache)
    cache = _load_timing_cache(config, cache_path)
    for role in PROFILES:  # index order: the runner maps profile i to PROFILES[i] by its shapes
        profile = builder.create_optimization_profile()
        for name, shape in profiles[role].items():
            profile.set_shape(name, trt.Dims(list(shape.min)), trt.Dims(list(shape.opt)),
                              trt.Dims(list(shape.max)))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtLatencyError(f"{path}: TensorRT engine build failed (see the TensorRT log above)")
    if cache_path is not None:
        _atomic_write(cache_path, bytes(memoryview(cache.serialize())))
    return bytes(memoryview(serialized))


@dataclass(frozen=True)
class CachedEngine:
    data: bytes
    path: Path
    key: EngineKey
    cache_hit: bool
    timing_cache: Path | None = None


def build_or_load_cached(
    onnx_path: str | os.PathLike[str],
    signature: DecoderSignature,
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_prefill_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    workspace_bytes: int | None = None,
    device_id: int = 0,
) -> CachedEngine:
    """The serialized engine for ``onnx_path`` (bound by ``signature``, read from that ONNX) from the cache,
    building and storing it on a miss.

    A miss is announced on stderr before the build starts (minutes for a large model).
    """
    from trt_latency.engines import cuda

    trt_mod = import_tensorrt()
    cuda.require_device(device_id)
    path = Path(onnx_path)
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    version, device = str(trt_mod.__version__), cuda.device_name(device_id)
    # The ONNX graph's inputs are what the parser gives the network (-1 for a dynamic axis).
    layouts = input_layouts(signature, onnx_input_shapes(path))
    key = engine_key(
        model_sha256(path), version, device,
        max_past_len=max_past_len, max_prefill_len=max_prefill_len, opt_past_len=opt_past_len,
        opt_prefill_len=opt_prefill_len, batch=batch, min_past_len=min_past_len, workspace_bytes=workspace_bytes,
        layouts=layouts,
    )
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plan = directory / key.filename()
    timing = timing_cache_path(directory, version, device)
    if plan.is_file() and not rebuild:
        return CachedEngine(plan.read_bytes(), plan, key, cache_hit=True, timing_cache=timing)
    print(f"trt-latency: building a TensorRT engine for {path} (decode + prefill profiles, past_len <= "
          f"{max_past_len}, prefill <= {max_prefill_len}) on {device}: this can take minutes; cached as {plan}",
          file=sys.stderr, flush=True)
    data = build_serialized_engine(
        path, signature, max_past_len=max_past_len, max_prefill_len=max_prefill_len,
        opt_past_len=key.opt_past_len, opt_prefill_len=key.opt_prefill_len, batch=batch, min_past_len=min_past_len,
        workspace_bytes=workspace_bytes, timing_cache=timing,
    )
    _atomic_write(plan, data)
    # Sidecar so a user can see what a cached plan was built from.
    _atomic_write(plan.with_suffix(".json"), json.dumps(
        {**key.as_dict(), "onnx_path": str(path.resolve()), "files": [str(f) for f in model_files(path)],
         "timing_cache": str(timing)}, indent=2, sort_keys=True).encode())
    return CachedEngine(data, plan, key, cache_hit=False, timing_cache=timing)


def deserialize_engine(
    data: bytes, *, source: str | os.PathLike[str] = "<bytes>"
) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """(runtime, engine) from serialized bytes; keep the runtime alive as long as the engine."""
    import_tensorrt()
    import tensorrt as trt

    runtime = trt.Runtime(make_logger())
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise InputError(
            "TensorRT could not deserialize the engine (built by another TensorRT version or for "
            "another GPU? see the TensorRT log above)",
            path=source,
        )
    return runtime, engine


def engine_tensors(engine: trt.ICudaEngine) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an engine as (name, shape with -1 dynamic, dtype name) tuples, in I/O order."""
    import tensorrt as trt

    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensor = (name, list(dims_tuple(engine.get_tensor_shape(name))), trt_dtype_name(engine.get_tensor_dtype(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(tensor)
    return inputs, outputs


def load_engine_file(path: str | os.PathLike[str]) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """(runtime, engine) from a prebuilt serialized engine file (``--engine``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("engine file not found", path=p, expected="a serialized TensorRT engine")
    import_tensorrt()
    from trt_latency.engines import cuda

    cuda.require_device()
    return deserialize_engine(p.read_bytes(), source=p)
