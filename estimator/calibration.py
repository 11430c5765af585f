"""calibration.yaml: the versioned file a fit writes and an Estimator loads.

Schema version 1 (one mapping)::

    schema_version: 1
    provenance: {backend, device, engine_sha256, versions: {...}, date, ...}   # free-form scalars
    configs:
      - tier_idx: 0
        top_k: 1
        num_active_blocks: 4
        decode_knots: [1.0, 512.0, 4096.0]          # strictly increasing past_len
        decode_values_ms: [0.9, 1.1, 2.3]            # > 0, non-decreasing (monotone T(L))
        prefill_coeffs: [a, b, c]                    # prefill(S) = a + b*S + c*S^2
        residual_quantiles: {0.5: 1.0, 0.9: 1.04}   # q -> ratio measured / fitted
        conformal: null | {alphas: [...], factors: [...], n: int}
        valid_past_len: [lo, hi]
        valid_prefill_len: [lo, hi]
        fit_error: {loo_median_rel, loo_max_rel, n_positions, knots_chosen_by}
        kv_bytes_per_token: null | int
        serving_loop:                                # optional (absent = zeros; not written when unset)
          {decode_step_ms: o, first_step_ms: c, prefill_ms: o_p, n_requests: int, source: replay|none|borrowed:t<i>.k<k>.b<b>,
           clamped: [o, c, c1, o_p]}                 # optional: the terms the fit held at 0 (absent = none)
    factorised:                                       # per tier: t0 + blocks*(u + w*top_k + v*L)
      - {tier_idx, t0, u, w, v, valid_past_len, heldout_median_rel, heldout_max_rel, n_configs}
    preference:                                       # optional: Estimator.choose's order, first = preferred
      - {tier_idx: 0, top_k: 2, num_active_blocks: 8}  # each a measured config (or one in a factorised tier)

Schema version 2 adds an optional per-config ``batch`` section (in-flight batching: the step cost
T(B, X) per measured batch size, estimator/batch_model.py; BATCH_CONTRACT.md)::

        batch:
          kv_read: padded                 # or packed: X = B * max(L) or sum(L)
          prefill_with_batch: separate
          sizes: [1, 2, 4, 8]             # ascending, sizes[0] == 1
          curves:                         # one monotone piecewise-linear T_b(X) per size
            - {batch: 1, knots_x: [...], values_ms: [...]}
          fit_error: {lopo_median_rel, lopo_max_rel, lobo_median_rel, lobo_max_rel, ragged_median_rel, ...}
          valid_x: [lo, hi]

A file is written as version 1 when no config has a batch section (older readers keep reading it,
and version-1 files round-trip byte identical) and as version 2 otherwise.

Schema version 3 adds the first step's growth with the prompt to the serving loop,
c(P) = first_step_ms + first_step_per_token_ms * P (``first_step_per_token_ms: c1``, ms per prompt token,
>= 0). A file is written as version 3 only when some c1 > 0 (an older reader then refuses the file instead
of silently predicting with c1 = 0); files without it load with c1 = 0. The prefill side's o_p grows the
same way where the replay supports it, o_p(P) = prefill_ms + prefill_per_token_ms * P (written, and
making the file version 3, only when > 0).

The serving-loop section models what a real generate loop adds to the engine-only sweep
(estimator.fit.fit_serving_loop): total(n) = prefill(P) + o_p + [n >= 2] * c + sum_{j=0}^{n-2} (T(P+j) + o).
It is optional inside schema 1, so files written before it existed load unchanged (and round-trip
byte identical: the key is only written when set). So is ``preference`` (absent: choose tries the
measured configs most expensive first).

Loading only ever raises CalibrationError (naming the file, the field and what was expected);
saving is atomic (temp file in the same folder + os.replace) and canonical, so
save -> load -> save is byte identical.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trt_latency.errors import CalibrationError
from trt_latency.schema import ConfigKey

SCHEMA_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
BATCH_KV_READS = ("padded", "packed")
BATCH_PREFILL_MODES = ("separate", "mixed")
# Largest tier_idx / top_k / num_active_blocks a file may name (keeps lookup tables small).
MAX_CONFIG_INT = 4095


SERVING_LOOP_SOURCES = ("replay", "none")
LOOP_TERMS = ("o", "c", "c1", "o_p")  # names of the serving-loop terms (ServingLoop.clamped)
# Terms copied from another config's replay (a config with no replay of its own): "borrowed:t0.k1.b4".
BORROWED_SOURCE = re.compile(r"borrowed:t\d+\.k\d+\.b\d+")


def borrowed_source(key: tuple[int, int, int]) -> str:
    """The serving-loop `source` of terms borrowed from config `key`."""
    return f"borrowed:t{int(key[0])}.k{int(key[1])}.b{int(key[2])}"


@dataclass(frozen=True)
class ServingLoop:
    """Per-request cost of the serving loop around the engine, fitted from replayed requests (all ms, >= 0).

    decode_step_ms (o): added to every decode step (re-binding, argmax, embedding copy);
    first_step_ms (c0) + first_step_per_token_ms (c1) * P: once per request with >= 1 decode step (cold
    caches after the prefill; a runtime that frees the P x vocab prefill logits there pays per prompt
    token: c1 > 0 only where the replay supports the slope, estimator.fit.fit_loop_terms);
    prefill_ms (o_p) + prefill_per_token_ms (o_p1) * P: added to the prefill (TTFT) side (a runtime that
    allocates and writes the P x vocab logits of the prefill pays per prompt token; o_p1 > 0 only where the
    replay supports the slope).
    clamped: the terms the fit held at their bound 0 (the data asked for a negative value), by name
    ("o", "c", "c1", "o_p"): a 0 there is a bound, not a measurement.
    """

    decode_step_ms: float = 0.0
    first_step_ms: float = 0.0
    prefill_ms: float = 0.0
    n_requests: int = 0
    source: str = "none"
    first_step_per_token_ms: float = 0.0
    clamped: tuple[str, ...] = ()
    prefill_per_token_ms: float = 0.0

    def first_ms(self, prompt: float) -> float:
        """c(P): the one-off first decode step's extra cost after a prefill of `prompt` tokens."""
        return self.first_step_ms + self.first_step_per_token_ms * prompt

    def prefill_extra_ms(self, prompt: float) -> float:
        """o_p(P): what the loop adds to the engine's prefill of `prompt` tokens (the TTFT side)."""
        return self.prefill_ms + self.prefill_per_token_ms * prompt

    @property
    def has_slope(self) -> bool:
        """A term per prompt token (c1 or o_p1): the file is schema 3 (an older reader refuses it)."""
        return bool(self.first_step_per_token_ms or self.prefill_per_token_ms)


