"""Vision encoder + embedding step of a VLM deployment: signature, family adapters, timing, the chain.

A VLM serves a request with images as a chain: vision encoder (image patches -> image features), often
an embedding step (token ids + image features -> inputs_embeds), then the text decoder. How N patches per
image become encoder inputs is per model family, so a *family adapter* builds valid feeds for
(patches per image, images per call):

- ``vit``: ViT / SigLIP / CLIP-style ``pixel_values`` [I, C, H, W]; a near-square grid of h x w = N patches
  of ``patch_size`` pixels (config.json); one LLM token per patch.
- ``qwen2.5-vl``: ``pixel_values`` [sum patches, C * t * p * p], ``vision_pos_ids`` [patches, 2],
  ``window_index`` [patches / m^2], ``cu_seqlens`` [I + 1], ``cu_window_seqlens`` computed on the host as
  transformers' Qwen2_5_VisionTransformerPretrainedModel does (rot_pos_emb, get_window_index) from
  config.json's vision_config (patch_size, spatial_merge_size, window_size, temporal_patch_size); the
  merger joins m x m patches, so tokens = patches / m^2 (1/4).
- a user hook ``module:function`` (``--vision-feeds``): ``function(signature, patches, images, rng) -> feeds``.

No exporter writes these encoders with a standard signature, so there is no guessing from names alone:
the family comes from the flag, else from config.json's model_type beside the model; without either the
reader fails in one line naming what is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_latency.errors import InputError

FAMILIES = ("vit", "qwen2.5-vl")
# config.json model_type -> family (the encoders whose inputs we know how to build)
MODEL_TYPES = {"vit": "vit", "siglip_vision_model": "vit", "siglip": "vit", "clip_vision_model": "vit",
               "clip": "vit", "dinov2": "vit", "qwen2_5_vl": "qwen2.5-vl", "qwen2_5_vl_vision": "qwen2.5-vl"}
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(double)": np.float64}


class VisionSignatureError(InputError):
    """A vision model the adapters cannot feed (no family, unknown family, missing inputs)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[Any, ...]
    dtype: str  # ONNX type string, e.g. tensor(float)


@dataclass
class VisionSignature:
    """What the encoder takes and what its family adapter needs."""

    path: Path
    inputs: list[Tensor]
    outputs: list[Tensor]
    family: str  # vit | qwen2.5-vl | hook:<module:function>
    tokens_per_patch: float
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the family came from: flag, config.json model_type, hook

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "family": self.family, "family_source": self.source,
                "tokens_per_patch": self.tokens_per_patch,
                "inputs": [f"{t.name} {list(t.shape)} {t.dtype}" for t in self.inputs],
                "outputs": [f"{t.name} {list(t.shape)} {t.dtype}" for t in self.outputs],
                "config": {k: v for k, v in self.config.items() if not isinstance(v, dict)}}


def _io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise VisionSignatureError("not an ONNX model", path=str(path), expected="an ONNX vision encoder",
                                   got=type(exc).__name__) from None
    inits = {i.name for i in model.graph.initializer}

    def tensors(values: Any) -> list[Tensor]:
        out = []
        for v in values:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            shape = tuple(d.dim_param or d.dim_value or "?" for d in tt.shape.dim)
            out.append(Tensor(v.name, shape, f"tensor({onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name})"
                              .replace("float32", "float").replace("(float64)", "(double)")))
        return out

    return tensors(model.graph.input), tensors(model.graph.output)


def _read_config(path: Path, config: str | Path | None) -> tuple[dict[str, Any], str]:
    cfg_path = Path(config) if config else path.parent / "config.json"
    if not cfg_path.is_file():
        if config:
            raise VisionSignatureError("file not found", path=str(cfg_path), field="--vision-config",
                                       expected="a config.json")
        return {}, ""
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VisionSignatureError("unreadable JSON", path=str(cfg_path), expected="a config.json",
                                   got=str(exc).splitlines()[0]) from None
    return (doc if isinstance(doc, dict) else {}), str(cfg_path)


