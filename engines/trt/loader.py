"""Build, cache and load TensorRT engines for the exported decoder.

One optimization profile covers the whole sweep: ``past_len`` from 0 (prefill) to the tier's
``max_past_len`` and the new-token axis ``S`` from 1 (decode) to ``max_prefill_len``. Networks are
created strongly typed, so an fp16 ONNX runs fp16 kernels: TensorRT 11 removed ``BuilderFlag.FP16``
(weak typing) and always types networks from the ONNX; on TensorRT 10 the ``STRONGLY_TYPED`` flag
gives the same behaviour. Only APIs present in both 10.x and 11.x are used (no implicit batch,
no binding-index APIs, ``build_serialized_network``, ``set_memory_pool_limit``).

Serialized engines are cached on disk under a key of sha256(ONNX bytes), TensorRT version, device
name and the profile, so a rebuilt ONNX, another TensorRT, another GPU or another profile never
reuses a stale plan. ``tensorrt`` is imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
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

CACHE_FORMAT = 1  # bump when the cache layout or the profile rule changes


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
    """min/opt/max shapes of every decoder input for the single optimization profile.

    ``input_shapes`` maps input name to its network shape, -1 for a dynamic axis. Fixed axes keep
    their size. Dynamic axes: batch = ``batch``; S (axis 1 of inputs_embeds / position_ids) from 1
    over ``opt_new_tokens`` to ``max_prefill_len``; past_len (axis 2 of past_key_values.*) from
    ``min_past_len`` (default 0: prefill runs with an empty past, which TensorRT accepts as an empty
    tensor) over ``opt_past_len`` (default max_past_len // 2) to ``max_past_len``.
    """
    if max_past_len < 1:
        raise InputError(field="max_past_len", expected="an integer >= 1", got=max_past_len)
    if max_prefill_len < 1:
        raise InputError(field="max_prefill_len", expected="an integer >= 1", got=max_prefill_len)
    if not 0 <= min_past_len <= max_past_len:
        raise InputError(field="min_past_len", expected=f"0..{max_past_len}", got=min_past_len)
    opt_past = max(max_past_len // 2, min_past_len) if opt_past_len is None else opt_past_len
    if not min_past_len <= opt_past <= max_past_len:
        raise InputError(field="opt_past_len", expected=f"{min_past_len}..{max_past_len}", got=opt_past)
    if not 1 <= opt_new_tokens <= max_prefill_len:
        raise InputError(field="opt_new_tokens", expected=f"1..{max_prefill_len}", got=opt_new_tokens)
    names = set(input_shapes)
    missing = [n for n in (INPUTS_EMBEDS, POSITION_IDS) if n not in names]
    if not any(parse_kv_name(n) for n in names):
        missing.append("past_key_values.0.key")
    if missing:
        raise InputError(
            "decoder inputs missing", field=", ".join(missing),
            expected="inputs_embeds, position_ids, past_key_values.{i}.key|value", got=sorted(names),
        )
    ranges = {"batch": (batch, batch, batch), "seq": (1, opt_new_tokens, max_prefill_len),
              "past": (min_past_len, opt_past, max_past_len)}
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; its digest names the cache file."""

    onnx_sha256: str
    tensorrt_version: str
    device: str
    max_past_len: int
    max_prefill_len: int
    opt_past_len: int
    batch: int = 1
    min_past_len: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, **self.__dict__}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def filename(self) -> str:
        return (
            f"{self.onnx_sha256[:12]}-trt{_slug(self.tensorrt_version)}-{_slug(self.device)}"
            f"-{self.digest[:16]}.engine"
        )


def engine_key(
    onnx_sha256: str,
    tensorrt_version: str,
    device: str,
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
) -> EngineKey:
    return EngineKey(
        onnx_sha256=onnx_sha256,
        tensorrt_version=tensorrt_version,
        device=device,
        max_past_len=int(max_past_len),
        max_prefill_len=int(max_prefill_len),
        opt_past_len=int(max(max_past_len // 2, min_past_len) if opt_past_len is None else opt_past_len),
        batch=int(batch),
        min_past_len=int(min_past_len),
    )


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


def build_serialized_engine(
    onnx_path: str | os.PathLike[str],
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
    workspace_bytes: int | None = None,
    verbose: bool = False,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with the decoder's one profile."""
    import_tensorrt()
    import tensorrt as trt

    path = Path(onnx_path)
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    logger = make_logger(verbose)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(builder, path, logger)
    shapes = profile_shapes(
        network_input_shapes(network), max_past_len=max_past_len, max_prefill_len=max_prefill_len,
        opt_past_len=opt_past_len, batch=batch, min_past_len=min_past_len,
    )
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, trt.Dims(list(shape.min)), trt.Dims(list(shape.opt)), trt.Dims(list(shape.max)))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtLatencyError(f"{path}: TensorRT engine build failed (see the TensorRT log above)")
    return bytes(memoryview(serialized))


@dataclass(frozen=True)
class CachedEngine:
    data: bytes
    path: Path
    key: EngineKey
    cache_hit: bool


def build_or_load_cached(
    onnx_path: str | os.PathLike[str],
    *,
    max_past_len: int,
    max_prefill_len: int,
    opt_past_len: int | None = None,
    batch: int = 1,
    min_past_len: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    workspace_bytes: int | None = None,
    device_id: int = 0,
) -> CachedEngine:
    """The serialized engine for ``onnx_path`` from the cache, building and storing it on a miss."""
    from trt_latency.engines import cuda

    trt_mod = import_tensorrt()
    cuda.require_device(device_id)
    path = Path(onnx_path)
    if not path.is_file():
        raise InputError("ONNX model not found", path=path)
    key = engine_key(
        file_sha256(path), str(trt_mod.__version__), cuda.device_name(device_id),
        max_past_len=max_past_len, max_prefill_len=max_prefill_len, opt_past_len=opt_past_len, batch=batch,
        min_past_len=min_past_len,
    )
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plan = directory / key.filename()
    if plan.is_file() and not rebuild:
        return CachedEngine(plan.read_bytes(), plan, key, cache_hit=True)
    data = build_serialized_engine(
        path, max_past_len=max_past_len, max_prefill_len=max_prefill_len,
        opt_past_len=key.opt_past_len, batch=batch, min_past_len=min_past_len, workspace_bytes=workspace_bytes,
    )
    _atomic_write(plan, data)
    # Sidecar so a user can see what a cached plan was built from.
    _atomic_write(plan.with_suffix(".json"), json.dumps(
        {**key.as_dict(), "onnx_path": str(path.resolve())}, indent=2, sort_keys=True).encode())
    return CachedEngine(data, plan, key, cache_hit=False)


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