@dataclass
class ConfigCalibration:
    """Everything the estimator needs for one measured config (tier_idx, top_k, num_active_blocks)."""

    tier_idx: int
    top_k: int
    num_active_blocks: int
    decode_knots: list[float]
    decode_values_ms: list[float]
    prefill_coeffs: list[float]
    residual_quantiles: dict[float, float]
    valid_past_len: list[float]
    valid_prefill_len: list[float]
    fit_error: dict[str, Any] = field(default_factory=dict)
    conformal: dict[str, Any] | None = None
    kv_bytes_per_token: int | None = None
    serving_loop: ServingLoop | None = None  # None = no loop terms (zeros)
    batch: dict[str, Any] | None = None  # in-flight batching section (schema 2); None = single request only

    @property
    def key(self) -> ConfigKey:
        return ConfigKey(self.tier_idx, self.top_k, self.num_active_blocks)


@dataclass
class FactorisedModel:
    """Decode step of configs not measured, per tier: t0 + blocks*(u + w*top_k + v*L)."""

    tier_idx: int
    t0: float
    u: float
    w: float
    v: float
    valid_past_len: list[float]
    n_configs: int
    heldout_median_rel: float | None = None  # leave-one-config-out; None with < 2 configs
    heldout_max_rel: float | None = None

    def step_ms(self, past_len: float, top_k: int, num_active_blocks: int) -> float:
        return self.t0 + num_active_blocks * (self.u + self.w * top_k + self.v * past_len)


@dataclass
class Calibration:
    schema_version: int
    provenance: dict[str, Any]
    configs: list[ConfigCalibration]
    factorised: list[FactorisedModel] = field(default_factory=list)
    preference: list[ConfigKey] = field(default_factory=list)  # Estimator.choose's order (empty: by cost)
    vision: Any = None  # estimator.vision.VisionCalibration of a VLM's encoder (absent: text-only deployment)

    def config(self, tier_idx: int, top_k: int, num_active_blocks: int) -> ConfigCalibration:
        for cfg in self.configs:
            if cfg.key == (tier_idx, top_k, num_active_blocks):
                return cfg
        raise KeyError((tier_idx, top_k, num_active_blocks))