def load_hook(spec: str) -> Callable[..., dict[str, np.ndarray]]:
    """``module:function`` -> the function (a file path module.py:function works too)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise VisionSignatureError(field="--vision-feeds", expected="module:function", got=spec)
    try:
        if mod_name.endswith(".py"):
            s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if s is None or s.loader is None:
                raise ImportError(mod_name)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)
    except (ImportError, AttributeError, OSError) as exc:
        raise VisionSignatureError("cannot load the feeds hook", field="--vision-feeds",
                                   expected="an importable module:function", got=f"{spec} ({exc})") from None
    if not callable(fn):
        raise VisionSignatureError(field="--vision-feeds", expected="a callable", got=spec)
    return fn  # type: ignore[no-any-return]


def read_vision_signature(path: str | Path, family: str | None = None, config: str | Path | None = None,
                          feeds: str | None = None, tokens_per_patch: float | None = None) -> VisionSignature:
    """The encoder's I/O and its family (flag, hook, else config.json model_type beside the model)."""
    p = Path(path)
    if not p.is_file():
        raise VisionSignatureError("file not found", path=str(p), field="--vision-onnx",
                                   expected="an ONNX vision encoder")
    inputs, outputs = _io(p)
    cfg, cfg_path = _read_config(p, config)
    names = ", ".join(t.name for t in inputs)
    if feeds:
        load_hook(feeds)  # a hook that does not import fails here, in one line
        return VisionSignature(p, inputs, outputs, f"hook:{feeds}", tokens_per_patch or 1.0, cfg, "--vision-feeds")
    source = "--vision-family"
    if family is None:
        mt = str(cfg.get("model_type", ""))
        family = MODEL_TYPES.get(mt)
        source = f"{cfg_path} model_type {mt}"
        if family is None:
            raise VisionSignatureError(
                f"vision model {p} (inputs {names}): no family: pass --vision-family {'|'.join(FAMILIES)} "
                f"or --vision-feeds module:function"
                + (f" (config.json model_type {mt!r} is not a known family)" if mt else " (no config.json beside it)"))
    if family not in FAMILIES:
        raise VisionSignatureError(field="--vision-family", expected=" or ".join(FAMILIES), got=family)
    vcfg = cfg.get("vision_config", cfg) if isinstance(cfg.get("vision_config"), dict) else cfg
    sig = VisionSignature(p, inputs, outputs, family, 1.0, vcfg, source)
    adapter = adapter_for(sig)
    sig.tokens_per_patch = tokens_per_patch or adapter.tokens_per_patch
    return sig


# ------------------------------------------------------------------------------------------ adapters


