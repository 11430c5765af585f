"""The contract both kernel implementations share: table layout, decision codes, reasons, field limits.

Imported by the pure-Python reference (estimator/_reference.py), by the table builder
(estimator/model.py) and by the serving layer; compiled into the Cython kernels through
ext/_layout.pxi, which setup.py writes from this file (``pxd_enums``), so every constant is
written down here and nowhere else (msgpack's ext.py habit: one neutral module, both sides import).
Pure stdlib: setup.py runs this file before anything is built.

Tables (built by estimator.model.build_tables):

- ``cfg``     float64 [n_cfg, NCOL]: prefill a, b, c; valid past_len lo, hi; valid prefill lo, hi;
  factorised flag; offsets/counts into ``pieces``, ``conf`` and ``rq``; serving-loop first-step
  transient c(P) = LOOP_FIRST + LOOP_FIRST_P * P and prefill overhead o_p (LOOP_PRE), all >= 0 (0 = none); the vision
  encoder and embedding step of a VLM chain (VIS_A .. VIS_MODE, zeros = none).
- ``pieces``  float64 [n, PCOL]: per piece of T(L) over integer L: start B (integer valued), T(B) = v,
  slope beta, cum = sum_{L=0}^{B-1} T(L). Piece 0 starts at 0 (constant T = first knot value below the
  first knot); the last piece continues the last segment's slope (extrapolation above the last knot).
- ``conf``    float64 [n, 2]: (alpha, factor), alphas ascending.  ``rq`` float64 [n, 2]: (q, ratio), q ascending.
- ``tier_map``, ``topk_map``, ``blocks_map`` int64: value -> dense index or -1; ``lut`` int64
  [n_tier, n_topk, n_blocks + 1] -> config row or -1 (the last slot is num_active_blocks=None).
"""

from __future__ import annotations

import operator
from typing import Any

# cfg columns
PRE_A, PRE_B, PRE_C, PAST_LO, PAST_HI, PRE_LO, PRE_HI, FACTORISED = 0, 1, 2, 3, 4, 5, 6, 7
PIECE_OFF, PIECE_CNT, CONF_OFF, CONF_CNT, RQ_OFF, RQ_CNT = 8, 9, 10, 11, 12, 13
LOOP_FIRST = 14  # serving loop: one-off post-prefill transient c (ms), when n >= 2
LOOP_PRE = 15  # serving loop: prefill-side overhead o_p (ms)
# VLM chain (the calibration's vision section, one image per request; zeros = no vision model): the
# encoder's ms over a request's vision tokens v, A + B v + C v^2 (clipped at 0), the range of v it was
# swept over (VIS_HI 0 = no range: never extrapolated), the embedding step's ms EMB_A + EMB_B * P.
# Both are added to the prefill of requests with v > 0. At v = VIS_NAT_V (> 0; the encoder's native grid,
# where a ViT skips its position-embedding interpolation) the encoder's ms is the measured VIS_NAT_MS.
VIS_A, VIS_B, VIS_C, VIS_LO, VIS_HI, EMB_A, EMB_B, VIS_NAT_V, VIS_NAT_MS = 16, 17, 18, 19, 20, 21, 22, 23, 24
# Requests with k > 1 images (admit's `images`; u = v / k tokens per image, f1 the one-image term above):
# VIS_MODE 0 = one call per image, k * f1(u); 1 = one call for all, f2(u) + (k - 2) (f2(u) - f1(u)) with
# f2 the 2-images-per-call fit VIS2_A + VIS2_B u + VIS2_C u^2 (VIS2_NAT_MS at the native grid when > 0),
# extrapolated for k > 2; 2 = one call but no 2-image fit: k * f1(u), extrapolated.
VIS2_A, VIS2_B, VIS2_C, VIS2_NAT_MS, VIS_MODE = 25, 26, 27, 28, 29
# serving loop: the first step's growth with the prompt, c(P) = LOOP_FIRST + LOOP_FIRST_P * P (ms per prompt
# token, >= 0; 0 = a constant c). A runtime may pay per prompt token once after the prefill (genai frees
# the P x vocab logits there: docs/decisions.md).
LOOP_FIRST_P = 30
NCOL = 31
# pieces columns
P_START, P_VALUE, P_SLOPE, P_CUM = 0, 1, 2, 3
PCOL = 4