def with_conformal(
    cal: Calibration,
    key: tuple[int, int, int],
    alphas: Sequence[float],
    factors: Sequence[float],
    n: int,
) -> Calibration:
    """A copy of `cal` with conformal factors stored for config `key` (validated like a loaded file)."""
    configs = []
    found = False
    for cfg in cal.configs:
        if cfg.key == tuple(key):
            found = True
            cfg = dataclasses.replace(
                cfg, conformal={"alphas": [float(a) for a in alphas], "factors": [float(f) for f in factors], "n": int(n)}
            )
        configs.append(cfg)
    if not found:
        raise CalibrationError(field="configs", expected=f"a measured config {tuple(key)}", got=None)
    out = dataclasses.replace(cal, configs=configs)
    validate_calibration(out)
    return out


def with_serving_loop(cal: Calibration, loops: Mapping[tuple[int, int, int], ServingLoop]) -> Calibration:
    """A copy of `cal` with the serving-loop terms set on the configs named in `loops` (validated)."""
    known = {c.key for c in cal.configs}
    for key in loops:
        if tuple(key) not in known:
            raise CalibrationError(field="configs", expected=f"a measured config {tuple(key)}", got=None)
    configs = [dataclasses.replace(c, serving_loop=loops[c.key]) if c.key in loops else c for c in cal.configs]
    out = dataclasses.replace(cal, configs=configs, schema_version=max(cal.schema_version, schema_version_for(configs)))
    validate_calibration(out)
    return out


def _loop_dict(loop: ServingLoop) -> dict[str, Any]:
    out: dict[str, Any] = {
        "decode_step_ms": float(loop.decode_step_ms),
        "first_step_ms": float(loop.first_step_ms),
        "prefill_ms": float(loop.prefill_ms),
        "n_requests": int(loop.n_requests),
        "source": str(loop.source),
    }
    # Written only when set, so files without them round-trip byte identical.
    if loop.first_step_per_token_ms:
        out["first_step_per_token_ms"] = float(loop.first_step_per_token_ms)
    if loop.prefill_per_token_ms:
        out["prefill_per_token_ms"] = float(loop.prefill_per_token_ms)
    if loop.clamped:
        out["clamped"] = list(loop.clamped)
    return out


def _config_dict(c: ConfigCalibration) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tier_idx": c.tier_idx,
        "top_k": c.top_k,
        "num_active_blocks": c.num_active_blocks,
        "decode_knots": [float(x) for x in c.decode_knots],
        "decode_values_ms": [float(x) for x in c.decode_values_ms],
        "prefill_coeffs": [float(x) for x in c.prefill_coeffs],
        "residual_quantiles": {float(q): float(r) for q, r in sorted(c.residual_quantiles.items())},
        "conformal": None
        if c.conformal is None
        else {
            "alphas": [float(a) for a in c.conformal["alphas"]],
            "factors": [float(f) for f in c.conformal["factors"]],
            "n": int(c.conformal["n"]),
        },
        "valid_past_len": [float(x) for x in c.valid_past_len],
        "valid_prefill_len": [float(x) for x in c.valid_prefill_len],
        "fit_error": _plain(c.fit_error),
        "kv_bytes_per_token": None if c.kv_bytes_per_token is None else int(c.kv_bytes_per_token),
    }
    if c.serving_loop is not None:  # absent when unset: files without it stay byte identical
        out["serving_loop"] = _loop_dict(c.serving_loop)
    if c.batch is not None:
        out["batch"] = _batch_dict(c.batch)
    return out