def _grid(n: int, multiple: int = 1) -> tuple[int, int]:
    """h x w = n (h <= w, as square as n allows); with `multiple`, both sides multiples of it."""
    if n % (multiple * multiple):
        raise InputError(field="patches", expected=f"a multiple of {multiple * multiple}", got=n)
    m = n // (multiple * multiple)
    h = max(d for d in range(1, int(math.isqrt(m)) + 1) if m % d == 0)
    return h * multiple, (m // h) * multiple


class VitAdapter:
    """pixel_values [I, C, h*p, w*p] for N = h*w patches per image (one token per patch)."""

    tokens_per_patch = 1.0

    def __init__(self, sig: VisionSignature) -> None:
        t = sig.input("pixel_values") or (sig.inputs[0] if len(sig.inputs) == 1 else None)
        if t is None or len(t.shape) != 4:
            raise VisionSignatureError(f"vision model {sig.path}: family vit needs one input pixel_values "
                                       f"[B,3,H,W]; found {', '.join(x.name for x in sig.inputs)}")
        self.name = t.name
        self.dtype = _NP.get(t.dtype, np.float32)
        self.patch = int(sig.config.get("patch_size", 16))
        self.channels = int(t.shape[1]) if isinstance(t.shape[1], int) else int(sig.config.get("num_channels", 3))
        # config image_size: the grid the position embeddings were trained for; other grids interpolate them
        # (interpolate_pos_encoding), this one skips that, so the sweep measures it apart
        size = sig.config.get("image_size")
        side = int(size) // self.patch if isinstance(size, int) and not isinstance(size, bool) else 0
        self.native_patches = side * side

    def valid_patches(self, n: int) -> int:
        return max(1, int(n))

    def sweep_patches(self, n: int) -> int:
        """The nearest near-square grid (the sweep's sizes: images are not 5 x 113 patches)."""
        h = max(1, int(math.isqrt(max(1, int(n)))))
        return h * max(h, int(round(n / h)))

    def llm_grid(self, patches: int) -> tuple[tuple[int, int, int], int]:
        """An image's (t, h, w) grid and spatial merge as an M-RoPE decoder positions it (one token a patch)."""
        h, w = _grid(patches)
        return (1, h, w), 1

    def feeds(self, patches: int, images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        h, w = _grid(patches)
        x = rng.standard_normal((images, self.channels, h * self.patch, w * self.patch), dtype=np.float32)
        return {self.name: x.astype(self.dtype, copy=False)}


def qwen_window_index(grid_thw: list[tuple[int, int, int]], window_size: int, patch_size: int,
                      merge: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' Qwen2_5_VisionTransformerPretrainedModel.get_window_index in numpy:
    (window_index over merged tokens, cu_window_seqlens over patches)."""
    index: list[np.ndarray] = []
    cu = [0]
    offset = 0
    win = window_size // merge // patch_size
    unit = merge * merge
    for t, h, w in grid_thw:
        lh, lw = h // merge, w // merge
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = (win - lh % win) % win, (win - lw % win) % win
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], np.diff(cu_arr) != 0])  # transformers drops repeated boundaries
    return np.concatenate(index).astype(np.int64), cu_arr[keep]


def qwen_pos_ids(grid_thw: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """transformers' rot_pos_emb position ids (h, w per patch, merge-block order) [patches, 2]."""
    out = []
    for t, h, w in grid_thw:
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
        hp = hpos.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        wp = wpos.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hp, wp], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


class QwenAdapter:
    """Qwen2.5-VL: flattened patches plus the host-computed position ids, window index and cu_seqlens."""

    native_patches = 0  # rotary positions: no native grid

    ROLES = ("pixel_values", "vision_pos_ids", "window_index", "cu_seqlens", "cu_window_seqlens")

    def __init__(self, sig: VisionSignature) -> None:
        c = sig.config
        self.patch = int(c.get("patch_size", 14))
        self.merge = int(c.get("spatial_merge_size", 2))
        self.window = int(c.get("window_size", 112))
        self.temporal = int(c.get("temporal_patch_size", 2))
        self.channels = int(c.get("in_chans", c.get("in_channels", 3)))
        self.tokens_per_patch = 1.0 / (self.merge * self.merge)
        names = {t.name: t for t in sig.inputs}
        missing = [r for r in self.ROLES if r not in names]
        if missing:
            raise VisionSignatureError(f"vision model {sig.path}: family qwen2.5-vl needs inputs "
                                       f"{', '.join(self.ROLES)}; missing {', '.join(missing)} "
                                       f"(found {', '.join(names)}); use --vision-feeds module:function")
        self.dtypes = {r: _NP.get(names[r].dtype, np.int64) for r in self.ROLES}

    def valid_patches(self, n: int) -> int:
        unit = self.merge * self.merge
        return max(unit, int(round(n / unit)) * unit)

    def sweep_patches(self, n: int) -> int:
        """The nearest near-square grid of merge blocks."""
        m = max(1, int(round(n / (self.merge * self.merge))))
        h = max(1, int(math.isqrt(m)))
        return h * max(h, int(round(m / h))) * self.merge * self.merge

    def llm_grid(self, patches: int) -> tuple[tuple[int, int, int], int]:
        """An image's (t, h, w) patch grid (as feeds builds it) and the spatial merge: the text decoder's
        M-RoPE positions of its tokens (engines/mrope.py)."""
        h, w = _grid(patches, self.merge)
        return (1, h, w), self.merge

    def feeds(self, patches: int, images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        (_, h, w), _ = self.llm_grid(patches)
        grid = [(1, h, w)] * images
        dim = self.channels * self.temporal * self.patch * self.patch
        pix = rng.standard_normal((patches * images, dim), dtype=np.float32)
        index, cu_win = qwen_window_index(grid, self.window, self.patch, self.merge)
        cu = np.concatenate([[0], np.cumsum([t * hh * ww for t, hh, ww in grid])])
        values = {"pixel_values": pix, "vision_pos_ids": qwen_pos_ids(grid, self.merge), "window_index": index,
                  "cu_seqlens": cu, "cu_window_seqlens": cu_win}
        return {r: np.ascontiguousarray(values[r]).astype(self.dtypes[r], copy=False) for r in self.ROLES}


class HookAdapter:
    native_patches = 0

    def __init__(self, sig: VisionSignature) -> None:
        self.sig = sig
        self.fn = load_hook(sig.family.removeprefix("hook:"))
        self.tokens_per_patch = sig.tokens_per_patch

    def valid_patches(self, n: int) -> int:
        return max(1, int(n))

    def feeds(self, patches: int, images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return dict(self.fn(self.sig, patches, images, rng))


def adapter_for(sig: VisionSignature) -> Any:
    if sig.family.startswith("hook:"):
        return HookAdapter(sig)
    return {"vit": VitAdapter, "qwen2.5-vl": QwenAdapter}[sig.family](sig)


# ------------------------------------------------------------------------------------------ sessions


def _session(path: Path, threads: int, huge_pages: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if huge_pages:
        # The decoder runner collapses the whole process onto huge pages when it opens (engines/hugepages.py):
        # an encoder left on 4 KiB pages until then was swept slower than it later ran in the chain (the
        # held-out 2-image TTFTs read 8-13% under the prediction). Same backing from the start.
        from trt_latency.engines.hugepages import back_with_huge_pages

        back_with_huge_pages()
    return session


class VisionEncoder:
    """An ONNX Runtime session of the encoder fed by its family adapter."""

    def __init__(self, sig: VisionSignature, threads: int = 1, huge_pages: bool = True) -> None:
        self.sig = sig
        self.adapter = adapter_for(sig)
        self.session = _session(sig.path, threads, huge_pages)
        self.output = sig.outputs[0].name

    @property
    def tokens_per_patch(self) -> float:
        return float(self.sig.tokens_per_patch)

    def patches_for(self, vision_tokens: int, images: int) -> int:
        """Patches per image that give `vision_tokens` LLM tokens over `images` images."""
        return int(self.adapter.valid_patches(round(vision_tokens / images / self.tokens_per_patch)))

    def encode(self, patches: int, images: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """One encoder call on `images` images of `patches` patches: (features, ms)."""
        feeds = self.adapter.feeds(patches, images, rng)
        t0 = time.perf_counter()
        out = self.session.run([self.output], feeds)[0]
        return out, (time.perf_counter() - t0) * 1e3

    def time_call(self, patches: int, images: int, reps: int, rng: np.random.Generator,
                  flush: np.ndarray | None = None) -> np.ndarray:
        """ms of `reps` calls after one warm-up; with `flush`, that buffer is rewritten before each timed
        call, so the call starts with cold caches as it does in a deployment (the decoder runs between two
        encoder calls): warm back-to-back calls ran 3-15% faster at 1-3 ms than the same call in the chain."""
        feeds = self.adapter.feeds(patches, images, rng)
        self.session.run([self.output], feeds)  # warm-up (shape-specialised kernels, allocations)
        ms = np.empty(reps)
        for i in range(reps):
            if flush is not None:
                flush.fill(float(i))
            t0 = time.perf_counter()
            self.session.run([self.output], feeds)
            ms[i] = (time.perf_counter() - t0) * 1e3
        return ms


class EmbeddingStep:
    """token ids + image features -> inputs_embeds (an ONNX model with one integer and one float input)."""

    def __init__(self, path: str | Path, threads: int = 1, huge_pages: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("file not found", path=str(self.path), field="--embedding-onnx",
                             expected="an ONNX embedding step (input_ids + image features -> inputs_embeds)")
        inputs, outputs = _io(self.path)
        ids = [t for t in inputs if "int" in t.dtype]
        feats = [t for t in inputs if "float" in t.dtype]
        if len(ids) != 1 or len(feats) != 1:
            raise InputError(f"embedding model {self.path}: expected one integer input (token ids) and one float "
                             f"input (image features); found {', '.join(t.name + ' ' + t.dtype for t in inputs)}")
        self.ids, self.features, self.output = ids[0], feats[0], outputs[0].name
        self.session = _session(self.path, threads, huge_pages)

    def run(self, features: np.ndarray, text_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        ids = rng.integers(4, 500, size=(1, max(1, text_tokens))).astype(_NP.get(self.ids.dtype, np.int64))
        feeds = {self.ids.name: ids, self.features.name: features.astype(_NP.get(self.features.dtype, np.float32))}
        t0 = time.perf_counter()
        out = self.session.run([self.output], feeds)[0]
        return out, (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------------------------------ sweep


VISION_COLUMNS = ("stage", "images", "patches", "tokens", "rep", "latency_ms")


def vision_patch_points(adapter: Any, lo: int, hi: int, points: int) -> list[int]:
    """Patch counts per image, geometric from lo to hi, each valid for the family; plus the encoder's
    native grid when it lies inside (measured apart from the fit: estimator.vision.VisionCalibration)."""
    raw = np.geomspace(lo, hi, points)
    pick = getattr(adapter, "sweep_patches", adapter.valid_patches)
    native = int(getattr(adapter, "native_patches", 0))
    return sorted({int(pick(int(round(x)))) for x in raw} | ({native} if native and lo <= native <= hi else set()))


# Visits per size: the first PILOT_ROUNDS rounds visit every size; from their spread each size gets the
# visits its median needs for a relative SE of TARGET_SE (1.2533 sigma / sqrt(n)), between MIN_ROUNDS and
# MAX_ROUNDS, spread evenly over the rounds that follow, so every size's samples span the same stretch of
# time (extra rounds at the end for the noisy sizes alone would time them under other host load). Small
# encoder calls (0.3-3 ms) scatter by 20-30% on a shared host: 15 visits left their medians ~5% off and
# the fit's error at small sizes was that noise; they are also the cheap calls to repeat.
PILOT_ROUNDS = 5
MIN_ROUNDS, MAX_ROUNDS, TARGET_SE = 15, 120, 0.015
FLUSH_BYTES = 32 << 20  # rewritten before each timed encoder call: a last-level cache's worth (cold start)


@dataclass(frozen=True)
class VisionSweep:
    rows: list[tuple[str, int, int, int, int, float]]
    seconds: float
    rounds: dict[tuple[int, int], int] = field(default_factory=dict)  # (patches, images) -> timed calls
    se_rel: dict[tuple[int, int], float] = field(default_factory=dict)  # its median's relative SE at the end


def run_vision_sweep(encoder: VisionEncoder, patches: list[int], images: tuple[int, ...],
                     reps: int = MIN_ROUNDS, embedding: EmbeddingStep | None = None, text_tokens: int = 32,
                     seed: int = 0, path: Path | None = None, max_reps: int = MAX_ROUNDS,
                     target_se: float = TARGET_SE, max_seconds: float = 120.0) -> VisionSweep:
    """Time the encoder per (patches per image, images per call) and, when given, the embedding step per
    vision token count; rows appended to `path` (vision_samples.csv) when given.

    Rounds, each visiting its sizes once in a fresh shuffled order (1 warm-up + 1 timed call per visit,
    caches flushed before the timed one): on a shared host the noise is per stretch of time, so every
    size's median spans the whole sweep instead of one lucky or unlucky second (the decode sweep's habit).
    Each size gets between `reps` and `max_reps` visits, as many as its pilot spread says its median needs
    for a relative SE of `target_se`, spread evenly over the rounds (PILOT_ROUNDS above); `max_seconds`
    cuts the rounds short. The `rep` column is the round."""
    from trt_latency.engines.adaptive import median_se_rel

    rng = np.random.default_rng([seed, 4242])
    t_start = time.perf_counter()
    flush = np.zeros(FLUSH_BYTES // 8)
    sizes = [(n, i) for n in patches for i in images]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in sizes}
    rows: list[tuple[str, int, int, int, int, float]] = []
    feats_for: dict[int, np.ndarray] = {}
    pilot = min(PILOT_ROUNDS, reps)
    need = {s: reps for s in sizes}
    total = reps
    r = 0
    while True:
        if r == pilot:  # plan every size's visits from the pilot's spread
            for s in sizes:
                v = np.asarray(times[s])
                med = float(np.median(v))
                sigma = 1.4826 * float(np.median(np.abs(v - med))) / med if med > 0 else 0.0
                want = math.ceil((1.2533 * sigma / target_se) ** 2) if target_se > 0 else max_reps
                need[s] = int(min(max(want, reps), max(max_reps, reps)))
            total = max(need.values())
        if r >= total or (r > pilot and time.perf_counter() - t_start > max_seconds):
            break
        # size s is visited in round r when its evenly spread schedule of need[s] visits over the rounds
        # after the pilot says so (every round for the size that needs the most)
        open_ = [s for s in sizes if r < pilot or (r - pilot + 1) * (need[s] - pilot) // (total - pilot)
                 > (r - pilot) * (need[s] - pilot) // (total - pilot)]
        for k in rng.permutation(len(open_)):
            n, i = open_[int(k)]
            tokens = int(round(n * i * encoder.tokens_per_patch))
            ms = float(encoder.time_call(n, i, 1, rng, flush)[0])
            times[(n, i)].append(ms)
            rows.append(("vision", i, n, tokens, r, ms))
            if embedding is not None and i == 1:
                if n not in feats_for:
                    feats_for[n] = encoder.encode(n, 1, rng)[0]
                embedding.run(feats_for[n], text_tokens, rng)  # warm-up
                flush.fill(float(r))  # cold, as after the encoder in the chain (0.03 ms warm vs 0.07 there)
                _, ms = embedding.run(feats_for[n], text_tokens, rng)
                rows.append(("embedding", i, n, tokens + text_tokens, r, float(ms)))
        r += 1
    if path is not None:
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", encoding="utf-8") as fh:
            if new:
                fh.write(",".join(VISION_COLUMNS) + "\n")
            for row in rows:
                fh.write(",".join(str(v) for v in row) + "\n")
    return VisionSweep(rows, time.perf_counter() - t_start, {s: len(v) for s, v in times.items()},
                       {s: median_se_rel(v) for s, v in times.items()})


def read_vision_samples(path: Path) -> list[tuple[str, int, int, int, int, float]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
        if tuple(header) != VISION_COLUMNS:
            raise InputError(path=str(path), row=1, expected=",".join(VISION_COLUMNS), got=",".join(header))
        for n, line in enumerate(fh, start=2):
            parts = line.strip().split(",")
            if len(parts) != len(VISION_COLUMNS):
                continue  # a partial trailing line from a killed run
            try:
                rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]), float(parts[5])))
            except ValueError:
                raise InputError(path=str(path), row=n, expected="stage,int,int,int,int,float", got=line.strip()) \
                    from None
    return rows


# ------------------------------------------------------------------------------------------ the chain


@dataclass(frozen=True)
class ChainTiming:
    vision_ms: float
    embedding_ms: float
    calls: int

    @property
    def before_prefill_ms(self) -> float:
        """What the chain adds to a request's TTFT ahead of the decoder's prefill."""
        return self.vision_ms + self.embedding_ms


class VisionChain:
    """encoder -> embedding step -> decoder prefill, the way a deployment runs a request with images.

    ``together``: the images of one request go to the encoder in one call (batched); else one call each."""

    def __init__(self, encoder: VisionEncoder, embedding: EmbeddingStep | None, together: bool = True) -> None:
        self.encoder = encoder
        self.embedding = embedding
        self.together = together

    def prompt(self, runner: Any, vision_tokens: int, text_tokens: int, images: int,
               rng: np.random.Generator) -> tuple[np.ndarray, ChainTiming]:
        """The decoder's prompt for a request with images, and what the encoder and embedding cost."""
        n = self.encoder.patches_for(vision_tokens, images)
        calls = [images] if self.together else [1] * images
        feats = []
        vision_ms = 0.0
        for k in calls:
            f, ms = self.encoder.encode(n, k, rng)
            feats.append(f)
            vision_ms += ms
        features = np.concatenate(feats, axis=0)
        emb_ms = 0.0
        if self.embedding is not None:
            embeds, emb_ms = self.embedding.run(features, text_tokens, rng)
            if embeds.shape[-1] != runner.hidden:
                raise InputError(f"embedding step {self.embedding.path} writes hidden {embeds.shape[-1]}; the "
                                 f"decoder takes {runner.hidden}")
        else:  # the host joins the features to the text embeddings (not timed: a copy)
            embeds = (rng.standard_normal((1, vision_tokens + text_tokens, runner.hidden)) * 0.5)
        dtype = getattr(getattr(runner, "dims", None), "token_dtype", np.float32)
        if getattr(runner, "mrope", False):
            self._announce_positions(runner, n, images, int(embeds.shape[1]))
        return np.ascontiguousarray(embeds, dtype=dtype), ChainTiming(vision_ms, emb_ms, len(calls))

    def _announce_positions(self, runner: Any, patches: int, images: int, prompt: int) -> None:
        """An M-RoPE decoder's prefill gets the images' grid positions (images first, then the text, as
        engines/mrope.py lays a prompt out) and its decode steps the rope delta; the runner applies them
        to the next generate."""
        from trt_latency.engines.mrope import image_tokens, prompt_positions

        llm_grid = getattr(self.encoder.adapter, "llm_grid", None)
        if llm_grid is None:  # a hook family: no grid known, the vision tokens are positioned as text
            return
        grid, merge = llm_grid(patches)
        text = prompt - images * image_tokens(grid, merge)
        if text >= 0:  # the encoder's rounded patch count fits the prompt (else: text positions)
            pos, delta = prompt_positions([grid] * images, text, merge)
            runner.set_prompt_positions(pos, delta)