# The one limit on every integer a request carries (token counts, config fields) and the cap of nfit;
# the serving layer checks against the same number (serving/validation.py).
TOKEN_MAX = 2**31 - 1

# Factor sources (low 2 bits of a decision code)
F_NONE, F_CONFORMAL, F_RESIDUAL, F_CLIPPED = 0, 1, 2, 3
# Decision codes: status*STATUS_STRIDE + factorised*FACTORISED_BIT + extrapolated*EXTRAPOLATED_BIT + factor
# source, for status in 0 = fits, 1 = requested tokens over budget (fewer fit), 2 = over budget even for one token.
ST_FITS, ST_FEWER, ST_NONE = 0, 1, 2
STATUS_STRIDE = 16
FACTORISED_BIT = 8  # set in a judged code when the config is predicted by the factorised model
ADMIT_BELOW = (ST_FITS + 1) * STATUS_STRIDE  # a code < ADMIT_BELOW has status ST_FITS: the request is admitted
# predict_batch's per-request flags (bits)
PB_EXTRAPOLATED, PB_FACTORISED, PB_CLIPPED, PB_INVALID = 1, 2, 4, 8
BAD_FIELDS = ("budget_ms", "vision_tokens", "text_tokens", "max_new_tokens", "tier_idx", "top_k",
              "num_active_blocks", "alpha")  # fmt: skip
CODE_BAD = 64  # + index in BAD_FIELDS
CODE_EMPTY_PROMPT = 72
CODE_UNKNOWN_CONFIG = 73
CODE_BAD_SCALE = 74  # a prefill/decode scale or factor not finite > 0
CODE_NO_CANDIDATE = 75  # choose: no candidate config (empty list, or none known)
CODE_BAD_IMAGES = 76  # admit's images: None or an integer in [1, TOKEN_MAX]
N_CODES = 77
EXTRAPOLATED_BIT = 4  # set in a judged code (< CODE_BAD) when the request leaves the measured range

BAD_EXPECTED = {
    "budget_ms": "a finite number >= 0",
    "vision_tokens": f"an integer in [0, {TOKEN_MAX}]",
    "text_tokens": f"an integer in [0, {TOKEN_MAX}]",
    "max_new_tokens": f"None or an integer in [1, {TOKEN_MAX}]",
    "tier_idx": f"an integer in [0, {TOKEN_MAX}]",
    "top_k": f"an integer in [0, {TOKEN_MAX}]",
    "num_active_blocks": f"None or an integer in [0, {TOKEN_MAX}]",
    "alpha": "None or a number in (0, 1)",
}


def _build_reasons() -> tuple[str, ...]:
    status = ("fits the budget", "over budget for the requested tokens; max_new_tokens is what fits",
              "over budget even for one token (prefill alone)")  # fmt: skip
    factor = ("", "; alpha from conformal factors", "; alpha/quantile from residual quantiles",
              "; alpha/quantile beyond calibrated quantiles (largest stored used)")  # fmt: skip
    out = [""] * N_CODES
    for st in range(3):
        for fact in range(2):
            for ext in range(2):
                for fs in range(4):
                    out[st * STATUS_STRIDE + fact * FACTORISED_BIT + ext * EXTRAPOLATED_BIT + fs] = (
                        status[st]
                        + ("; config predicted by the factorised model" if fact else "")
                        + ("; outside the measured range (extrapolated)" if ext else "")
                        + factor[fs]
                    )
    for i, name in enumerate(BAD_FIELDS):
        out[CODE_BAD + i] = f"bad field '{name}': expected {BAD_EXPECTED[name]}"
    out[CODE_EMPTY_PROMPT] = "bad request: vision_tokens + text_tokens is 0 (empty prompt)"
    out[CODE_UNKNOWN_CONFIG] = "unknown config (tier_idx, top_k, num_active_blocks): not measured nor predictable"
    out[CODE_BAD_SCALE] = "bad scale: prefill_scale, decode_scale and factor must be finite numbers > 0"
    out[CODE_NO_CANDIDATE] = "no candidate config: the list is empty or names no known config"
    out[CODE_BAD_IMAGES] = f"bad field 'images': expected None or an integer in [1, {TOKEN_MAX}]"
    return tuple(out)