def _batch_dict(section: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical form of a batch section (fixed key order, plain floats)."""
    out: dict[str, Any] = {
        "kv_read": str(section["kv_read"]),
        "prefill_with_batch": str(section.get("prefill_with_batch", "separate")),
        "sizes": [int(v) for v in section["sizes"]],
        "curves": [{"batch": int(c["batch"]), "knots_x": [float(v) for v in c["knots_x"]],
                    "values_ms": [float(v) for v in c["values_ms"]]} for c in section["curves"]],
        "fit_error": _plain(dict(section.get("fit_error") or {})),
    }
    if section.get("valid_x") is not None:
        out["valid_x"] = [float(v) for v in section["valid_x"]]
    if section.get("conformal") is not None:  # the serving side's factors from a batched replay (optional)
        conf = section["conformal"]
        out["conformal"] = {"alphas": [float(v) for v in conf["alphas"]], "factors": [float(v) for v in conf["factors"]]}
    return out


def schema_version_for(configs: Sequence[ConfigCalibration]) -> int:
    """1 unless a config carries a batch section (then 2) or a first-step slope c1 > 0 (then 3, which an
    older reader refuses instead of silently dropping c1): files without them stay readable by old tools."""
    if any(c.serving_loop is not None and c.serving_loop.has_slope for c in configs):
        return 3
    return 2 if any(c.batch is not None for c in configs) else 1


def with_batch(cal: Calibration, sections: Mapping[tuple[int, int, int], Mapping[str, Any] | None]) -> Calibration:
    """A copy of `cal` with batch sections set on the configs named (validated; schema version follows)."""
    known = {c.key for c in cal.configs}
    for key in sections:
        if tuple(key) not in known:
            raise CalibrationError(field="configs", expected=f"a measured config {tuple(key)}", got=None)
    configs = [dataclasses.replace(c, batch=None if sections[c.key] is None else _batch_dict(sections[c.key]))  # type: ignore[arg-type]
               if c.key in sections else c for c in cal.configs]
    out = dataclasses.replace(cal, configs=configs, schema_version=schema_version_for(configs))
    validate_calibration(out)
    return out


# ----------------------------------------------------------------------------------------- save


def calibration_to_dict(cal: Calibration) -> dict[str, Any]:
    """The canonical mapping written to YAML (fixed key order)."""
    out = {
        "schema_version": cal.schema_version,
        "provenance": _plain(cal.provenance),
        "configs": [_config_dict(c) for c in cal.configs],
        "factorised": [
            {
                "tier_idx": f.tier_idx,
                "t0": float(f.t0),
                "u": float(f.u),
                "w": float(f.w),
                "v": float(f.v),
                "valid_past_len": [float(x) for x in f.valid_past_len],
                "n_configs": int(f.n_configs),
                "heldout_median_rel": None if f.heldout_median_rel is None else float(f.heldout_median_rel),
                "heldout_max_rel": None if f.heldout_max_rel is None else float(f.heldout_max_rel),
            }
            for f in cal.factorised
        ],
    }
    if cal.preference:  # absent when unset: files without it stay byte identical
        out["preference"] = [dict(k._asdict()) for k in cal.preference]
    if cal.vision is not None:  # absent when unset, like preference
        from trt_latency.estimator.vision import vision_to_dict

        out["vision"] = vision_to_dict(cal.vision)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars and tuples -> plain YAML-safe Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item"):  # numpy scalar
        return _plain(value.item())
    if isinstance(value, datetime.date):
        return value.isoformat()
    return str(value)


class _Dumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # Lists of scalars on one line (diff friendly); lists of mappings as blocks.
    flow = all(not isinstance(x, dict | list) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)

_YAML_BREAKS = ("\x85", "\u2028", "\u2029")  # line breaks to YAML 1.1 besides \n and \r


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # With allow_unicode PyYAML writes these raw inside a single-quoted scalar, and its reader folds them
    # into a space: a provenance string would not round-trip. Double quotes escape them (\N, \L, \P).
    if any(b in data for b in _YAML_BREAKS):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')
    return dumper.represent_str(data)


_Dumper.add_representer(str, _represent_str)


def dump_calibration(cal: Calibration) -> str:
    validate_calibration(cal)
    header = f"# trt-latency calibration (schema {cal.schema_version}). Written by `trt-latency fit`; format: ARCHITECTURE.md, 'Estimator contracts'.\n"
    return header + yaml.dump(calibration_to_dict(cal), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16)


def save_calibration(cal: Calibration, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a temp file in the target folder, fsync, then os.replace."""
    text = dump_calibration(cal)
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


# ----------------------------------------------------------------------------------------- load


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read and validate a calibration file; any problem is a CalibrationError naming file and field."""
    p = os.fspath(path)
    try:
        raw = Path(p).read_bytes()
    except FileNotFoundError:
        raise CalibrationError("file not found", path=p) from None
    except OSError as exc:
        raise CalibrationError(f"cannot read ({exc.strerror or exc})", path=p) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"not UTF-8 text (byte {exc.start})", path=p, expected="a YAML calibration file") from None
    if "\x00" in text:
        raise CalibrationError("binary data", path=p, expected="a YAML calibration file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise CalibrationError(f"malformed YAML{where}: {problem}", path=p) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. absurd timestamps inside the YAML
        raise CalibrationError(f"malformed YAML: {exc}", path=p) from None
    return calibration_from_dict(data, path=p)


def calibration_from_dict(data: Any, path: str | None = None) -> Calibration:
    v = _Validator(path)
    return v.calibration(data)


def validate_calibration(cal: Calibration, path: str | None = None) -> None:
    """Check an in-memory Calibration with the same rules as a loaded file."""
    calibration_from_dict(_roundtrip_dict(cal), path=path)


def _roundtrip_dict(cal: Calibration) -> Any:
    try:
        return calibration_to_dict(cal)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CalibrationError(f"not serialisable: {exc}", field="calibration") from None


class _Validator:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def fail(self, field_name: str, expected: str, got: Any) -> CalibrationError:
        shown = got if isinstance(got, int | float | str | bool | type(None)) else type(got).__name__
        if isinstance(shown, str) and len(shown) > 60:
            shown = shown[:57] + "..."
        return CalibrationError(path=self.path, field=field_name, expected=expected, got=shown)

    def mapping(self, value: Any, name: str, required: Sequence[str]) -> Mapping[Any, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(name, "a mapping", value)
        for key in required:
            if key not in value:
                raise self.fail(f"{name}.{key}" if name else key, "a value (missing key)", None)
        return value

    def integer(self, value: Any, name: str, lo: int = 0, hi: int = MAX_CONFIG_INT) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"an integer in [{lo}, {hi}]", value)
        if not lo <= value <= hi:
            raise self.fail(name, f"an integer in [{lo}, {hi}]", value)
        return int(value)

    def number(self, value: Any, name: str, lo: float = -math.inf, hi: float = math.inf, what: str = "") -> float:
        expected = what or "a finite number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, expected, value)
        x = float(value) if abs(value) < 1e308 else math.inf
        if not math.isfinite(x) or not lo <= x <= hi:
            raise self.fail(name, expected, value)
        return x

    def numbers(self, value: Any, name: str, n: int | None = None, min_len: int = 1, **kw: Any) -> list[float]:
        size = f"{n} numbers" if n is not None else f"a list of >= {min_len} numbers"
        if not isinstance(value, list):
            raise self.fail(name, size, value)
        if (n is not None and len(value) != n) or len(value) < min_len:
            raise self.fail(name, size, f"{len(value)} items")
        return [self.number(x, f"{name}[{i}]", **kw) for i, x in enumerate(value)]

    def range_(self, value: Any, name: str) -> list[float]:
        lo, hi = self.numbers(value, name, n=2, lo=0.0, what="a finite number >= 0")
        if hi < lo:
            raise self.fail(name, "[lo, hi] with lo <= hi", f"[{lo}, {hi}]")
        return [lo, hi]

    def optional_number(self, value: Any, name: str) -> float | None:
        return None if value is None else self.number(value, name, lo=0.0, what="a finite number >= 0 or null")

    def calibration(self, data: Any) -> Calibration:
        top = self.mapping(data, "", ["schema_version", "configs"])
        version = top["schema_version"]
        if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
            raise self.fail("schema_version", " or ".join(str(v) for v in SUPPORTED_VERSIONS), version)
        prov = top.get("provenance", {})
        if prov is None:
            prov = {}
        if not isinstance(prov, Mapping):
            raise self.fail("provenance", "a mapping", prov)
        provenance = {str(k): self.plain(v, f"provenance.{k}") for k, v in prov.items()}
        configs_raw = top["configs"]
        if not isinstance(configs_raw, list) or not configs_raw:
            raise self.fail("configs", "a non-empty list of config mappings", configs_raw)
        configs = [self.config(c, f"configs[{i}]") for i, c in enumerate(configs_raw)]
        for i, c in enumerate(configs):
            if c.batch is not None and version < 2:
                raise self.fail(f"configs[{i}].batch", "schema_version 2 for a batch section", version)
            for term in ("first_step_per_token_ms", "prefill_per_token_ms"):
                if c.serving_loop is not None and getattr(c.serving_loop, term) and version < 3:
                    raise self.fail(f"configs[{i}].serving_loop.{term}", "schema_version 3 for a per-prompt-token "
                                    "loop term", version)
        seen: set[tuple[int, int, int]] = set()
        for i, c in enumerate(configs):
            if c.key in seen:
                raise self.fail(f"configs[{i}]", "a unique (tier_idx, top_k, num_active_blocks)", str(c.key))
            seen.add(c.key)
        fact_raw = top.get("factorised", [])
        if fact_raw is None:
            fact_raw = []
        if not isinstance(fact_raw, list):
            raise self.fail("factorised", "a list of per-tier mappings", fact_raw)
        factorised = [self.factorised(f, f"factorised[{i}]") for i, f in enumerate(fact_raw)]
        tiers = [f.tier_idx for f in factorised]
        if len(set(tiers)) != len(tiers):
            raise self.fail("factorised", "one entry per tier_idx", str(tiers))
        preference = self.preference(top.get("preference"), seen, set(tiers))
        vision = None
        if top.get("vision") is not None:
            from trt_latency.estimator.vision import vision_from_dict

            vision = vision_from_dict(top["vision"], self.path)
        return Calibration(int(version), provenance, configs, factorised, preference, vision)

    def preference(self, raw: Any, measured: set[tuple[int, int, int]], factorised_tiers: set[int]) -> list[ConfigKey]:
        """The optional choose order: unique configs, each measured or in a tier with a factorised model."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.fail("preference", "a list of {tier_idx, top_k, num_active_blocks} mappings", raw)
        out: list[ConfigKey] = []
        for i, item in enumerate(raw):
            name = f"preference[{i}]"
            m = self.mapping(item, name, ConfigKey._fields)
            key = ConfigKey(*(self.integer(m[f], f"{name}.{f}") for f in ConfigKey._fields))
            if key in out:
                raise self.fail(name, "a config listed once", str(tuple(key)))
            if key not in measured and key.tier_idx not in factorised_tiers:
                raise self.fail(name, "a measured config or one in a tier with a factorised model", str(tuple(key)))
            out.append(key)
        return out

    def plain(self, value: Any, name: str, depth: int = 0) -> Any:
        if depth > 8:
            raise self.fail(name, "scalars, lists or mappings nested at most 8 deep", "deeper")
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(name, "a finite number", value)
            return value
        if isinstance(value, datetime.date):
            return value.isoformat()
        if isinstance(value, list):
            return [self.plain(v, f"{name}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {str(k): self.plain(v, f"{name}.{k}", depth + 1) for k, v in value.items()}
        raise self.fail(name, "a YAML scalar, list or mapping", value)

    def config(self, data: Any, name: str) -> ConfigCalibration:
        required = [
            "tier_idx", "top_k", "num_active_blocks", "decode_knots", "decode_values_ms", "prefill_coeffs",
            "residual_quantiles", "valid_past_len", "valid_prefill_len",
        ]  # fmt: skip
        m = self.mapping(data, name, required)
        tier = self.integer(m["tier_idx"], f"{name}.tier_idx")
        top_k = self.integer(m["top_k"], f"{name}.top_k")
        blocks = self.integer(m["num_active_blocks"], f"{name}.num_active_blocks")
        knots = self.numbers(m["decode_knots"], f"{name}.decode_knots", min_len=2, lo=0.0, hi=1e12,
                             what="a finite number in [0, 1e12]")  # fmt: skip
        for i in range(1, len(knots)):
            if not knots[i] > knots[i - 1]:
                raise self.fail(f"{name}.decode_knots[{i}]", f"strictly increasing (> {knots[i - 1]})", knots[i])
        values = self.numbers(m["decode_values_ms"], f"{name}.decode_values_ms", n=len(knots), lo=1e-12,
                              hi=1e12, what="a finite number > 0 (ms)")  # fmt: skip
        for i in range(1, len(values)):
            if values[i] < values[i - 1]:
                raise self.fail(f"{name}.decode_values_ms[{i}]", f"non-decreasing (>= {values[i - 1]})", values[i])
        coeffs = self.numbers(m["prefill_coeffs"], f"{name}.prefill_coeffs", n=3, lo=-1e12, hi=1e12)
        rq_raw = m["residual_quantiles"]
        if not isinstance(rq_raw, Mapping):
            raise self.fail(f"{name}.residual_quantiles", "a mapping quantile -> ratio", rq_raw)
        rq: dict[float, float] = {}
        for q, r in rq_raw.items():
            qf = self.number(q, f"{name}.residual_quantiles", lo=0.0, hi=1.0, what="quantile keys in [0, 1]")
            rq[qf] = self.number(r, f"{name}.residual_quantiles[{q}]", lo=1e-6, hi=1e6, what="a ratio in (0, 1e6]")
        conformal = m.get("conformal")
        if conformal is not None:
            conformal = self.conformal(conformal, f"{name}.conformal")
        fit_error_raw = m.get("fit_error", {})
        if fit_error_raw is None:
            fit_error_raw = {}
        if not isinstance(fit_error_raw, Mapping):
            raise self.fail(f"{name}.fit_error", "a mapping", fit_error_raw)
        fit_error = {str(k): self.plain(v, f"{name}.fit_error.{k}") for k, v in fit_error_raw.items()}
        kv = m.get("kv_bytes_per_token")
        if kv is not None:
            kv = self.integer(kv, f"{name}.kv_bytes_per_token", lo=0, hi=1 << 50)
        loop = m.get("serving_loop")
        if loop is not None:
            loop = self.serving_loop(loop, f"{name}.serving_loop")
        batch = m.get("batch")
        if batch is not None:
            batch = self.batch(batch, f"{name}.batch")
        return ConfigCalibration(
            tier_idx=tier,
            top_k=top_k,
            num_active_blocks=blocks,
            decode_knots=knots,
            decode_values_ms=values,
            prefill_coeffs=coeffs,
            residual_quantiles=dict(sorted(rq.items())),
            valid_past_len=self.range_(m["valid_past_len"], f"{name}.valid_past_len"),
            valid_prefill_len=self.range_(m["valid_prefill_len"], f"{name}.valid_prefill_len"),
            fit_error=fit_error,
            conformal=conformal,
            kv_bytes_per_token=kv,
            serving_loop=loop,
            batch=batch,
        )

    def batch(self, data: Any, name: str) -> dict[str, Any]:
        """A batch section: measured sizes ascending from 1, one monotone curve per size (BATCH_CONTRACT.md)."""
        m = self.mapping(data, name, ["kv_read", "sizes", "curves"])
        if m["kv_read"] not in BATCH_KV_READS:
            raise self.fail(f"{name}.kv_read", " or ".join(BATCH_KV_READS), m["kv_read"])
        prefill = m.get("prefill_with_batch", "separate")
        if prefill not in BATCH_PREFILL_MODES:
            raise self.fail(f"{name}.prefill_with_batch", " or ".join(BATCH_PREFILL_MODES), prefill)
        raw_sizes = m["sizes"]
        if not isinstance(raw_sizes, list) or not raw_sizes:
            raise self.fail(f"{name}.sizes", "a non-empty list of batch sizes", raw_sizes)
        sizes = [self.integer(v, f"{name}.sizes[{i}]", lo=1, hi=1 << 20) for i, v in enumerate(raw_sizes)]
        if sizes[0] != 1:
            raise self.fail(f"{name}.sizes[0]", "1 (the single-request curve comes first)", sizes[0])
        for i in range(1, len(sizes)):
            if sizes[i] <= sizes[i - 1]:
                raise self.fail(f"{name}.sizes[{i}]", f"strictly increasing (> {sizes[i - 1]})", sizes[i])
        curves = m["curves"]
        if not isinstance(curves, list) or len(curves) != len(sizes):
            raise self.fail(f"{name}.curves", f"a list of {len(sizes)} curves (one per size)", curves)
        for i, c in enumerate(curves):
            where = f"{name}.curves[{i}]"
            cm = self.mapping(c, where, ["batch", "knots_x", "values_ms"])
            if self.integer(cm["batch"], f"{where}.batch", lo=1, hi=1 << 20) != sizes[i]:
                raise self.fail(f"{where}.batch", f"{sizes[i]} (sizes[{i}])", cm["batch"])
            knots = self.numbers(cm["knots_x"], f"{where}.knots_x", lo=0.0, hi=1e15, what="a finite number in [0, 1e15]")
            for k in range(1, len(knots)):
                if not knots[k] > knots[k - 1]:
                    raise self.fail(f"{where}.knots_x[{k}]", f"strictly increasing (> {knots[k - 1]})", knots[k])
            values = self.numbers(cm["values_ms"], f"{where}.values_ms", n=len(knots), lo=1e-12, hi=1e12,
                                  what="a finite number > 0 (ms)")
            for k in range(1, len(values)):
                if values[k] < values[k - 1]:
                    raise self.fail(f"{where}.values_ms[{k}]", f"non-decreasing (>= {values[k - 1]})", values[k])
        fit_error = m.get("fit_error") or {}
        if not isinstance(fit_error, Mapping):
            raise self.fail(f"{name}.fit_error", "a mapping", fit_error)
        section = dict(m)
        section["fit_error"] = {str(k): self.plain(v, f"{name}.fit_error.{k}") for k, v in fit_error.items()}
        if m.get("valid_x") is not None:
            section["valid_x"] = self.range_(m["valid_x"], f"{name}.valid_x")
        if m.get("conformal") is not None:
            cm = self.mapping(m["conformal"], f"{name}.conformal", ["alphas", "factors"])
            alphas = self.numbers(cm["alphas"], f"{name}.conformal.alphas", lo=1e-9, hi=1.0 - 1e-9,
                                  what="a number in (0, 1)")
            factors = self.numbers(cm["factors"], f"{name}.conformal.factors", n=len(alphas), lo=1e-6, hi=1e6,
                                   what="a factor in (0, 1e6]")
            section["conformal"] = {"alphas": alphas, "factors": factors}
        return _batch_dict(section)

    def serving_loop(self, data: Any, name: str) -> ServingLoop:
        m = self.mapping(data, name, ["decode_step_ms", "first_step_ms", "prefill_ms"])
        ms = "a finite number of ms in [0, 1e9]"
        source = m.get("source", "replay")
        if source not in SERVING_LOOP_SOURCES and not (isinstance(source, str) and BORROWED_SOURCE.fullmatch(source)):
            raise self.fail(f"{name}.source", " or ".join(SERVING_LOOP_SOURCES) + " or borrowed:t<i>.k<k>.b<b>",
                            source)
        return ServingLoop(
            decode_step_ms=self.number(m["decode_step_ms"], f"{name}.decode_step_ms", lo=0.0, hi=1e9, what=ms),
            first_step_ms=self.number(m["first_step_ms"], f"{name}.first_step_ms", lo=0.0, hi=1e9, what=ms),
            prefill_ms=self.number(m["prefill_ms"], f"{name}.prefill_ms", lo=0.0, hi=1e9, what=ms),
            n_requests=self.integer(m.get("n_requests", 0), f"{name}.n_requests", lo=0, hi=1 << 40),
            source=str(source),
            first_step_per_token_ms=self.number(m.get("first_step_per_token_ms", 0.0),
                                                f"{name}.first_step_per_token_ms", lo=0.0, hi=1e6,
                                                what="a finite number of ms per prompt token in [0, 1e6]"),
            clamped=self.clamped(m.get("clamped", []), f"{name}.clamped"),
            prefill_per_token_ms=self.number(m.get("prefill_per_token_ms", 0.0), f"{name}.prefill_per_token_ms",
                                             lo=0.0, hi=1e6, what="a finite number of ms per prompt token in [0, 1e6]"),
        )

    def clamped(self, data: Any, name: str) -> tuple[str, ...]:
        if not isinstance(data, list) or any(v not in LOOP_TERMS for v in data) or len(set(data)) != len(data):
            raise self.fail(name, "a list of distinct term names from " + ", ".join(LOOP_TERMS), data)
        return tuple(str(v) for v in data)

    def conformal(self, data: Any, name: str) -> dict[str, Any]:
        m = self.mapping(data, name, ["alphas", "factors", "n"])
        alphas = self.numbers(m["alphas"], f"{name}.alphas", lo=1e-9, hi=1.0 - 1e-9, what="a number in (0, 1)")
        factors = self.numbers(m["factors"], f"{name}.factors", n=len(alphas), lo=1e-6, hi=1e6,
                               what="a factor in (0, 1e6]")  # fmt: skip
        for i in range(1, len(alphas)):
            if not alphas[i] > alphas[i - 1]:
                raise self.fail(f"{name}.alphas[{i}]", f"strictly increasing (> {alphas[i - 1]})", alphas[i])
            if factors[i] > factors[i - 1]:
                raise self.fail(f"{name}.factors[{i}]", f"non-increasing as alpha grows (<= {factors[i - 1]})", factors[i])
        n = self.integer(m["n"], f"{name}.n", lo=1, hi=1 << 40)
        return {"alphas": alphas, "factors": factors, "n": n}

    def factorised(self, data: Any, name: str) -> FactorisedModel:
        m = self.mapping(data, name, ["tier_idx", "t0", "u", "w", "v", "valid_past_len", "n_configs"])
        return FactorisedModel(
            tier_idx=self.integer(m["tier_idx"], f"{name}.tier_idx"),
            t0=self.number(m["t0"], f"{name}.t0", lo=-1e12, hi=1e12),
            u=self.number(m["u"], f"{name}.u", lo=-1e12, hi=1e12),
            w=self.number(m["w"], f"{name}.w", lo=-1e12, hi=1e12),
            v=self.number(m["v"], f"{name}.v", lo=-1e12, hi=1e12),
            valid_past_len=self.range_(m["valid_past_len"], f"{name}.valid_past_len"),
            n_configs=self.integer(m["n_configs"], f"{name}.n_configs", lo=1, hi=1 << 30),
            heldout_median_rel=self.optional_number(m.get("heldout_median_rel"), f"{name}.heldout_median_rel"),
            heldout_max_rel=self.optional_number(m.get("heldout_max_rel"), f"{name}.heldout_max_rel"),
        )
