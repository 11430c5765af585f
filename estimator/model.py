"""Estimator: a Calibration turned into flat float64 tables and evaluated by the kernels.

    est = Estimator.load("calibration.yaml")
    est.admit(120.0, vision_tokens=576, text_tokens=40, max_new_tokens=64, alpha=0.01)

`admit` is the kernel's own method (bound at construction), so a call from Python goes straight
into compiled code: argument checks, O(1) config lookup, closed-form sums and the inverse all in C.
It never raises for bad request fields: Decision(False, 0, nan, reason) says which field.
`predict`, `decode_step_ms` and `max_new_tokens` are for tools and raise InputError instead.

Semantics: P = vision_tokens + text_tokens and, with the config's serving-loop terms (o, c, o_p; zeros
when the calibration has none),

    total(n) = prefill(P) + o_p(P) + [n >= 2] * c(P) + sum_{j=0}^{n-2} (T(P + j) + o),
    c(P) = c0 + c1 * P,   o_p(P) = o_p + o_p1 * P

where T is the engine-only step fitted from the sweep and c(P) the first decode step's extra cost after
a prefill of P tokens (c1 = 0 unless the replay supports a slope; o_p1 likewise). The serving step T + o is
folded into the kernel tables at load time (o shifts every knot value, o_p1 the prefill's linear
coefficient), c0, c1 and o_p are table columns; a second set of
tables without the loop terms answers `serving=False` (engine only, for reports and the sweep).
Decision.predicted_ms is total(max_new_tokens requested, or 1 when None) times the alpha factor;
admit is True iff that fits the budget; Decision.max_new_tokens = min(requested, largest n that fits).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from trt_latency.errors import InputError
from trt_latency.estimator import kernels
from trt_latency.estimator.calibration import Calibration, ConfigCalibration, ServingLoop, load_calibration
from trt_latency.ext import layout
from trt_latency.schema import ConfigKey

Decision = kernels.Decision
_BOX_LIMIT = 4096  # most unmeasured configs per tier materialised from the factorised model


class Prediction(NamedTuple):
    prefill_ms: float
    decode_ms: float
    total_ms: float
    flags: str = ""  # e.g. "extrapolated; factorised" ("" = measured config inside the measured range)


# ------------------------------------------------------------------------------ tables


def decode_pieces(knots: list[float], values: list[float]) -> np.ndarray:
    """[start, T(start), slope, cum] per piece over integer L (see _reference's docstring)."""
    x = [float(v) for v in knots]
    y = [float(v) for v in values]
    raw: list[tuple[float, float, float]] = [(0.0, y[0], 0.0)]
    for k in range(len(x) - 1):
        s = (y[k + 1] - y[k]) / (x[k + 1] - x[k])
        b = float(math.ceil(x[k]))
        raw.append((b, y[k] + s * (b - x[k]), s))
    s_last = (y[-1] - y[-2]) / (x[-1] - x[-2])
    b = float(math.ceil(x[-1]))
    raw.append((b, y[-1] + s_last * (b - x[-1]), s_last))
    pieces: list[tuple[float, float, float]] = []
    for piece in raw:  # a later piece with the same start replaces the earlier (zero-length) one
        if pieces and pieces[-1][0] == piece[0]:
            pieces[-1] = piece
        else:
            pieces.append(piece)
    out = np.empty((len(pieces), 4))
    cum = 0.0
    for i, (start, v, s) in enumerate(pieces):
        out[i] = (start, v, s, cum)
        if i + 1 < len(pieces):
            cnt = pieces[i + 1][0] - start
            cum = cum + cnt * v + s * (cnt * (cnt - 1.0) * 0.5)
    return out


def _factorised_rows(cal: Calibration) -> list[tuple[ConfigCalibration, bool]]:
    """Measured configs, then the unmeasured (top_k, blocks) inside each tier's measured box."""
    rows: list[tuple[ConfigCalibration, bool]] = [(c, False) for c in cal.configs]
    for f in cal.factorised:
        measured = [c for c in cal.configs if c.tier_idx == f.tier_idx]
        if not measured or f.heldout_median_rel is None:
            continue  # a model never checked on a held-out config is not used to answer for one
        ks = range(min(c.top_k for c in measured), max(c.top_k for c in measured) + 1)
        bs = range(1, max(c.num_active_blocks for c in measured) + 1)
        if len(ks) * len(bs) > _BOX_LIMIT:
            continue
        have = {c.key for c in measured}
        lo, hi = f.valid_past_len
        if hi <= lo:
            hi = lo + 1.0
        for k in ks:
            for b in bs:
                if (f.tier_idx, k, b) in have:
                    continue
                y_lo, y_hi = f.step_ms(lo, k, b), f.step_ms(hi, k, b)
                if not (y_lo > 0.0 and math.isfinite(y_lo) and math.isfinite(y_hi)):
                    continue  # the linear model is not usable here: leave the config unknown
                near = min(measured, key=lambda c: (abs(c.num_active_blocks - b), abs(c.top_k - k), -c.num_active_blocks))
                scale = b / near.num_active_blocks if near.num_active_blocks > 0 else 1.0
                rows.append(
                    (
                        ConfigCalibration(
                            tier_idx=f.tier_idx,
                            top_k=k,
                            num_active_blocks=b,
                            decode_knots=[lo, hi],
                            decode_values_ms=[y_lo, max(y_hi, y_lo)],
                            prefill_coeffs=[v * scale for v in near.prefill_coeffs],
                            residual_quantiles=dict(near.residual_quantiles),
                            valid_past_len=[lo, hi],
                            valid_prefill_len=list(near.valid_prefill_len),
                            serving_loop=near.serving_loop,  # the loop around the engine is the same
                        ),
                        True,
                    )
                )
    return rows


def vision_columns(vision: Any) -> list[float]:
    """VIS_A .. VIS_MODE of the tables from a calibration's vision section (the one- and two-images-per-call
    fits over patches rewritten over vision tokens per image u = patches * tokens_per_patch; the native
    grid's measured ms at its token count; how a request's images are sent); zeros without one."""
    if vision is None:
        return [0.0] * 14
    a, b, c = vision.fits[1]
    k = 1.0 / vision.tokens_per_patch  # patches per vision token
    lo, hi = (x * vision.tokens_per_patch for x in vision.patch_range)
    ea, eb = vision.embedding if vision.embedding is not None else (0.0, 0.0)
    nat_ms = vision.native_ms.get(1)
    nat_v = vision.native_patches * vision.tokens_per_patch if nat_ms is not None and vision.native_patches > 0 else 0.0
    a2, b2, c2 = vision.fits.get(2, [0.0, 0.0, 0.0])
    nat2 = vision.native_ms.get(2, 0.0) if nat_v > 0 else 0.0
    mode = 0.0 if vision.images_per_call == "separate" else (1.0 if 2 in vision.fits else 2.0)
    return [a, b * k, c * k * k, lo, hi, ea, eb, nat_v, nat_ms if nat_v > 0 else 0.0, a2, b2 * k, c2 * k * k, nat2, mode]


def build_tables(cal: Calibration, serving: bool = True) -> tuple[dict[str, np.ndarray], list[ConfigKey], list[bool]]:
    """Flat tables for the kernels, the key of each row and whether it is factorised.

    serving=True folds each config's serving-loop terms in: o into every piece value (T + o per
    step), o_p1 into the prefill's linear coefficient, c0, c1 and o_p into the LOOP_FIRST / LOOP_FIRST_P /
    LOOP_PRE columns. serving=False: engine-only tables.
    """
    rows = _factorised_rows(cal)
    cfg = np.zeros((len(rows), layout.NCOL))
    vis = vision_columns(cal.vision)
    pieces: list[np.ndarray] = []
    conf: list[tuple[float, float]] = []
    rq: list[tuple[float, float]] = []
    n_pieces = 0
    keys: list[ConfigKey] = []
    flags: list[bool] = []
    for i, (c, fact) in enumerate(rows):
        loop = c.serving_loop if serving and c.serving_loop is not None else ServingLoop()
        o = loop.decode_step_ms
        p = decode_pieces(c.decode_knots, [v + o for v in c.decode_values_ms] if o else c.decode_values_ms)
        pieces.append(p)
        row = cfg[i]
        row[layout.LOOP_FIRST], row[layout.LOOP_PRE] = loop.first_step_ms, loop.prefill_ms
        row[layout.LOOP_FIRST_P] = loop.first_step_per_token_ms
        row[layout.PRE_A], row[layout.PRE_B], row[layout.PRE_C] = c.prefill_coeffs
        row[layout.PRE_B] += loop.prefill_per_token_ms  # o_p's slope, folded in as o is (the kernels unchanged)
        row[layout.PAST_LO], row[layout.PAST_HI] = c.valid_past_len
        row[layout.PRE_LO], row[layout.PRE_HI] = c.valid_prefill_len
        row[layout.FACTORISED] = 1.0 if fact else 0.0
        row[layout.VIS_A:layout.VIS_MODE + 1] = vis  # the one encoder of the deployment, every config
        row[layout.PIECE_OFF], row[layout.PIECE_CNT] = n_pieces, p.shape[0]
        n_pieces += p.shape[0]
        row[layout.CONF_OFF] = len(conf)
        if c.conformal is not None:
            conf.extend(zip(c.conformal["alphas"], c.conformal["factors"], strict=True))
        row[layout.CONF_CNT] = len(conf) - row[layout.CONF_OFF]
        row[layout.RQ_OFF] = len(rq)
        rq.extend(sorted(c.residual_quantiles.items()))
        row[layout.RQ_CNT] = len(rq) - row[layout.RQ_OFF]
        keys.append(ConfigKey(c.tier_idx, c.top_k, c.num_active_blocks))
        flags.append(fact)

    def dense(values: list[int]) -> tuple[np.ndarray, dict[int, int]]:
        uniq = sorted(set(values))
        table = np.full(max(uniq) + 1, -1, dtype=np.int64)
        index = {v: j for j, v in enumerate(uniq)}
        for v, j in index.items():
            table[v] = j
        return table, index

    tier_map, tier_ix = dense([k.tier_idx for k in keys])
    topk_map, topk_ix = dense([k.top_k for k in keys])
    blocks_map, blocks_ix = dense([k.num_active_blocks for k in keys])
    lut = np.full((len(tier_ix), len(topk_ix), len(blocks_ix) + 1), -1, dtype=np.int64)
    for i, k in enumerate(keys):
        lut[tier_ix[k.tier_idx], topk_ix[k.top_k], blocks_ix[k.num_active_blocks]] = i
    # num_active_blocks=None: the tier's largest measured blocks (for this top_k, measured or factorised).
    for tier in tier_ix:
        largest = max(c.num_active_blocks for c in cal.configs if c.tier_idx == tier)
        for ki in topk_ix.values():
            lut[tier_ix[tier], ki, -1] = lut[tier_ix[tier], ki, blocks_ix[largest]]
    tables = {
        "cfg": np.ascontiguousarray(cfg),
        "pieces": np.ascontiguousarray(np.concatenate(pieces) if pieces else np.zeros((0, 4))),
        "conf": np.ascontiguousarray(np.array(conf, dtype=np.float64).reshape(-1, 2)),
        "rq": np.ascontiguousarray(np.array(rq, dtype=np.float64).reshape(-1, 2)),
        "tier_map": tier_map,
        "topk_map": topk_map,
        "blocks_map": blocks_map,
        "lut": np.ascontiguousarray(lut),
    }
    return tables, keys, flags


# ------------------------------------------------------------------------------ Estimator


def _int_arg(value: Any, name: str, lo: int, allow_none: bool = False) -> int:
    if value is None and allow_none:
        return -1
    x = layout.as_int(value)
    if x is None or not lo <= x <= layout.TOKEN_MAX:
        raise InputError(field=name, expected=f"an integer in [{lo}, {layout.TOKEN_MAX}]", got=value)
    return x


def _unit_arg(value: Any, name: str) -> float:
    x = layout.as_real(value)
    if x is None or not 0.0 < x < 1.0:
        raise InputError(field=name, expected="a number in (0, 1)", got=value)
    return x


class Estimator:
    """Position-dependent latency model of one engine; thread-safe for reads (tables are immutable)."""

    def __init__(self, calibration: Calibration, path: str | os.PathLike[str] | None = None,
                 implementation: Any = None) -> None:  # fmt: skip
        self.calibration = calibration
        self.path = None if path is None else os.fspath(path)
        impl = kernels.impl if implementation is None else implementation
        self.tables, keys, factorised = build_tables(calibration, serving=True)
        self._kernel = impl.Kernel(self.tables)
        # Engine-only tables (no serving-loop terms): exact engine values for reports and the sweep.
        self.has_serving_loop = any(c.serving_loop is not None for c in calibration.configs)
        self._engine_kernel = impl.Kernel(build_tables(calibration, serving=False)[0]) if self.has_serving_loop \
            else self._kernel
        self._loops = [c.serving_loop or ServingLoop() for c, _ in _factorised_rows(calibration)]  # per table row
        self.implementation: str = impl.IMPLEMENTATION
        self._keys = keys
        self._factorised = factorised
        # The hot path: the kernel's compiled method itself, no Python frame in between.
        self.admit = self._kernel.admit  # type: ignore[method-assign]
        # choose's default order: the calibration's preference, else the measured configs most expensive
        # first (predicted total of a 256-token prompt and 64 new tokens, the serving model). The kernel
        # holds it, so choose too is the kernel's own method (one compiled call, no Python frame).
        self.preference: tuple[ConfigKey, ...] = tuple(calibration.preference) or tuple(sorted(
            self.configs(), key=lambda k: -self._kernel.total(self._keys.index(k), 256.0, 64.0, 1.0)))
        self._kernel.preference = self.preference
        self.choose = self._kernel.choose  # type: ignore[method-assign]
        # A VLM calibration (a `vision` section): requests with vision tokens also pay the encoder and the
        # embedding step (estimator/vision.py). It is part of the tables (VIS_* / EMB_* columns): admit, choose
        # and the batch entry points take `images` (default 1 per request).
        self.vision = calibration.vision

    @classmethod
    def load(cls, path: str | os.PathLike[str], implementation: Any = None) -> Estimator:
        return cls(load_calibration(path), path=path, implementation=implementation)

    # -------------------------------------------------------------- introspection
    def configs(self) -> list[ConfigKey]:
        """Measured configs."""
        return [k for k, f in zip(self._keys, self._factorised, strict=True) if not f]

    def estimated_configs(self) -> list[ConfigKey]:
        """Configs answered by the factorised model (not measured)."""
        return [k for k, f in zip(self._keys, self._factorised, strict=True) if f]

    def _row(self, tier_idx: Any, top_k: Any, num_active_blocks: Any) -> int:
        tier = _int_arg(tier_idx, "tier_idx", 0)
        k = _int_arg(top_k, "top_k", 0)
        blocks = _int_arg(num_active_blocks, "num_active_blocks", 0, allow_none=True)
        row = int(self._kernel.lookup(tier, k, blocks))
        if row < 0:
            raise InputError(
                "unknown config", field="tier_idx/top_k/num_active_blocks",
                expected="one of " + ", ".join(str(tuple(c)) for c in self.configs()),
                got=(tier_idx, top_k, num_active_blocks),
            )  # fmt: skip
        return row

    def _prompt(self, vision_tokens: Any, text_tokens: Any) -> int:
        prompt = _int_arg(vision_tokens, "vision_tokens", 0) + _int_arg(text_tokens, "text_tokens", 0)
        if prompt == 0:
            raise InputError(field="vision_tokens + text_tokens", expected=">= 1 prompt token", got=0)
        return prompt

    def _flags(self, row: int, prompt: int, n: int, clipped: bool = False) -> str:
        parts = []
        if self._factorised[row]:
            parts.append("factorised")
        if self._kernel.extrapolated(row, float(prompt), float(n)):
            parts.append("extrapolated")
        if clipped:
            parts.append("quantile beyond calibrated")
        return "; ".join(parts)

    def config_key(self, tier_idx: Any = 0, top_k: Any = 1, num_active_blocks: Any = None) -> ConfigKey:
        """The config that answers for these fields (None blocks = the tier's largest measured)."""
        return self._keys[self._row(tier_idx, top_k, num_active_blocks)]

    def serving_loop(self, tier_idx: Any = 0, top_k: Any = 1, num_active_blocks: Any = None) -> ServingLoop:
        """The config's serving-loop terms (o, c, o_p); zeros with source "none" when not calibrated."""
        return self._loops[self._row(tier_idx, top_k, num_active_blocks)]

    # -------------------------------------------------------------- evaluation
    def decode_step_ms(self, past_len: Any, tier_idx: Any = 0, top_k: Any = 1, num_active_blocks: Any = None,
                       serving: bool = True) -> float:  # fmt: skip
        """One decode step at KV length past_len, in ms.

        serving=True (default): the step as the serving loop pays it, T_engine(L) + o (the per-step
        loop overhead; the one-off first-step transient c is not a per-step cost and is left out).
        serving=False: the engine-only step T_engine(L), what the sweep's `time_step` measures.
        """
        row = self._row(tier_idx, top_k, num_active_blocks)
        kernel = self._kernel if serving else self._engine_kernel
        return float(kernel.step(row, float(_int_arg(past_len, "past_len", 0))))

    def predict(self, vision_tokens: Any, text_tokens: Any, output_tokens: Any, tier_idx: Any = 0, top_k: Any = 1,
                num_active_blocks: Any = None, quantile: Any = None, serving: bool = True,
                images: Any = None) -> Prediction:  # fmt: skip
        """Prefill + closed-form decode sum for `output_tokens` generated tokens (>= 1).

        serving=True (default): with the serving-loop terms (prefill_ms includes o_p, decode_ms
        includes c and o per step); serving=False: the engine alone, as the sweep timed it.
        """
        prompt = self._prompt(vision_tokens, text_tokens)
        n = _int_arg(output_tokens, "output_tokens", 1)
        row = self._row(tier_idx, top_k, num_active_blocks)
        kernel = self._kernel if serving else self._engine_kernel
        factor, src = (1.0, layout.F_NONE) if quantile is None else kernel.quantile_factor(row, _unit_arg(quantile, "quantile"))
        pre, dec, tot = kernel.predict(row, float(prompt), float(n), factor)
        flags = self._flags(row, prompt, n, src == layout.F_CLIPPED)
        extra, vis_ext = self._vision_extra(vision_tokens, prompt, images)
        if extra:  # the encoder and the embedding step run before the decoder's prefill
            pre, tot = pre + extra * factor, tot + extra * factor
        if vis_ext and "extrapolated" not in flags:  # outside the swept patches whatever the term costs (as compiled)
            flags = "; ".join(x for x in (flags, "extrapolated (vision patches)") if x)
        return Prediction(pre, dec, tot, flags)

    def max_new_tokens(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, tier_idx: Any = 0, top_k: Any = 1,
                       num_active_blocks: Any = None, alpha: Any = None, images: Any = None) -> int:  # fmt: skip
        """Largest n with predict(n) <= budget_ms (times the alpha factor); 0 if not even one token."""
        budget = layout.as_real(budget_ms)
        if budget is None or not 0.0 <= budget < math.inf:
            raise InputError(field="budget_ms", expected="a finite number >= 0", got=budget_ms)
        prompt = self._prompt(vision_tokens, text_tokens)
        row = self._row(tier_idx, top_k, num_active_blocks)
        factor = 1.0 if alpha is None else self._kernel.alpha_factor(row, _unit_arg(alpha, "alpha"))[0]
        extra, _ = self._vision_extra(vision_tokens, prompt, images)
        if extra:  # the vision part is paid before any token: what is left of the budget goes to the decoder
            budget = budget - extra * factor
            if budget < 0.0:
                return 0
        return int(self._kernel.nfit(row, float(prompt), budget, factor))

    # -------------------------------------------------------------- vision (VLM chains)
    def vision_ms(self, vision_tokens: Any, images: Any = 1, together: bool | None = None) -> float:
        """Encoder ms for `vision_tokens` LLM tokens over `images` images (one call or one per image as the
        calibration's images_per_call says, unless `together` is given); 0.0 without a vision section."""
        v = _int_arg(vision_tokens, "vision_tokens", 0)
        if self.vision is None:
            return 0.0
        return float(self.vision.vision_ms(v, _int_arg(images, "images", 1), together)[0])

    def _vision_extra(self, vision_tokens: Any, prompt: int, images: Any) -> tuple[float, bool]:
        """(encoder + embedding ms, outside the swept patch range?) of a request; (0, False) without vision."""
        if self.vision is None:
            return 0.0, False
        v = layout.as_int(vision_tokens) or 0
        if v <= 0:
            return 0.0, False
        ms, ext = self.vision.vision_ms(v, 1 if images is None else _int_arg(images, "images", 1))
        return ms + self.vision.embedding_ms(prompt), ext

    def admit_images(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any = None,
                     tier_idx: Any = 0, top_k: Any = 1, num_active_blocks: Any = None, alpha: Any = None,
                     images: Any = None) -> Any:  # fmt: skip
        """admit for a request whose vision tokens come as `images` images: the compiled admit itself
        (the tables hold both the one- and the two-images-per-call fit; see ext/layout.py VIS_MODE)."""
        return self._kernel.admit(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                  num_active_blocks, alpha, images)

    def admit(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any = None,  # type: ignore[no-redef]
              tier_idx: Any = 0, top_k: Any = 1, num_active_blocks: Any = None, alpha: Any = None,
              images: Any = None) -> Any:  # fmt: skip
        """Replaced per instance by the kernel's method (see __init__); documented here. ``images``: how many
        images a VLM request's vision tokens come as (None = 1; a bad value is a refusing Decision)."""
        return self._kernel.admit(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                  num_active_blocks, alpha, images)  # fmt: skip

    def choose(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any = None,  # type: ignore[no-redef]
               candidates: Any = None, alpha: Any = None, images: Any = None) -> Any:
        """The first config, in preference order, whose admit decision fits the budget: its Decision,
        with ``.config`` = that (tier_idx, top_k, num_active_blocks). When none fits, the first
        candidate's Decision (admit False, ``.config`` = that candidate); no candidates: a Decision
        with code CODE_NO_CANDIDATE and ``.config`` None. Order: ``candidates`` (an iterable of
        (tier_idx, top_k, num_active_blocks), blocks None = the tier's largest), else ``preference``
        (the calibration's, else most expensive first). One compiled call for all candidates; never
        raises (bad fields and unknown configs are decisions that do not admit, as in admit). ``images``
        as in admit: every candidate is judged with the request's images.
        Replaced per instance by the kernel's method (see __init__); documented here."""
        return self._kernel.choose(budget_ms, vision_tokens, text_tokens, max_new_tokens, candidates, alpha, images)

    # -------------------------------------------------------------- batch
    def admit_batch(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any = -1,
                    tier_idx: Any = 0, top_k: Any = 1, num_active_blocks: Any = -1,
                    alpha: float | None = None,
                    images: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Vectorised admit over arrays (scalars broadcast). -1 = None for max_new_tokens and
        num_active_blocks; ``images`` (None = one image per request) as in admit. Returns (admit bool,
        max_new_tokens int64, predicted_ms, reason code); `reason_text(code)` gives the words."""
        budget = np.asarray(budget_ms, dtype=np.float64)
        fields = (vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k, num_active_blocks)
        arrays = np.broadcast_arrays(budget, *(np.asarray(a) for a in fields + (() if images is None else (images,))))
        b = np.ascontiguousarray(arrays[0], dtype=np.float64).ravel()
        ints = [np.ascontiguousarray(a, dtype=np.int64).ravel() for a in arrays[1:]]
        a = -1.0 if alpha is None else float(alpha)
        if alpha is not None and not 0.0 < a < 1.0:
            a = math.nan  # every row gets the bad-alpha decision
        return self._kernel.admit_batch(b, *ints[:6], a, ints[6] if images is not None else None)  # type: ignore[no-any-return]

    def predict_batch(self, vision_tokens: Any, text_tokens: Any, output_tokens: Any, tier_idx: Any = 0,
                      top_k: Any = 1, num_active_blocks: Any = -1, quantile: float | None = None,
                      images: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """(prefill_ms, decode_ms, total_ms, flags) arrays; flags bit 0 extrapolated, 1 factorised,
        2 quantile beyond calibrated, 3 invalid row (NaN results; an images count below 1 is one).
        ``images``: how many images each request's vision tokens come as (None = one)."""
        fields = (vision_tokens, text_tokens, output_tokens, tier_idx, top_k, num_active_blocks)
        arrays = np.broadcast_arrays(*(np.asarray(a) for a in fields + (() if images is None else (images,))))
        ints = [np.ascontiguousarray(a, dtype=np.int64).ravel() for a in arrays]
        q = -1.0 if quantile is None else _unit_arg(quantile, "quantile")
        return self._kernel.predict_batch(*ints[:6], q, ints[6] if images is not None else None)  # type: ignore[no-any-return]

    @staticmethod
    def reason_text(code: int) -> str:
        return layout.reason_text(code)

    def __repr__(self) -> str:
        return (f"Estimator({self.path or 'in-memory'}, {len(self.configs())} measured configs, "
                f"{len(self.estimated_configs())} factorised, kernels={self.implementation})")  # fmt: skip
