"""Build, cache and load TensorRT engines for the exported decoder.

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

from trt_latency.errors import BackendUnavailable, InputError, TrtLatencyError

if TYPE_CHECKING:
    import tensorrt as trt

INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
LOGITS = "logits"
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")

CACHE_FORMAT = 2  # bump when the cache layout or the profile rule changes (2: decode + prefill profiles)
PROFILES = ("decode", "prefill")  # optimization profile index -> role


def past_name(block: int, kind: str) -> str:
    return f"past_key_values.{block}.{kind}"


def present_name(block: int, kind: str) -> str:
    return f"present.{block}.{kind}"


def parse_kv_name(name: str) -> tuple[str, int, str] | None:
    """('past'|'present', block, 'key'|'value') for a KV tensor name, else None."""
    for role, pattern in (("past", _PAST_RE), ("present", _PRESENT_RE)):
        m = pattern.match(name)
        if m:
            return role, int(m.group(1)), m.group(2)
    return None


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
            "TensorRT is not installed (pip install tensorrt from NVIDIA's index, "
            "or pip install 'trt-latency[tensorrt]')"
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


def _axis_role(name: str, axis: int) -> str | None:
    """Which dynamic quantity an axis of a decoder input carries (batch, seq or past)."""
    if axis == 0:
        return "batch"
    if name in (INPUTS_EMBEDS, POSITION_IDS) and axis == 1:
        return "seq"
    kv = parse_kv_name(name)
    if kv is not None and kv[0] == "past" and axis == 2:
        return "past"
    return None


def _check_limits(max_past_len: int, max_prefill_len: int, min_past_len: int) -> None:
    if max_past_len < 1:
        raise InputError(field="max_past_len", expected="an integer >= 1", got=max_past_len)
    if max_prefill_len < 1:
        raise InputError(field="max_prefill_len", expected="an integer >= 1", got=max_prefill_len)
    if not 0 <= min_past_len <= max_past_len:
        raise InputError(field="min_past_len", expected=f"0..{max_past_len}", got=min_past_len)


def _shapes_for(input_shapes: Mapping[str, Sequence[int]], ranges: Mapping[str, tuple[int, int, int]]
                ) -> dict[str, ProfileShape]:
    """min/opt/max of every input from the (min, opt, max) of each dynamic role (batch, seq, past)."""
    names = set(input_shapes)
    missing = [n for n in (INPUTS_EMBEDS, POSITION_IDS) if n not in names]
    if not any(parse_kv_name(n) for n in names):
        missing.append("past_key_values.0.key")
    if missing:
        raise InputError(
            "decoder inputs missing", field=", ".join(missing),
            expected="inputs_embeds, position_ids, past_key_values.{i}.key|value", got=sorted(names),
        )
    shapes: dict[str, ProfileShape] = {}
    for name, shape in input_shapes.items():
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for axis, dim in enumerate(shape):
            if dim >= 0:
                lo.append(dim)
                mid.append(dim)
                hi.append(dim)
                continue
            role = _axis_role(name, axis)
            if role is None:
                raise InputError(
                    f"dynamic axis {axis} has no known role", field=name,
                    expected="dynamic axes only for batch, S (inputs_embeds/position_ids axis 1) "
                    "or past_len (past_key_values axis 2)", got=tuple(shape),
                )
            a, b, c = ranges[role]
            lo.append(a)
            mid.append(b)
            hi.append(c)
        shapes[name] = ProfileShape(tuple(lo), tuple(mid), tuple(hi))
    return shapes


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int]],
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_new_tokens: int = 1,
    batch: int = 1,
    min_past_len: int = 0,
) -> dict[str, ProfileShape]:
    """min/opt/max shapes of every decoder input for one optimization profile over both phases.

    ``input_shapes`` maps input name to its network shape, -1 for a dynamic axis. Fixed axes keep
    their size. Dynamic axes: batch = ``batch``; S (axis 1 of inputs_embeds / position_ids) from 1
    over ``opt_new_tokens`` to ``max_prefill_len``; past_len (axis 2 of past_key_values.*) from
    ``min_past_len`` (default 0: prefill runs with an empty past, which TensorRT accepts as an empty
    tensor) over ``opt_past_len`` (default max_past_len // 2) to ``max_past_len``.
    :func:`decoder_profiles` builds the decode and prefill profiles the engines use.
    """
    _check_limits(max_past_len, max_prefill_len, min_past_len)
    opt_past = max(max_past_len // 2, min_past_len) if opt_past_len is None else opt_past_len
    if not min_past_len <= opt_past <= max_past_len:
        raise InputError(field="opt_past_len", expected=f"{min_past_len}..{max_past_len}", got=opt_past)
    if not 1 <= opt_new_tokens <= max_prefill_len:
        raise InputError(field="opt_new_tokens", expected=f"1..{max_prefill_len}", got=opt_new_tokens)
    return _shapes_for(input_shapes, {"batch": (batch, batch, batch), "seq": (1, opt_new_tokens, max_prefill_len),
                                      "past": (min_past_len, opt_past, max_past_len)})


def default_opt_prefill_len(max_prefill_len: int) -> int:
    return max(1, max_prefill_len // 2)


def prefill_opt_past_len(min_past_len: int, max_past_len: int) -> int:
    # 1, not 0: tactics are timed at opt, and an empty past leaves attention nothing to time.
    return min(max(min_past_len, 1), max_past_len)


def decoder_profiles(
    input_shapes: Mapping[str, Sequence[int]],
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    opt_prefill_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
) -> dict[str, dict[str, ProfileShape]]:
    """The engine's optimization profiles, in index order (:data:`PROFILES`): decode, then prefill.

    decode: S = 1, past_len ``min_past_len`` .. ``max_past_len`` with opt ``opt_past_len`` (default
    the middle). prefill: S 1 .. ``max_prefill_len`` with opt ``opt_prefill_len`` (default half the
    max), past_len over the same range with opt :func:`prefill_opt_past_len`.
    """
    _check_limits(max_past_len, max_prefill_len, min_past_len)
    opt_past = max(max_past_len // 2, min_past_len) if opt_past_len is None else opt_past_len
    if not min_past_len <= opt_past <= max_past_len:
        raise InputError(field="opt_past_len", expected=f"{min_past_len}..{max_past_len}", got=opt_past)
    opt_seq = default_opt_prefill_len(max_prefill_len) if opt_prefill_len is None else opt_prefill_len
    if not 1 <= opt_seq <= max_prefill_len:
        raise InputError(field="opt_prefill_len", expected=f"1..{max_prefill_len}", got=opt_seq)
    batch_range = (batch, batch, batch)
    decode = _shapes_for(input_shapes, {"batch": batch_range, "seq": (1, 1, 1),
                                        "past": (min_past_len, opt_past, max_past_len)})
    prefill = _shapes_for(input_shapes, {
        "batch": batch_range, "seq": (1, opt_seq, max_prefill_len),
        "past": (min_past_len, prefill_opt_past_len(min_past_len, max_past_len), max_past_len)})
    return {"decode": decode, "prefill": prefill}


class ProfileRange(NamedTuple):
    """What one optimization profile allows: (min, opt, max) of S and of past_len."""

    seq: tuple[int, int, int]
    past: tuple[int, int, int]


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
    """Parse ``onnx_path`` and build a serialized engine with the decode and prefill profiles.

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
        network_input_shapes(network), max_past_len=max_past_len, max_prefill_len=max_prefill_len,
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
    """The serialized engine for ``onnx_path`` from the cache, building and storing it on a miss.

    A miss is announced on stderr before the build starts (minutes for a large model).
    """
    from trt_latency.engines import cuda

    trt_mod = import_tensorrt()
    cuda.require_device(device_id)
    path = Path(onnx_path)
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    version, device = str(trt_mod.__version__), cuda.device_name(device_id)
    key = engine_key(
        model_sha256(path), version, device,
        max_past_len=max_past_len, max_prefill_len=max_prefill_len, opt_past_len=opt_past_len,
        opt_prefill_len=opt_prefill_len, batch=batch, min_past_len=min_past_len, workspace_bytes=workspace_bytes,
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
        path, max_past_len=max_past_len, max_prefill_len=max_prefill_len,
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


def load_engine_file(path: str | os.PathLike[str]) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """(runtime, engine) from a prebuilt serialized engine file (``--engine``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("engine file not found", path=p, expected="a serialized TensorRT engine")
    import_tensorrt()
    from trt_latency.engines import cuda

    cuda.require_device()
    return deserialize_engine(p.read_bytes(), source=p)
