"""Pure-Python mirror of the math core (ext/_kernels.pxd) and of the Kernel entry points (ext/_kernels.pyx).

The fallback when the Cython extension is not built (or TRT_LATENCY_PUREPYTHON=1), and the
readable statement of what the compiled code computes; tests/test_estimator_kernels.py checks the
two equal on random tables and requests. The table layout, decision codes, reasons, field limits
and field converters are ext/layout.py's (both implementations import that one module).

Semantics: C(m) = sum_{L=0}^{m-1} T(L) in closed form per piece; prefill(P) = max(a + b P + c P^2, 0) + o_p;
total(n) = (prefill(P) + [n >= 2] ((C(P+n-1) - C(P)) + c(P))) * f for n >= 1, where f is the alpha / quantile
factor and c(P) = c0 + c1 P the serving loop's one-off first-step cost (c1 = 0: a constant). T here is the step the tables were built with: the serving step T_engine(L) + o when the
per-step loop overhead o is folded into the piece values (Estimator does that at load time), so the
kernels never see o itself. ``nfit`` is the largest n with total(n) <= budget,
found by a binary search over pieces, a quadratic solve inside the piece, then a fix-up against total()
itself so that total(n) <= budget < total(n+1) holds exactly in floating point.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any, NamedTuple

import numpy as np

from trt_latency.ext.layout import (
    ADMIT_BELOW,
    CODE_BAD,
    CODE_BAD_IMAGES,
    CODE_BAD_SCALE,
    CODE_EMPTY_PROMPT,
    CODE_NO_CANDIDATE,
    CODE_OF_REASON,
    CODE_UNKNOWN_CONFIG,
    CONF_CNT,
    CONF_OFF,
    EMB_A,
    EMB_B,
    EXTRAPOLATED_BIT,
    F_CLIPPED,
    F_CONFORMAL,
    F_NONE,
    F_RESIDUAL,
    FACTORISED,
    FACTORISED_BIT,
    LOOP_FIRST,
    LOOP_FIRST_P,
    LOOP_PRE,
    P_CUM,
    P_SLOPE,
    P_START,
    P_VALUE,
    PAST_HI,
    PAST_LO,
    PB_CLIPPED,
    PB_EXTRAPOLATED,
    PB_FACTORISED,
    PB_INVALID,
    PIECE_CNT,
    PIECE_OFF,
    PRE_A,
    PRE_B,
    PRE_C,
    PRE_HI,
    PRE_LO,
    REASONS,
    RQ_CNT,
    RQ_OFF,
    ST_FEWER,
    ST_FITS,
    ST_NONE,
    STATUS_STRIDE,
    TOKEN_MAX,
    VIS2_A,
    VIS2_B,
    VIS2_C,
    VIS2_NAT_MS,
    VIS_A,
    VIS_B,
    VIS_C,
    VIS_HI,
    VIS_LO,
    VIS_MODE,
    VIS_NAT_MS,
    VIS_NAT_V,
    as_candidates,
    as_int,
    as_real,
)

IMPLEMENTATION = "reference"


def _images_field(images: Any) -> int:
    """A request's images: None = 1, else an integer in [1, TOKEN_MAX]; -1 for a bad value."""
    if images is None:
        return 1
    got = as_int(images)
    return got if got is not None and 1 <= got <= TOKEN_MAX else -1


def _same_length(what: str, size: int, *arrays: np.ndarray | None) -> None:
    """The batch entry points' one shape rule (as the compiled ones): every array as long as the first."""
    if any(a is not None and a.shape[0] != size for a in arrays):
        raise ValueError(f"{what}: all arrays must have the same length")


class _DecisionFields(NamedTuple):
    admit: bool
    max_new_tokens: int
    predicted_ms: float
    reason: str