REASONS = _build_reasons()
CODE_OF_REASON = {text: code for code, text in enumerate(REASONS)}


def reason_text(code: int) -> str:
    return REASONS[int(code)]


def as_int(o: Any) -> int | None:
    """Integer value of a request field, or None when it is not an integer (bool is not one)."""
    if type(o) is int:
        return o
    if isinstance(o, bool | float | str | bytes):
        return None
    try:
        return operator.index(o)
    except Exception:  # noqa: BLE001 - any failure means "not an integer"
        return None


def as_real(o: Any) -> float | None:
    """Float value of a real-number field, or None (bool, str, complex, ... are not real numbers here)."""
    if type(o) is float:
        return o
    if isinstance(o, bool | str | bytes | bytearray):
        return None
    if not (hasattr(type(o), "__float__") or hasattr(type(o), "__index__")):
        return None
    try:
        return float(o)
    except Exception:  # noqa: BLE001 - overflow, custom __float__ failures: not a usable number
        return None


def as_candidates(o: Any) -> tuple[Any, ...] | list[Any]:
    """choose's candidate list: a tuple or list as given, another iterable as a tuple, anything else ()."""
    if type(o) is tuple or type(o) is list:
        return o  # type: ignore[no-any-return]
    try:
        return tuple(o)
    except Exception:  # noqa: BLE001 - not iterable: no candidates
        return ()


_ENUM_NAMES = ("PRE_A", "PRE_B", "PRE_C", "PAST_LO", "PAST_HI", "PRE_LO", "PRE_HI", "FACTORISED", "PIECE_OFF",
               "PIECE_CNT", "CONF_OFF", "CONF_CNT", "RQ_OFF", "RQ_CNT", "LOOP_FIRST", "LOOP_PRE", "VIS_A", "VIS_B",
               "VIS_C", "VIS_LO", "VIS_HI", "EMB_A", "EMB_B", "VIS_NAT_V", "VIS_NAT_MS", "VIS2_A", "VIS2_B",
               "VIS2_C", "VIS2_NAT_MS", "VIS_MODE", "LOOP_FIRST_P", "NCOL",
               "P_START", "P_VALUE", "P_SLOPE", "P_CUM", "PCOL", "TOKEN_MAX", "F_NONE", "F_CONFORMAL",
               "F_RESIDUAL", "F_CLIPPED", "CODE_BAD", "CODE_EMPTY_PROMPT", "CODE_UNKNOWN_CONFIG",
               "CODE_BAD_SCALE", "CODE_NO_CANDIDATE", "CODE_BAD_IMAGES", "EXTRAPOLATED_BIT", "ST_FITS", "ST_FEWER",
               "ST_NONE", "STATUS_STRIDE", "FACTORISED_BIT", "ADMIT_BELOW", "PB_EXTRAPOLATED", "PB_FACTORISED", "PB_CLIPPED",
               "PB_INVALID")  # fmt: skip


def pxd_enums() -> str:
    """The Cython text of the constants above (setup.py writes it to ext/_layout.pxi)."""
    lines = ["# Generated by setup.py from ext/layout.py: edit that file, not this one.", "cdef enum:"]
    lines += [f"    {name} = {globals()[name]}" for name in _ENUM_NAMES]
    return "\n".join(lines) + "\n"
