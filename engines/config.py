"""Plan file (configs/default.yaml or a user's YAML) -> validated TierSpec / ConfigKey / Plan.

Every problem raises ConfigError naming the file, the field (dotted path) and what was expected,
so a typo in a tier never surfaces later as a shape error inside ONNX Runtime.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_latency.errors import ConfigError
from trt_latency.schema import ConfigKey

__all__ = ["AdaptiveSpec", "BatchSweep", "ConfigKey", "Plan", "ReplaySpec", "RuntimeSpec", "SweepSpec", "TierSpec",
           "load_plan"]

DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2}
DEFAULT_CONFIG_NAME = "default.yaml"


@dataclass(frozen=True)
class TierSpec:
    """Dimensions of one reference decoder tier (a `tier_idx` the serving code passes)."""

    tier_idx: int
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int
    dtype: str
    max_past_len: int
    max_prefill_len: int

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def kv_bytes_per_token(self, num_active_blocks: int) -> int:
        """Bytes of K and V one token adds to the cache across the executed blocks."""
        return 2 * num_active_blocks * self.kv_heads * self.head_dim * self.dtype_size

    def params_per_block(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate * self.experts
        router = self.hidden * self.experts if self.experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden

    def params(self, num_active_blocks: int | None = None) -> int:
        blocks = self.layers if num_active_blocks is None else num_active_blocks
        return blocks * self.params_per_block() + self.hidden * self.vocab + self.hidden


@dataclass(frozen=True)
class RuntimeSpec:
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    huge_pages: bool = False  # CPU provider: opt-in 2 MiB pages (engines/hugepages.py); off = the ordinary backing
    # The replay runs in this many fresh processes, each loading the model once as a server does
    # (engines/replay_processes.py: a process's step level is drawn at load); 0 = in this process.
    replay_processes: int = 3


@dataclass(frozen=True)
class DecodeSweep:
    log_points: int
    linear_points: int
    reps: int
    warmup: int


@dataclass(frozen=True)
class PrefillSweep:
    lengths: tuple[int, ...]
    reps: int
    warmup: int = 1
    # The longest prompt timed on a model the user brings (--onnx; calibrate --max-prompt overrides), capped
    # by its context; the plan's own tiers and a TensorRT --engine keep the tier's max_prefill_len. None: the
    # primary tier's. (docs/decisions.md 18)
    model_max_len: int | None = None


@dataclass(frozen=True)
class AdaptiveSpec:
    """When the sweep stops visiting a position (plan ``sweep.adaptive``; engines/adaptive.py runs it)."""

    precision: float  # target relative standard error of every position's median; 0 = the fixed plan
    min_reps: int = 10  # rounds before a position may leave (its SE estimate needs a few values)
    prefill_precision: float | None = None  # None = precision
    time_budget_s: float | None = None  # cap on the whole calibrate (the CLI splits it over the configs)

    @property
    def enabled(self) -> bool:
        return self.precision > 0

    def target(self, phase: str) -> float:
        if phase == "prefill" and self.prefill_precision is not None:
            return self.prefill_precision
        return self.precision


@dataclass(frozen=True)
class SweepSpec:
    decode: DecodeSweep
    prefill: PrefillSweep
    seed: int = 0
    adaptive: AdaptiveSpec | None = None  # None: the fixed plan (every position gets decode.reps rounds)

    def warmups(self) -> dict[str, int]:
        """Untimed runs per visit, by phase."""
        return {"decode": self.decode.warmup, "prefill": self.prefill.warmup}


@dataclass(frozen=True)
class ReplaySpec:
    requests: int
    vision_tokens: tuple[int, ...]  # choices
    text_tokens: tuple[int, int]  # inclusive; drawn on text_scale
    output_tokens: tuple[int, int]  # log-uniform, inclusive
    seed: int = 0
    images: tuple[int, ...] = (1,)  # images per request with vision tokens (choices; a VLM plan's chain replay)
    # "log": text tokens log-uniform, as the outputs are: every scale of prompt gets requests, so the loop
    # terms' prompt forms (o_p + o_p1 P, c(P)) are told apart; uniform text (plus the vision choices) left about
    # 2.5% of prompts under 64 tokens, and a constant fitted on long prompts only overcharged short ones (+15-35%
    # TTFT at 44-78 tokens, issue 24).
    text_scale: str = "log"

    @property
    def max_prompt(self) -> int:
        return max(self.vision_tokens) + self.text_tokens[1]


TEXT_SCALES = ("log", "uniform")  # how a replay draws its text tokens (ReplaySpec.text_scale)


@dataclass(frozen=True)
class BatchSweep:
    """The batch axis (in-flight batching, engines/batch_sweep.py): batched decode steps per size.

    Size 1 is the decode sweep's own curve; every larger size is timed at uniform batches (every row at
    each of ``past_lens``) and at ``ragged`` seeded ragged batches, skipping shapes whose B * max L exceeds
    ``max_kv_tokens`` (0 = no cap). ``all_configs`` false: only the primary config (the served model)."""

    sizes: tuple[int, ...]
    past_lens: tuple[int, ...]
    ragged: int
    reps: int
    warmup: int = 1
    max_kv_tokens: int = 0
    all_configs: bool = False


@dataclass(frozen=True)
class Plan:
    tiers: dict[int, TierSpec]
    configs: list[ConfigKey]
    runtime: RuntimeSpec
    sweep: SweepSpec
    replay: ReplaySpec
    source: str = "<default>"
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    batch: BatchSweep | None = None  # None: no batch sweep (single-request calibration only)

    @property
    def primary(self) -> ConfigKey:
        """The first config: the one whose model `calibrate` writes as model.onnx."""
        return self.configs[0]

    def tier(self, tier_idx: int) -> TierSpec:
        try:
            return self.tiers[tier_idx]
        except KeyError:
            raise ConfigError(path=self.source, field="tier_idx", expected="one of "
                              + ", ".join(str(t) for t in sorted(self.tiers)), got=tier_idx) from None


# ---------------------------------------------------------------------------------------------
# Validation helpers: each names the file and the dotted field.


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, expected: str, got: object = None, message: str | None = None) -> ConfigError:
        return ConfigError(message, path=self.path, field=where, expected=expected, got=got)

    def mapping(self, value: object, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, "a mapping", _short(value))
        return value

    def keys(self, value: Mapping[str, Any], where: str, allowed: Sequence[str], required: Sequence[str]) -> None:
        for key in value:
            if key not in allowed:
                prefix = f"{where}." if where else ""
                raise self.fail(f"{prefix}{key}", "one of the keys " + ", ".join(allowed), message="unknown key")
        for key in required:
            if key not in value:
                prefix = f"{where}." if where else ""
                raise self.fail(f"{prefix}{key}", "this key to be present", message="missing key")

    def integer(self, value: object, where: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, _range_text("an integer", lo, hi), _short(value))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(where, _range_text("an integer", lo, hi), value)
        return value

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, "true or false", _short(value))
        return value

    def int_list(self, value: object, where: str, lo: int | None = None, n: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, "a non-empty list of integers" if n is None else f"a list of {n} integers",
                            _short(value))
        if n is not None and len(value) != n:
            raise self.fail(where, f"a list of {n} integers", _short(value))
        return tuple(self.integer(v, f"{where}[{i}]", lo=lo) for i, v in enumerate(value))


def _range_text(what: str, lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{what} in [{lo}, {hi}]"
    if lo is not None:
        return f"{what} >= {lo}"
    if hi is not None:
        return f"{what} <= {hi}"
    return what


def _short(value: object) -> object:
    text = repr(value)
    return value if len(text) <= 60 else text[:57] + "..."


_TIER_INT_FIELDS = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "experts",
                    "max_past_len", "max_prefill_len")
_TIER_KEYS = ("tier_idx", "name", *_TIER_INT_FIELDS, "dtype")


def _tier(ctx: _Ctx, raw: object, where: str) -> TierSpec:
    m = ctx.mapping(raw, where)
    ctx.keys(m, where, _TIER_KEYS, [k for k in _TIER_KEYS if k != "name"])
    ints = {k: ctx.integer(m[k], f"{where}.{k}", lo=1) for k in _TIER_INT_FIELDS}
    tier_idx = ctx.integer(m["tier_idx"], f"{where}.tier_idx", lo=0)
    name = m.get("name", f"tier{tier_idx}")
    if not isinstance(name, str) or not name:
        raise ctx.fail(f"{where}.name", "a non-empty string", _short(name))
    dtype = m["dtype"]
    if dtype not in DTYPE_SIZES:
        raise ctx.fail(f"{where}.dtype", "one of " + ", ".join(DTYPE_SIZES), _short(dtype))
    if ints["heads"] % ints["kv_heads"]:
        raise ctx.fail(f"{where}.kv_heads", f"a divisor of heads ({ints['heads']}) for grouped-query attention",
                       ints["kv_heads"])
    if ints["head_dim"] % 2:
        raise ctx.fail(f"{where}.head_dim", "an even integer (RoPE rotates pairs)", ints["head_dim"])
    return TierSpec(tier_idx=tier_idx, name=name, dtype=dtype, **ints)


def _decode(ctx: _Ctx, raw: object, where: str, base: DecodeSweep | None) -> DecodeSweep:
    m = ctx.mapping(raw, where)
    keys = ("log_points", "linear_points", "reps", "warmup")
    ctx.keys(m, where, keys, keys if base is None else ())
    vals: dict[str, int] = {}
    for k in keys:
        if k in m:
            vals[k] = ctx.integer(m[k], f"{where}.{k}", lo=0 if k in ("warmup", "linear_points") else 1)
        else:
            assert base is not None
            vals[k] = getattr(base, k)
    if vals["log_points"] < 2:
        raise ctx.fail(f"{where}.log_points", "an integer >= 2 (the grid spans 1 .. max_past_len)",
                       vals["log_points"])
    return DecodeSweep(**vals)


def _prefill(ctx: _Ctx, raw: object, where: str, base: PrefillSweep | None) -> PrefillSweep:
    m = ctx.mapping(raw, where)
    ctx.keys(m, where, ("lengths", "reps", "warmup", "model_max_len"), ("lengths", "reps") if base is None else ())
    lengths = ctx.int_list(m["lengths"], f"{where}.lengths", lo=1) if "lengths" in m else None
    if lengths is not None and len(set(lengths)) != len(lengths):
        raise ctx.fail(f"{where}.lengths", "distinct lengths", list(lengths))
    reps = ctx.integer(m["reps"], f"{where}.reps", lo=1) if "reps" in m else None
    warmup = ctx.integer(m["warmup"], f"{where}.warmup", lo=0) if "warmup" in m else None
    model_max = ctx.integer(m["model_max_len"], f"{where}.model_max_len", lo=1) if "model_max_len" in m else None
    if base is None:
        assert lengths is not None and reps is not None
        return PrefillSweep(lengths=tuple(sorted(lengths)), reps=reps, warmup=1 if warmup is None else warmup,
                            model_max_len=model_max)
    return PrefillSweep(lengths=base.lengths if lengths is None else tuple(sorted(lengths)),
                        reps=base.reps if reps is None else reps,
                        warmup=base.warmup if warmup is None else warmup,
                        model_max_len=base.model_max_len if model_max is None else model_max)


def _number(ctx: _Ctx, value: object, where: str, lo: float, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            lo <= value and (hi is None or value <= hi)):
        raise ctx.fail(where, f"a number in [{lo:g}, {hi:g}]" if hi is not None else f"a number >= {lo:g}",
                       _short(value))
    return float(value)


def _adaptive(ctx: _Ctx, raw: object, where: str, base: AdaptiveSpec | None) -> AdaptiveSpec:
    m = ctx.mapping(raw, where)
    ctx.keys(m, where, ("precision", "min_reps", "prefill_precision", "time_budget_s"),
             ("precision",) if base is None else ())
    precision = _number(ctx, m["precision"], f"{where}.precision", 0.0, 1.0) if "precision" in m else None
    min_reps = ctx.integer(m["min_reps"], f"{where}.min_reps", lo=3) if "min_reps" in m else None
    pre = m.get("prefill_precision")
    prefill = _number(ctx, pre, f"{where}.prefill_precision", 0.0, 1.0) if pre is not None else None
    budget = m.get("time_budget_s")
    time_budget = _number(ctx, budget, f"{where}.time_budget_s", 1.0) if budget is not None else None
    if base is None:
        assert precision is not None
        return AdaptiveSpec(precision, 10 if min_reps is None else min_reps, prefill, time_budget)
    return AdaptiveSpec(precision=base.precision if precision is None else precision,
                        min_reps=base.min_reps if min_reps is None else min_reps,
                        prefill_precision=prefill if "prefill_precision" in m else base.prefill_precision,
                        time_budget_s=time_budget if "time_budget_s" in m else base.time_budget_s)


def _replay(ctx: _Ctx, raw: object, where: str, base: ReplaySpec | None) -> ReplaySpec:
    m = ctx.mapping(raw, where)
    keys = ("requests", "vision_tokens", "text_tokens", "output_tokens", "seed", "images", "text_scale")
    ctx.keys(m, where, keys, () if base is not None else ("requests", "vision_tokens", "text_tokens",
                                                            "output_tokens"))
    requests = ctx.integer(m["requests"], f"{where}.requests", lo=0) if "requests" in m else None
    vision = ctx.int_list(m["vision_tokens"], f"{where}.vision_tokens", lo=0) if "vision_tokens" in m else None
    text = ctx.int_list(m["text_tokens"], f"{where}.text_tokens", lo=0, n=2) if "text_tokens" in m else None
    out = ctx.int_list(m["output_tokens"], f"{where}.output_tokens", lo=1, n=2) if "output_tokens" in m else None
    seed = ctx.integer(m["seed"], f"{where}.seed", lo=0) if "seed" in m else None
    images = ctx.int_list(m["images"], f"{where}.images", lo=1) if "images" in m else None
    scale = m.get("text_scale")
    if scale is not None and scale not in TEXT_SCALES:
        raise ctx.fail(f"{where}.text_scale", f"one of {', '.join(TEXT_SCALES)}", scale)
    for name, rng in (("text_tokens", text), ("output_tokens", out)):
        if rng is not None and rng[0] > rng[1]:
            raise ctx.fail(f"{where}.{name}", "[low, high] with low <= high", list(rng))
    if base is None:
        assert requests is not None and vision is not None and text is not None and out is not None
        spec = ReplaySpec(requests, vision, (text[0], text[1]), (out[0], out[1]), 0 if seed is None else seed,
                          (1,) if images is None else images, "log" if scale is None else str(scale))
    else:
        spec = ReplaySpec(
            requests=base.requests if requests is None else requests,
            vision_tokens=base.vision_tokens if vision is None else vision,
            text_tokens=base.text_tokens if text is None else (text[0], text[1]),
            output_tokens=base.output_tokens if out is None else (out[0], out[1]),
            seed=base.seed if seed is None else seed,
            images=base.images if images is None else images,
            text_scale=base.text_scale if scale is None else str(scale),
        )
    if spec.max_prompt < 1:
        raise ctx.fail(f"{where}.text_tokens", "a prompt of at least 1 token (vision + text)", list(spec.text_tokens))
    return spec


def _batch(ctx: _Ctx, raw: object, where: str, base: BatchSweep | None) -> BatchSweep:
    m = ctx.mapping(raw, where)
    keys = ("sizes", "past_lens", "ragged", "reps", "warmup", "max_kv_tokens", "all_configs")
    ctx.keys(m, where, keys, ("sizes", "past_lens", "reps") if base is None else ())
    vals: dict[str, Any] = {}
    for k in ("sizes", "past_lens"):
        if k in m:
            items = ctx.int_list(m[k], f"{where}.{k}", lo=1)
            if len(set(items)) != len(items):
                raise ctx.fail(f"{where}.{k}", "distinct values", list(items))
            vals[k] = tuple(sorted(items))
    for k, lo in (("ragged", 0), ("reps", 1), ("warmup", 0), ("max_kv_tokens", 0)):
        if k in m:
            vals[k] = ctx.integer(m[k], f"{where}.{k}", lo=lo)
    if "all_configs" in m:
        if not isinstance(m["all_configs"], bool):
            raise ctx.fail(f"{where}.all_configs", "true or false", _short(m["all_configs"]))
        vals["all_configs"] = m["all_configs"]
    if base is None:
        vals.setdefault("ragged", 0)
        spec = BatchSweep(**vals)
    else:
        spec = BatchSweep(**{f: vals.get(f, getattr(base, f)) for f in BatchSweep.__dataclass_fields__})
    if spec.sizes[0] != 1:
        raise ctx.fail(f"{where}.sizes", "sizes starting at 1 (the single-request curve)", list(spec.sizes))
    if len(spec.sizes) < 2:
        raise ctx.fail(f"{where}.sizes", "at least one batch size > 1", list(spec.sizes))
    return spec


# Keeps default_plan_path()'s file alive for the process: from a zipped install, as_file extracts a
# temporary copy that its context would delete on exit. Closed (the copy removed) at interpreter exit.
_RESOURCES = contextlib.ExitStack()
atexit.register(_RESOURCES.close)


@functools.cache
def default_plan_path() -> Path:
    """Path of the packaged default plan (trt_latency/configs/default.yaml), valid until the process exits
    (a real file for an editable or wheel install; an extracted copy for a zipped one)."""
    from importlib.resources import as_file, files

    resource = files("trt_latency.configs").joinpath(DEFAULT_CONFIG_NAME)
    return Path(_RESOURCES.enter_context(as_file(resource)))


def load_plan(path: str | os.PathLike[str] | None = None, quick: bool = False) -> Plan:
    """Read and validate a plan. ``path=None`` = the packaged default.yaml.

    ``quick=True`` keeps only the first config and applies the file's ``quick:`` overrides
    (decode / prefill / replay sections, each merged key by key).
    """
    import yaml

    if path is None:  # packaged default: read through importlib.resources (works from a zip too)
        from importlib.resources import files

        resource = files("trt_latency.configs").joinpath(DEFAULT_CONFIG_NAME)
        spath = str(resource)
        read = resource.read_text
    else:
        p = Path(path)
        spath = str(p)
        if not p.is_file():
            raise ConfigError("file not found", path=spath, expected="a YAML plan file")
        read = p.read_text
    ctx = _Ctx(spath)
    try:
        raw = yaml.safe_load(read(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML{where} ({getattr(exc, 'problem', None) or exc})", path=spath,
                          expected="a YAML mapping (see configs/default.yaml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read ({exc})", path=spath) from None
    top = ctx.mapping(raw, "<top level>")
    ctx.keys(top, "", ("schema_version", "tiers", "configs", "runtime", "sweep", "quick", "replay", "batch"),
             ("tiers", "configs", "sweep", "replay"))
    if "schema_version" in top and top["schema_version"] != 1:
        raise ctx.fail("schema_version", "1", _short(top["schema_version"]))

    if not isinstance(top["tiers"], list) or not top["tiers"]:
        raise ctx.fail("tiers", "a non-empty list of tiers", _short(top["tiers"]))
    tiers: dict[int, TierSpec] = {}
    for i, t in enumerate(top["tiers"]):
        tier = _tier(ctx, t, f"tiers[{i}]")
        if tier.tier_idx in tiers:
            raise ctx.fail(f"tiers[{i}].tier_idx", "a tier_idx not used by another tier", tier.tier_idx)
        tiers[tier.tier_idx] = tier

    if not isinstance(top["configs"], list) or not top["configs"]:
        raise ctx.fail("configs", "a non-empty list of {tier_idx, top_k, num_active_blocks}", _short(top["configs"]))
    configs: list[ConfigKey] = []
    for i, c in enumerate(top["configs"]):
        where = f"configs[{i}]"
        m = ctx.mapping(c, where)
        ctx.keys(m, where, ConfigKey._fields, ConfigKey._fields)
        tier_idx = ctx.integer(m["tier_idx"], f"{where}.tier_idx", lo=0)
        if tier_idx not in tiers:
            raise ctx.fail(f"{where}.tier_idx", "a tier_idx defined under tiers ("
                           + ", ".join(str(t) for t in sorted(tiers)) + ")", tier_idx)
        tier = tiers[tier_idx]
        top_k = ctx.integer(m["top_k"], f"{where}.top_k", lo=1, hi=tier.experts)
        blocks = ctx.integer(m["num_active_blocks"], f"{where}.num_active_blocks", lo=1, hi=tier.layers)
        key = ConfigKey(tier_idx, top_k, blocks)
        if key in configs:
            raise ctx.fail(where, "each config listed once", dict(key._asdict()))
        configs.append(key)

    runtime = RuntimeSpec()
    if "runtime" in top:
        m = ctx.mapping(top["runtime"], "runtime")
        ctx.keys(m, "runtime", ("intra_op_threads", "inter_op_threads", "huge_pages", "replay_processes"), ())
        runtime = RuntimeSpec(
            intra_op_threads=ctx.integer(m.get("intra_op_threads", 2), "runtime.intra_op_threads", lo=0),
            inter_op_threads=ctx.integer(m.get("inter_op_threads", 1), "runtime.inter_op_threads", lo=0),
            huge_pages=ctx.boolean(m.get("huge_pages", False), "runtime.huge_pages"),
            replay_processes=ctx.integer(m.get("replay_processes", RuntimeSpec.replay_processes),
                                         "runtime.replay_processes", lo=0),
        )

    sw = ctx.mapping(top["sweep"], "sweep")
    ctx.keys(sw, "sweep", ("decode", "prefill", "seed", "adaptive"), ("decode", "prefill"))
    sweep = SweepSpec(decode=_decode(ctx, sw["decode"], "sweep.decode", None),
                      prefill=_prefill(ctx, sw["prefill"], "sweep.prefill", None),
                      seed=ctx.integer(sw.get("seed", 0), "sweep.seed", lo=0),
                      adaptive=_adaptive(ctx, sw["adaptive"], "sweep.adaptive", None) if "adaptive" in sw else None)
    replay = _replay(ctx, top["replay"], "replay", None)
    batch = _batch(ctx, top["batch"], "batch", None) if top.get("batch") is not None else None

    if "quick" in top:
        q = ctx.mapping(top["quick"], "quick")
        ctx.keys(q, "quick", ("decode", "prefill", "replay", "adaptive", "batch"), ())
        # A preset: usually only adaptive (a looser precision, a time budget) on the same grid; decode /
        # prefill grid overrides are still read (older plans).
        quick_adaptive = sweep.adaptive
        if "adaptive" in q:
            if sweep.adaptive is None and "precision" not in ctx.mapping(q["adaptive"], "quick.adaptive"):
                raise ctx.fail("quick.adaptive.precision", "a precision (sweep has no adaptive section)",
                               message="missing key")
            quick_adaptive = _adaptive(ctx, q["adaptive"], "quick.adaptive", sweep.adaptive)
        quick_sweep = SweepSpec(
            decode=_decode(ctx, q["decode"], "quick.decode", sweep.decode) if "decode" in q else sweep.decode,
            prefill=_prefill(ctx, q["prefill"], "quick.prefill", sweep.prefill) if "prefill" in q else sweep.prefill,
            seed=sweep.seed,
            adaptive=quick_adaptive,
        )
        quick_replay = _replay(ctx, q["replay"], "quick.replay", replay) if "replay" in q else replay
        if "batch" in q and batch is None:
            raise ctx.fail("quick.batch", "a top-level batch block for it to override", message="no batch block")
        quick_batch = _batch(ctx, q["batch"], "quick.batch", batch) if "batch" in q else batch
    else:
        quick_sweep, quick_replay, quick_batch = sweep, replay, batch
    if quick:
        sweep, replay, configs, batch = quick_sweep, quick_replay, configs[:1], quick_batch

    # Cross-checks: every measured shape must fit the tier's profile.
    for i, key in enumerate(configs):
        tier = tiers[key.tier_idx]
        for section, pre in (("sweep.prefill", sweep.prefill), ("quick.prefill", quick_sweep.prefill)):
            if max(pre.lengths) > tier.max_prefill_len:
                raise ctx.fail(f"{section}.lengths", f"lengths <= max_prefill_len ({tier.max_prefill_len}) of tier "
                               f"{tier.tier_idx} used by configs[{i}]", max(pre.lengths))
        for section, rep in (("replay", replay), ("quick.replay", quick_replay)):
            if rep.max_prompt > tier.max_prefill_len:
                raise ctx.fail(f"{section}.text_tokens", f"max vision + max text tokens <= max_prefill_len "
                               f"({tier.max_prefill_len}) of tier {tier.tier_idx}", rep.max_prompt)
            if rep.max_prompt + rep.output_tokens[1] - 1 > tier.max_past_len:
                raise ctx.fail(f"{section}.output_tokens", f"max prompt + max output - 1 <= max_past_len "
                               f"({tier.max_past_len}) of tier {tier.tier_idx}", rep.output_tokens[1])
        if tier.max_past_len < 2:
            raise ctx.fail(f"tiers[{tier.tier_idx}].max_past_len", "an integer >= 2", tier.max_past_len)
    return Plan(tiers=tiers, configs=configs, runtime=runtime, sweep=sweep, replay=replay, source=spath, quick=quick,
                batch=batch)