class Decision(_DecisionFields):
    """An admission decision: admit, max_new_tokens that fit, predicted total ms, reason (a 4-tuple);
    ``config`` (not in the tuple) is the candidate Kernel.choose decided on, None from admit."""

    config: Any = None

    @property
    def code(self) -> int:
        """The decision code (see REASONS); -1 for a Decision not made by a kernel."""
        return CODE_OF_REASON.get(self.reason, -1)

    @property
    def judged(self) -> bool:
        """True when the model judged the request (fields valid, config known), extrapolated or not."""
        return 0 <= self.code < CODE_BAD

    @property
    def extrapolated(self) -> bool:
        """True when the request leaves the measured range (the model extrapolates)."""
        code = self.code
        return 0 <= code < CODE_BAD and bool(code & EXTRAPOLATED_BIT)


class Kernel:
    """Holds the tables of one Estimator and evaluates them (pure Python)."""

    def __init__(self, tables: dict[str, np.ndarray]) -> None:
        self.cfg = np.ascontiguousarray(tables["cfg"], dtype=np.float64).tolist()
        self.pieces = np.ascontiguousarray(tables["pieces"], dtype=np.float64).tolist()
        self.conf = np.ascontiguousarray(tables["conf"], dtype=np.float64).tolist()
        self.rq = np.ascontiguousarray(tables["rq"], dtype=np.float64).tolist()
        self.tier_map = [int(v) for v in tables["tier_map"]]
        self.topk_map = [int(v) for v in tables["topk_map"]]
        self.blocks_map = [int(v) for v in tables["blocks_map"]]
        self.preference: tuple[Any, ...] = ()  # choose's candidates when none are given (Estimator sets it)
        lut = np.asarray(tables["lut"], dtype=np.int64)
        self.n_blocks_slots = int(lut.shape[2])
        self.lut = lut.tolist()
        # Per config: piece starts and cums as lists for bisect.
        self._starts: list[list[float]] = []
        self._cums: list[list[float]] = []
        for row in self.cfg:
            off, cnt = int(row[PIECE_OFF]), int(row[PIECE_CNT])
            self._starts.append([p[P_START] for p in self.pieces[off : off + cnt]])
            self._cums.append([p[P_CUM] for p in self.pieces[off : off + cnt]])

    # ---------------------------------------------------------------- lookup
    def lookup(self, tier_idx: int, top_k: int, num_active_blocks: int) -> int:
        """Config row for the key (num_active_blocks < 0 = the tier's default), or -1."""
        if not 0 <= tier_idx < len(self.tier_map) or not 0 <= top_k < len(self.topk_map):
            return -1
        ti, ki = self.tier_map[tier_idx], self.topk_map[top_k]
        if ti < 0 or ki < 0:
            return -1
        if num_active_blocks < 0:
            bi = self.n_blocks_slots - 1
        else:
            if num_active_blocks >= len(self.blocks_map):
                return -1
            bi = self.blocks_map[num_active_blocks]
            if bi < 0:
                return -1
        return int(self.lut[ti][ki][bi])

    # ---------------------------------------------------------------- arithmetic
    def _piece(self, c: int, m: float) -> list[float]:
        off = int(self.cfg[c][PIECE_OFF])
        i = bisect_right(self._starts[c], m) - 1
        return self.pieces[off + (i if i > 0 else 0)]

    def step(self, c: int, past_len: float) -> float:
        p = self._piece(c, past_len)
        return p[P_VALUE] + p[P_SLOPE] * (past_len - p[P_START])

    def cumsum(self, c: int, m: float) -> float:
        """sum_{L=0}^{m-1} T(L) for integer-valued m >= 0."""
        p = self._piece(c, m)
        k = m - p[P_START]
        return p[P_CUM] + k * p[P_VALUE] + p[P_SLOPE] * (k * (k - 1.0) * 0.5)

    def prefill(self, c: int, prompt: float) -> float:
        row = self.cfg[c]
        x = row[PRE_A] + prompt * (row[PRE_B] + row[PRE_C] * prompt)
        return (x if x > 0.0 else 0.0) + row[LOOP_PRE]

    @staticmethod
    def _vis_call(row: Any, u: float, two: bool) -> float:
        """One encoder call on images of u tokens each: one image or two, clipped at 0."""
        if two:
            if row[VIS_NAT_V] > 0.0 and u == row[VIS_NAT_V] and row[VIS2_NAT_MS] > 0.0:
                return float(row[VIS2_NAT_MS])
            x = row[VIS2_A] + u * (row[VIS2_B] + row[VIS2_C] * u)
        elif row[VIS_NAT_V] > 0.0 and u == row[VIS_NAT_V]:
            x = row[VIS_NAT_MS]  # the native grid: measured, not fitted
        else:
            x = row[VIS_A] + u * (row[VIS_B] + row[VIS_C] * u)
        return float(x) if x > 0.0 else 0.0

    def vision(self, c: int, vision: float, prompt: float, images: float = 1.0) -> float:
        """The VLM encoder + embedding step ms of a request with `vision` tokens over `images` images (0
        without vision tokens): one call per image, or one call for all (VIS_MODE; see ext/layout.py)."""
        if vision <= 0.0:
            return 0.0
        row = self.cfg[c]
        if images < 1.0:
            images = 1.0
        u = vision / images
        f1 = self._vis_call(row, u, False)
        if images == 1.0 or row[VIS_MODE] != 1.0:
            x = images * f1
        else:
            f2 = self._vis_call(row, u, True)
            x = f2 + (images - 2.0) * (f2 - f1)
        e = row[EMB_A] + row[EMB_B] * prompt
        return float(x + (e if e > 0.0 else 0.0))

    def first(self, c: int, prompt: float) -> float:
        """The serving loop's one-off first-step cost c(P) = c0 + c1 * P (paid when n >= 2)."""
        row = self.cfg[c]
        return float(row[LOOP_FIRST] + row[LOOP_FIRST_P] * prompt)

    def decode_sum(self, c: int, prompt: float, n: float) -> float:
        if n <= 1.0:
            return 0.0
        return (self.cumsum(c, prompt + n - 1.0) - self.cumsum(c, prompt)) + self.first(c, prompt)

    def total(self, c: int, prompt: float, n: float, factor: float) -> float:
        return (self.prefill(c, prompt) + self.decode_sum(c, prompt, n)) * factor

    def predict(self, c: int, prompt: float, n: float, factor: float) -> tuple[float, float, float]:
        pre = self.prefill(c, prompt)
        dec = self.decode_sum(c, prompt, n)
        return pre * factor, dec * factor, (pre + dec) * factor

    def _total_at(self, c: int, prompt: float, n: float, factor: float, pre: float, cp: float,
                  ds: float = 1.0) -> float:
        """total() with prefill(prompt) = pre (already times the prefill scale) and cumsum(prompt) = cp
        precomputed, the decode part times ds (same arithmetic; ds = 1.0 is exact)."""
        if n <= 1.0:
            return (pre + 0.0) * factor
        return (pre + ds * ((self.cumsum(c, prompt + n - 1.0) - cp) + self.first(c, prompt))) * factor

    def nfit(self, c: int, prompt: float, budget: float, factor: float) -> int:
        """Largest n in [0, TOKEN_MAX] with total(n) <= budget (0: not even the first token)."""
        return self._nfit_at(c, prompt, budget, factor, self.prefill(c, prompt), 1.0)

    def nfit_scaled(self, c: int, prompt: float, budget: float, prefill_scale: float, decode_scale: float,
                    factor: float) -> int:
        """Largest n with total_scaled(n) <= budget, total_scaled(n) = (prefill_scale * prefill
        + decode_scale * decode_sum(n)) * factor (scales > 0)."""
        return self._nfit_at(c, prompt, budget, factor, self.prefill(c, prompt) * prefill_scale, decode_scale)

    def total_scaled(self, c: int, prompt: float, n: float, prefill_scale: float, decode_scale: float,
                     factor: float) -> float:
        return self._total_at(c, prompt, n, factor, self.prefill(c, prompt) * prefill_scale,
                              self.cumsum(c, prompt), decode_scale)

    def _nfit_at(self, c: int, prompt: float, budget: float, factor: float, pre: float, ds: float) -> int:
        if (pre + 0.0) * factor > budget:
            return 0
        cp = self.cumsum(c, prompt)
        row = self.cfg[c]
        off, cnt = int(row[PIECE_OFF]), int(row[PIECE_CNT])
        target = cp + ((budget / factor - pre) / ds - self.first(c, prompt))  # an estimate: _fixup makes it exact
        i = bisect_right(self._cums[c], target) - 1
        if i < 0:
            i = 0
        p = self.pieces[off + i]
        r = target - p[P_CUM]
        if r < 0.0:
            r = 0.0
        v, beta = p[P_VALUE], p[P_SLOPE]
        if beta == 0.0:
            k = r / v
        else:
            q = v - 0.5 * beta
            disc = math.sqrt(q * q + 2.0 * beta * r)
            k = (disc - q) / beta if q < 0.0 else 2.0 * r / (q + disc)
        if not k < 1e18:  # huge budgets (and overflow): the cap below applies
            k = 1e18
        m = p[P_START] + math.floor(k)
        if i + 1 < cnt:
            nxt = self.pieces[off + i + 1][P_START]
            if m > nxt:
                m = nxt
        n_est = m - prompt + 1.0
        n = 1 if not n_est >= 1.0 else (TOKEN_MAX if n_est >= TOKEN_MAX else int(n_est))
        return self._fixup(c, prompt, budget, factor, n, pre, cp, ds)

    def _fixup(self, c: int, prompt: float, budget: float, factor: float, n: int, pre: float, cp: float,
               ds: float) -> int:
        # Invariant wanted: total(lo) <= budget < total(hi); total(1) <= budget is known.
        def fits(k: int) -> bool:
            return self._total_at(c, prompt, float(k), factor, pre, cp, ds) <= budget

        if fits(n):
            lo, step = n, 1
            while True:
                if lo >= TOKEN_MAX:
                    return TOKEN_MAX
                probe = lo + step if lo + step <= TOKEN_MAX else TOKEN_MAX
                if fits(probe):
                    lo, step = probe, step * 2
                else:
                    hi = probe
                    break
        else:
            hi, step = n, 1
            while True:
                probe = hi - step if hi - step >= 1 else 1
                if probe == 1 or fits(probe):
                    lo = probe
                    break
                hi, step = probe, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    # ---------------------------------------------------------------- factors
    def alpha_factor(self, c: int, alpha: float) -> tuple[float, int]:
        """Conformal factor of the largest stored alpha <= alpha, else the residual quantile of 1-alpha."""
        row = self.cfg[c]
        off, cnt = int(row[CONF_OFF]), int(row[CONF_CNT])
        best = -1
        for j in range(cnt):
            if self.conf[off + j][0] <= alpha:
                best = j
        if best >= 0:
            return self.conf[off + best][1], F_CONFORMAL
        return self.quantile_factor(c, 1.0 - alpha)

    def quantile_factor(self, c: int, q: float) -> tuple[float, int]:
        """Residual ratio of the smallest stored quantile >= q; the largest stored (flagged) beyond."""
        row = self.cfg[c]
        off, cnt = int(row[RQ_OFF]), int(row[RQ_CNT])
        if cnt == 0:
            return 1.0, F_CLIPPED
        for j in range(cnt):
            if self.rq[off + j][0] >= q - 1e-12:
                return self.rq[off + j][1], F_RESIDUAL
        return self.rq[off + cnt - 1][1], F_CLIPPED

    def factorised(self, c: int) -> bool:
        return self.cfg[c][FACTORISED] != 0.0

    def extrapolated(self, c: int, prompt: float, n: float, vision: float = 0.0, images: float = 1.0) -> bool:
        row = self.cfg[c]
        if prompt < row[PRE_LO] or prompt > row[PRE_HI]:
            return True
        if vision > 0.0 and row[VIS_HI] > 0.0:
            u = vision / (images if images > 1.0 else 1.0)  # tokens per image: the swept range is per image
            if u < row[VIS_LO] or u > row[VIS_HI]:
                return True
            if images > 1.0 and (row[VIS_MODE] == 2.0 or (row[VIS_MODE] == 1.0 and images > 2.0)):
                return True  # more images per call than were swept
        return n >= 2.0 and (prompt < row[PAST_LO] or prompt + n - 2.0 > row[PAST_HI])

    # ---------------------------------------------------------------- admission
    def admit(
        self,
        budget_ms: Any,
        vision_tokens: Any,
        text_tokens: Any,
        max_new_tokens: Any = None,
        tier_idx: Any = 0,
        top_k: Any = 1,
        num_active_blocks: Any = None,
        alpha: Any = None,
        images: Any = None,
    ) -> Decision:
        code, n, pred = self.admit_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                        num_active_blocks, alpha, images)  # fmt: skip
        return Decision(code < ADMIT_BELOW, n, pred, REASONS[code])

    def admit_code(
        self,
        budget_ms: Any,
        vision_tokens: Any,
        text_tokens: Any,
        max_new_tokens: Any,
        tier_idx: Any,
        top_k: Any,
        num_active_blocks: Any,
        alpha: Any,
        images: Any = None,
    ) -> tuple[int, int, float]:
        nan = math.nan
        bad, budget, prompt, req, keys, blocks = self._fields(budget_ms, vision_tokens, text_tokens, max_new_tokens,
                                                              tier_idx, top_k, num_active_blocks)
        if bad >= 0:
            return bad, 0, nan
        a = -1.0
        if alpha is not None:
            af = as_real(alpha)
            if af is None or not (0.0 < af < 1.0):
                return CODE_BAD + 7, 0, nan
            a = af
        im = _images_field(images)
        if im < 0:
            return CODE_BAD_IMAGES, 0, nan
        if prompt == 0:
            return CODE_EMPTY_PROMPT, 0, nan
        c = self.lookup(keys[0], keys[1], blocks)
        if c < 0:
            return CODE_UNKNOWN_CONFIG, 0, nan
        return self.decide(c, float(prompt), budget, req, a, float(as_int(vision_tokens) or 0), float(im))

    def _fields(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any, tier_idx: Any,
                top_k: Any, num_active_blocks: Any) -> tuple[int, float, int, int, list[int], int]:
        """(bad code or -1, budget, prompt, req (-1 = None), [tier, top_k], blocks (-1 = None))."""
        bad = (0.0, 0, -1, [0, 0], -1)
        budget = as_real(budget_ms)
        if budget is None or not (0.0 <= budget < math.inf):
            return (CODE_BAD + 0, *bad)
        got: list[int] = []
        # (index in BAD_FIELDS, value, lowest valid, None allowed (-1 then)), in the order the kernels check
        for i, value, lo, optional in ((1, vision_tokens, 0, False), (2, text_tokens, 0, False),
                                       (3, max_new_tokens, 1, True), (4, tier_idx, 0, False), (5, top_k, 0, False),
                                       (6, num_active_blocks, 0, True)):  # fmt: skip
            if optional and value is None:
                got.append(-1)
                continue
            x = as_int(value)
            if x is None or not lo <= x <= TOKEN_MAX:
                return (CODE_BAD + i, *bad)
            got.append(x)
        v, t, req, tier, top, blocks = got
        return -1, budget, v + t, req, [tier, top], blocks

    def admit_scaled(
        self,
        budget_ms: Any,
        vision_tokens: Any,
        text_tokens: Any,
        max_new_tokens: Any,
        tier_idx: Any,
        top_k: Any,
        num_active_blocks: Any,
        prefill_scale: Any,
        decode_scale: Any,
        factor: Any,
        images: Any = None,
    ) -> Decision:
        """admit() on the scaled model total_scaled(n) = (prefill_scale * prefill(P) + decode_scale *
        decode_sum(P, n)) * factor: a serving loop's online corrections and safety factor applied
        inside the kernel. max_new_tokens is exact under the scaled model:
        total_scaled(n) <= budget < total_scaled(n + 1); predicted_ms is total_scaled(requested or 1).
        Never raises; Decision.code / .extrapolated / .judged say how the request was judged."""
        code, n, pred = self._scaled_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx,
                                               top_k, num_active_blocks, prefill_scale, decode_scale, factor, images)
        return Decision(code < ADMIT_BELOW, n, pred, REASONS[code])

    def _scaled_code(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any,
                     tier_idx: Any, top_k: Any, num_active_blocks: Any, prefill_scale: Any,
                     decode_scale: Any, factor: Any, images: Any = None) -> tuple[int, int, float]:
        nan = math.nan
        bad, budget, prompt, req, keys, blocks = self._fields(budget_ms, vision_tokens, text_tokens, max_new_tokens,
                                                              tier_idx, top_k, num_active_blocks)
        if bad >= 0:
            return bad, 0, nan
        scales = []
        for value in (prefill_scale, decode_scale, factor):
            x = as_real(value)
            if x is None or not (0.0 < x < math.inf):
                return CODE_BAD_SCALE, 0, nan
            scales.append(x)
        im = _images_field(images)
        if im < 0:
            return CODE_BAD_IMAGES, 0, nan
        if prompt == 0:
            return CODE_EMPTY_PROMPT, 0, nan
        c = self.lookup(keys[0], keys[1], blocks)
        if c < 0:
            return CODE_UNKNOWN_CONFIG, 0, nan
        return self.decide_scaled(c, float(prompt), budget, req, scales[2], F_NONE, scales[0], scales[1],
                                  float(as_int(vision_tokens) or 0), float(im))

    def decide(self, c: int, prompt: float, budget: float, req: int, alpha: float,
               vision: float = 0.0, images: float = 1.0) -> tuple[int, int, float]:
        """Validated request -> (code, max_new_tokens, predicted_ms). req < 0: no requested length."""
        if alpha > 0.0:
            factor, fsrc = self.alpha_factor(c, alpha)
        else:
            factor, fsrc = 1.0, F_NONE
        return self.decide_scaled(c, prompt, budget, req, factor, fsrc, 1.0, 1.0, vision, images)

    def decide_scaled(self, c: int, prompt: float, budget: float, req: int, factor: float, fsrc: int, ps: float,
                      ds: float, vision: float = 0.0, images: float = 1.0) -> tuple[int, int, float]:
        need = req if req > 0 else 1
        pre = (self.prefill(c, prompt) + self.vision(c, vision, prompt, images)) * ps
        cp = self.cumsum(c, prompt)
        pred = self._total_at(c, prompt, float(need), factor, pre, cp, ds)
        if req > 0 and pred <= budget:
            n, status = req, ST_FITS
        else:
            n = self._nfit_at(c, prompt, budget, factor, pre, ds)
            status = ST_FITS if n >= need else (ST_FEWER if n >= 1 else ST_NONE)
        ext = self.extrapolated(c, prompt, float(n if n > need else need), vision, images)
        fact = 1 if self.cfg[c][FACTORISED] != 0.0 else 0
        return status * STATUS_STRIDE + fact * FACTORISED_BIT + (EXTRAPOLATED_BIT if ext else 0) + fsrc, n, pred

    def choose(self, budget_ms: Any, vision_tokens: Any, text_tokens: Any, max_new_tokens: Any = None,
               candidates: Any = None, alpha: Any = None, images: Any = None) -> Decision:
        """The admit Decision of the first candidate config (tier_idx, top_k, num_active_blocks) that
        admits, in the given order (None: self.preference), with .config = that candidate; when none
        admits, candidate 0's Decision (with .config = candidate 0). No candidates: CODE_NO_CANDIDATE.
        `images` as in admit. Never raises."""
        candidates = self.preference if candidates is None else as_candidates(candidates)
        first: tuple[int, int, float] = (CODE_NO_CANDIDATE, 0, math.nan)
        for i, cand in enumerate(candidates):
            try:
                ti, tk, bl = cand
            except Exception:  # noqa: BLE001 - a candidate that is not a 3-tuple is an unknown config
                code, n, pred = CODE_UNKNOWN_CONFIG, 0, math.nan
            else:
                code, n, pred = self.admit_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, ti, tk, bl,
                                                alpha, images)  # fmt: skip
            if code < ADMIT_BELOW:
                return self._chosen(code, n, pred, cand)
            if i == 0:
                first = (code, n, pred)
                if CODE_BAD <= code < CODE_BAD + 4 or code == CODE_BAD_IMAGES:
                    break  # a bad request field: every candidate gets the same answer
        return self._chosen(*first, candidates[0] if candidates else None)

    @staticmethod
    def _chosen(code: int, n: int, pred: float, config: Any) -> Decision:
        d = Decision(code < ADMIT_BELOW, n, pred, REASONS[code])
        d.config = config
        return d

    def admit_batch(
        self,
        budget_ms: np.ndarray,
        vision_tokens: np.ndarray,
        text_tokens: np.ndarray,
        max_new_tokens: np.ndarray,
        tier_idx: np.ndarray,
        top_k: np.ndarray,
        num_active_blocks: np.ndarray,
        alpha: float = -1.0,
        images: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Arrays in (float64 budget, int64 the rest; -1 = None for max_new_tokens / num_active_blocks;
        alpha <= 0 = none; images None = one image per request)
        -> (admit bool, max_new_tokens int64, predicted_ms float64, code int64)."""
        size = budget_ms.shape[0]
        _same_length("admit_batch", size, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                     num_active_blocks, images)
        ok = np.zeros(size, dtype=bool)
        nout = np.zeros(size, dtype=np.int64)
        pred = np.full(size, math.nan)
        code = np.zeros(size, dtype=np.int64)
        a = float(alpha)
        alpha_v = None if a <= 0.0 else a  # NaN stays: admit_code refuses it as it refuses alpha >= 1
        for i in range(size):
            req, bl = int(max_new_tokens[i]), int(num_active_blocks[i])
            cd, n, p = self.admit_code(float(budget_ms[i]), int(vision_tokens[i]), int(text_tokens[i]),
                                       None if req == -1 else req, int(tier_idx[i]), int(top_k[i]),
                                       None if bl == -1 else bl, alpha_v,
                                       None if images is None else int(images[i]))  # fmt: skip
            code[i], nout[i], pred[i], ok[i] = cd, n, p, cd < ADMIT_BELOW
        return ok, nout, pred, code

    def predict_batch(
        self,
        vision_tokens: np.ndarray,
        text_tokens: np.ndarray,
        output_tokens: np.ndarray,
        tier_idx: np.ndarray,
        top_k: np.ndarray,
        num_active_blocks: np.ndarray,
        quantile: float = -1.0,
        images: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """-> (prefill_ms, decode_ms, total_ms, flags); NaN rows for invalid requests or unknown configs.
        flags bit 0 extrapolated, bit 1 factorised, bit 2 quantile beyond stored, bit 3 invalid.
        images None = one image per request."""
        size = vision_tokens.shape[0]
        _same_length("predict_batch", size, text_tokens, output_tokens, tier_idx, top_k, num_active_blocks, images)
        pre = np.full(size, math.nan)
        dec = np.full(size, math.nan)
        tot = np.full(size, math.nan)
        flags = np.zeros(size, dtype=np.int64)
        qv = float(quantile)
        for i in range(size):
            vt, tt, n = int(vision_tokens[i]), int(text_tokens[i]), int(output_tokens[i])
            ti, tk, bl = int(tier_idx[i]), int(top_k[i]), int(num_active_blocks[i])
            im = 1 if images is None else int(images[i])
            if (not 0 <= vt <= TOKEN_MAX or not 0 <= tt <= TOKEN_MAX or vt + tt == 0 or not 1 <= n <= TOKEN_MAX
                    or not 0 <= ti <= TOKEN_MAX or not 0 <= tk <= TOKEN_MAX or bl < -1 or bl > TOKEN_MAX
                    or not 1 <= im <= TOKEN_MAX):  # fmt: skip
                flags[i] = PB_INVALID
                continue
            c = self.lookup(ti, tk, bl)
            if c < 0:
                flags[i] = PB_INVALID
                continue
            f, fsrc = (1.0, F_NONE) if not qv > 0.0 else self.quantile_factor(c, qv)
            prompt = float(vt + tt)
            p_ = self.prefill(c, prompt) + self.vision(c, float(vt), prompt, float(im))
            d_ = self.decode_sum(c, prompt, float(n))
            pre[i], dec[i], tot[i] = p_ * f, d_ * f, (p_ + d_) * f
            flags[i] = (
                (PB_EXTRAPOLATED if self.extrapolated(c, prompt, float(n), float(vt), float(im)) else 0)
                | (PB_FACTORISED if self.cfg[c][FACTORISED] != 0.0 else 0)
                | (PB_CLIPPED if fsrc == F_CLIPPED else 0)
            )
        return pre, dec, tot, flags
