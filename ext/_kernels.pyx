# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled evaluation kernels: the same contract as trt_latency.estimator._reference, line for line.

Inner functions are `noexcept nogil` over raw pointers into flat float64 / int64 tables (Tables in
the .pxd); Kernel holds the tables, and its `admit` does argument checks, lookup and arithmetic in C.
Only non-int/non-float request fields (numpy scalars, bools, junk) take a slow path through the
reference's converters, so both implementations accept and reject exactly the same values.
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport INFINITY, NAN, floor, isfinite, isnan, sqrt
from libc.stdlib cimport free, malloc

from ext._kernels cimport *  # shared types: Tables + column / code enums (ext/_kernels.pxd)

import numpy as np

from trt_latency.estimator import _reference as _ref

IMPLEMENTATION = "cython"

cdef long long TOKEN_MAX = _ref.TOKEN_MAX
cdef tuple _REASONS = _ref.REASONS
cdef object _as_int = _ref.as_int
cdef object _as_real = _ref.as_real
cdef dict _CODE_OF_REASON = {text: code for code, text in enumerate(_REASONS)}

# The table layout is defined once (in the reference); refuse to run against another one.
if (NCOL, CODE_BAD, CODE_EMPTY_PROMPT, CODE_UNKNOWN_CONFIG, PIECE_OFF, RQ_CNT, LOOP_FIRST, LOOP_PRE,
        CODE_BAD_SCALE, EXTRAPOLATED_BIT) != (
        _ref.NCOL, _ref.CODE_BAD, _ref.CODE_EMPTY_PROMPT, _ref.CODE_UNKNOWN_CONFIG, _ref.PIECE_OFF, _ref.RQ_CNT,
        _ref.LOOP_FIRST, _ref.LOOP_PRE, _ref.CODE_BAD_SCALE, _ref.EXTRAPOLATED_BIT):
    raise ImportError("trt_latency.ext._kernels is stale (table layout differs from the reference); rebuild it")


# ------------------------------------------------------------------------------ inner kernels

cdef long long c_lookup(const Tables* t, long long tier, long long top_k, long long blocks) noexcept nogil:
    cdef long long ti, ki, bi
    if tier < 0 or tier >= t.n_tier_map or top_k < 0 or top_k >= t.n_topk_map:
        return -1
    ti = t.tier_map[tier]
    ki = t.topk_map[top_k]
    if ti < 0 or ki < 0:
        return -1
    if blocks < 0:
        bi = t.lut_b - 1
    else:
        if blocks >= t.n_blocks_map:
            return -1
        bi = t.blocks_map[blocks]
        if bi < 0:
            return -1
    return t.lut[(ti * t.lut_k + ki) * t.lut_b + bi]


cdef inline Py_ssize_t _bisect(const double* base, Py_ssize_t cnt, double x) noexcept nogil:
    """Last j < cnt with base[j * PCOL] <= x, else -1 (= bisect_right - 1 on sorted starts / cums)."""
    cdef Py_ssize_t lo = 0, n = cnt, half, j
    if cnt <= 16:  # typical knot counts: a branch-free count, no dependent loads
        for j in range(cnt):
            lo += base[j * PCOL] <= x
        return lo - 1
    while n > 1:
        half = n >> 1
        lo = lo + half if base[(lo + half) * PCOL] <= x else lo
        n -= half
    return lo if base[lo * PCOL] <= x else lo - 1


cdef inline const double* _piece(const Tables* t, Py_ssize_t c, double m) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef const double* first = t.pieces + (<Py_ssize_t>row[PIECE_OFF]) * PCOL
    cdef Py_ssize_t i = _bisect(first + P_START, <Py_ssize_t>row[PIECE_CNT], m)
    if i < 0:
        i = 0
    return first + i * PCOL


cdef double c_step(const Tables* t, Py_ssize_t c, double past_len) noexcept nogil:
    cdef const double* p = _piece(t, c, past_len)
    return p[P_VALUE] + p[P_SLOPE] * (past_len - p[P_START])


cdef double c_cumsum(const Tables* t, Py_ssize_t c, double m) noexcept nogil:
    cdef const double* p = _piece(t, c, m)
    cdef double k = m - p[P_START]
    return p[P_CUM] + k * p[P_VALUE] + p[P_SLOPE] * (k * (k - 1.0) * 0.5)


cdef double c_prefill(const Tables* t, Py_ssize_t c, double prompt) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef double x = row[PRE_A] + prompt * (row[PRE_B] + row[PRE_C] * prompt)
    return (x if x > 0.0 else 0.0) + row[LOOP_PRE]


cdef inline double _decode_sum(const Tables* t, Py_ssize_t c, double prompt, double n) noexcept nogil:
    if n <= 1.0:
        return 0.0
    return (c_cumsum(t, c, prompt + n - 1.0) - c_cumsum(t, c, prompt)) + t.cfg[c * NCOL + LOOP_FIRST]


cdef double c_total(const Tables* t, Py_ssize_t c, double prompt, double n, double factor) noexcept nogil:
    return (c_prefill(t, c, prompt) + _decode_sum(t, c, prompt, n)) * factor


cdef inline double _cumsum_hint(const Tables* t, Py_ssize_t c, double m, Py_ssize_t hint) noexcept nogil:
    """c_cumsum, trying piece `hint` first (the piece is unique, so the arithmetic is the same)."""
    cdef const double* row = t.cfg + c * NCOL
    cdef Py_ssize_t cnt = <Py_ssize_t>row[PIECE_CNT]
    cdef const double* first = t.pieces + (<Py_ssize_t>row[PIECE_OFF]) * PCOL
    cdef const double* p
    cdef double k
    if (0 <= hint < cnt and first[hint * PCOL + P_START] <= m
            and (hint + 1 == cnt or m < first[(hint + 1) * PCOL + P_START])):
        p = first + hint * PCOL
    else:
        p = _piece(t, c, m)
    k = m - p[P_START]
    return p[P_CUM] + k * p[P_VALUE] + p[P_SLOPE] * (k * (k - 1.0) * 0.5)


cdef inline double _total_at(const Tables* t, Py_ssize_t c, double prompt, double n, double factor,
                             double pre, double cp, Py_ssize_t hint, double ds) noexcept nogil:
    """c_total with prefill(prompt) = pre (times the prefill scale) and cumsum(prompt) = cp
    precomputed, the decode part times ds (same arithmetic; ds = 1.0 is exact)."""
    if n <= 1.0:
        return (pre + 0.0) * factor
    return (pre + ds * ((_cumsum_hint(t, c, prompt + n - 1.0, hint) - cp) + t.cfg[c * NCOL + LOOP_FIRST])) * factor


cdef long long _fixup(const Tables* t, Py_ssize_t c, double prompt, double budget, double factor,
                      long long n, double pre, double cp, Py_ssize_t hint, double ds) noexcept nogil:
    cdef long long lo, hi, step, probe, mid
    if _total_at(t, c, prompt, <double>n, factor, pre, cp, hint, ds) <= budget:
        lo = n
        step = 1
        while True:
            if lo >= TOKEN_MAX:
                return TOKEN_MAX
            probe = lo + step if lo + step <= TOKEN_MAX else TOKEN_MAX
            if _total_at(t, c, prompt, <double>probe, factor, pre, cp, hint, ds) <= budget:
                lo = probe
                step = step * 2
            else:
                hi = probe
                break
    else:
        hi = n
        step = 1
        while True:
            probe = hi - step if hi - step >= 1 else 1
            if probe == 1 or _total_at(t, c, prompt, <double>probe, factor, pre, cp, hint, ds) <= budget:
                lo = probe
                break
            hi = probe
            step = step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _total_at(t, c, prompt, <double>mid, factor, pre, cp, hint, ds) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


cdef long long c_nfit(const Tables* t, Py_ssize_t c, double prompt, double budget, double factor) noexcept nogil:
    return _nfit_at(t, c, prompt, budget, factor, c_prefill(t, c, prompt), c_cumsum(t, c, prompt), 1.0)


cdef long long _nfit_at(const Tables* t, Py_ssize_t c, double prompt, double budget, double factor,
                        double pre, double cp, double ds) noexcept nogil:
    cdef const double* row
    cdef const double* first
    cdef const double* p
    cdef Py_ssize_t off, cnt, i
    cdef double target, r, v, beta, q, disc, k, m, nxt, n_est
    cdef long long n
    if (pre + 0.0) * factor > budget:
        return 0
    row = t.cfg + c * NCOL
    off = <Py_ssize_t>row[PIECE_OFF]
    cnt = <Py_ssize_t>row[PIECE_CNT]
    first = t.pieces + off * PCOL
    target = cp + ((budget / factor - pre) / ds - row[LOOP_FIRST])  # an estimate: _fixup makes it exact
    i = _bisect(first + P_CUM, cnt, target)
    if i < 0:
        i = 0
    p = first + i * PCOL
    r = target - p[P_CUM]
    if r < 0.0:
        r = 0.0
    v = p[P_VALUE]
    beta = p[P_SLOPE]
    if beta == 0.0:
        k = r / v
    else:
        q = v - 0.5 * beta
        disc = sqrt(q * q + 2.0 * beta * r)
        k = (disc - q) / beta if q < 0.0 else 2.0 * r / (q + disc)
    if not k < 1e18:
        k = 1e18
    m = p[P_START] + floor(k)
    if i + 1 < cnt:
        nxt = first[(i + 1) * PCOL + P_START]
        if m > nxt:
            m = nxt
    n_est = m - prompt + 1.0
    if not n_est >= 1.0:
        n = 1
    elif n_est >= TOKEN_MAX:
        n = TOKEN_MAX
    else:
        n = <long long>n_est
    return _fixup(t, c, prompt, budget, factor, n, pre, cp, i, ds)


cdef double c_quantile_factor(const Tables* t, Py_ssize_t c, double q, int* src) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef Py_ssize_t off = <Py_ssize_t>row[RQ_OFF], cnt = <Py_ssize_t>row[RQ_CNT], j
    if cnt == 0:
        src[0] = F_CLIPPED
        return 1.0
    for j in range(cnt):
        if t.rq[(off + j) * 2] >= q - 1e-12:
            src[0] = F_RESIDUAL
            return t.rq[(off + j) * 2 + 1]
    src[0] = F_CLIPPED
    return t.rq[(off + cnt - 1) * 2 + 1]


cdef double c_alpha_factor(const Tables* t, Py_ssize_t c, double alpha, int* src) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef Py_ssize_t off = <Py_ssize_t>row[CONF_OFF], cnt = <Py_ssize_t>row[CONF_CNT], j, best = -1
    for j in range(cnt):
        if t.conf[(off + j) * 2] <= alpha:
            best = j
    if best >= 0:
        src[0] = F_CONFORMAL
        return t.conf[(off + best) * 2 + 1]
    return c_quantile_factor(t, c, 1.0 - alpha, src)


cdef bint c_extrapolated(const Tables* t, Py_ssize_t c, double prompt, double n) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    if prompt < row[PRE_LO] or prompt > row[PRE_HI]:
        return True
    return n >= 2.0 and (prompt < row[PAST_LO] or prompt + n - 2.0 > row[PAST_HI])


cdef int c_decide(const Tables* t, Py_ssize_t c, double prompt, double budget, long long req, double alpha,
                  long long* n_out, double* pred_out) noexcept nogil:
    cdef int fsrc = F_NONE
    cdef double factor = 1.0
    if alpha > 0.0:
        factor = c_alpha_factor(t, c, alpha, &fsrc)
    return _decide_f(t, c, prompt, budget, req, factor, fsrc, n_out, pred_out, 1.0, 1.0)


cdef inline int _decide_f(const Tables* t, Py_ssize_t c, double prompt, double budget, long long req,
                          double factor, int fsrc, long long* n_out, double* pred_out,
                          double ps, double ds) noexcept nogil:
    cdef int status
    cdef double pred, pre, cp
    cdef long long need, n
    need = req if req > 0 else 1
    pre = c_prefill(t, c, prompt) * ps
    cp = c_cumsum(t, c, prompt)
    pred = _total_at(t, c, prompt, <double>need, factor, pre, cp, -1, ds)
    if req > 0 and pred <= budget:
        n = req
        status = 0
    else:
        n = _nfit_at(t, c, prompt, budget, factor, pre, cp, ds)
        status = 0 if n >= need else (1 if n >= 1 else 2)
    n_out[0] = n
    pred_out[0] = pred
    return (status * 16 + (8 if t.cfg[c * NCOL + FACTORISED] != 0.0 else 0)
            + (4 if c_extrapolated(t, c, prompt, <double>(n if n > need else need)) else 0) + fsrc)


# ------------------------------------------------------------------------------ argument conversion

cdef inline int _to_ll(object o, long long* out) except -2:
    """1 and *out set when o is an integer that fits in 64 bits; 0 otherwise (never raises)."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_CheckExact(o):
        o = _as_int(o)
        if o is None:
            return 0
    v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow:
        return 0
    out[0] = v
    return 1


cdef inline int _to_real(object o, double* out) except -2:
    cdef int overflow = 0
    cdef long long v
    if PyFloat_CheckExact(o):
        out[0] = PyFloat_AS_DOUBLE(o)
        return 1
    if PyLong_CheckExact(o):
        v = PyLong_AsLongLongAndOverflow(o, &overflow)
        if not overflow:
            out[0] = <double>v
            return 1
    r = _as_real(o)
    if r is None:
        return 0
    out[0] = <double>r
    return 1


# ------------------------------------------------------------------------------ Python objects

@cython.freelist(256)
cdef class Decision:
    """An admission decision: admit, max_new_tokens that fit, predicted total ms, reason.

    Behaves like the reference's NamedTuple (iterable, indexable, comparable to tuples)."""

    cdef readonly bint admit
    cdef readonly long long max_new_tokens
    cdef readonly double predicted_ms
    cdef readonly object reason
    cdef readonly int code  # the decision code (REASONS); -1 for a Decision not made by a kernel

    _fields = ("admit", "max_new_tokens", "predicted_ms", "reason")

    def __init__(self, admit, max_new_tokens, predicted_ms, reason):
        self.admit = admit
        self.max_new_tokens = max_new_tokens
        self.predicted_ms = predicted_ms
        self.reason = reason
        self.code = _CODE_OF_REASON.get(reason, -1)

    @property
    def judged(self):
        """True when the model judged the request (fields valid, config known), extrapolated or not."""
        return 0 <= self.code < CODE_BAD

    @property
    def extrapolated(self):
        """True when the request leaves the measured range (the model extrapolates)."""
        return 0 <= self.code < CODE_BAD and (self.code & EXTRAPOLATED_BIT) != 0

    def _astuple(self):
        return (self.admit, self.max_new_tokens, self.predicted_ms, self.reason)

    def _asdict(self):
        return dict(zip(self._fields, self._astuple()))

    def __iter__(self):
        return iter(self._astuple())

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self._astuple()[i]

    def __eq__(self, other):
        if isinstance(other, (Decision, tuple)):
            return self._astuple() == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash(self._astuple())

    def __reduce__(self):
        return (Decision, self._astuple())

    def __repr__(self):
        return (f"Decision(admit={bool(self.admit)!r}, max_new_tokens={self.max_new_tokens!r}, "
                f"predicted_ms={self.predicted_ms!r}, reason={self.reason!r})")


cdef inline int _parse_request(object budget_ms, object vision_tokens, object text_tokens, object max_new_tokens,
                               object tier_idx, object top_k, object num_active_blocks, double* budget,
                               long long* prompt, long long* req, long long* ti, long long* tk,
                               long long* bl) except -2:
    """The request fields every admission entry point checks: -1 when all are valid, else the CODE_BAD code."""
    cdef long long vt = 0, tt = 0
    if not _to_real(budget_ms, budget) or not (0.0 <= budget[0] < INFINITY):
        return CODE_BAD + 0
    if not _to_ll(vision_tokens, &vt) or not (0 <= vt <= TOKEN_MAX):
        return CODE_BAD + 1
    if not _to_ll(text_tokens, &tt) or not (0 <= tt <= TOKEN_MAX):
        return CODE_BAD + 2
    if max_new_tokens is not None:
        if not _to_ll(max_new_tokens, req) or not (1 <= req[0] <= TOKEN_MAX):
            return CODE_BAD + 3
    if not _to_ll(tier_idx, ti) or not (0 <= ti[0] <= TOKEN_MAX):
        return CODE_BAD + 4
    if not _to_ll(top_k, tk) or not (0 <= tk[0] <= TOKEN_MAX):
        return CODE_BAD + 5
    if num_active_blocks is not None:
        if not _to_ll(num_active_blocks, bl) or not (0 <= bl[0] <= TOKEN_MAX):
            return CODE_BAD + 6
    prompt[0] = vt + tt
    return -1


cdef inline Decision _decision(int code, long long n, double pred):
    cdef Decision d = Decision.__new__(Decision)
    d.admit = code < 16
    d.max_new_tokens = n
    d.predicted_ms = pred
    d.reason = _REASONS[code]
    d.code = code
    return d


cdef class Tally:
    """Per-config decision counts of a serving loop, updated by Kernel.admit_tallied in the same
    call as the decision: plain C increments while the GIL is held, atomic for Python threads, so
    a controller needs no lock of its own on its hot path. streak = rejections since the last admit."""

    cdef readonly long long decisions, admits, rejects, probes, streak

    cdef inline void _count(self, bint admitted, bint probe) noexcept:
        self.decisions += 1
        if admitted:
            self.admits += 1
            self.streak = 0
            if probe:
                self.probes += 1
        else:
            self.rejects += 1
            self.streak += 1

    def count(self, admitted, probe):
        self._count(admitted, probe)

    def reset_streak(self):
        self.streak = 0


cdef class Kernel:
    """Holds one Estimator's tables (read-only copies) and evaluates them."""

    cdef Tables t
    cdef object _arrays

    def __init__(self, tables):
        cdef const double[:, ::1] cfg = np.ascontiguousarray(tables["cfg"], dtype=np.float64).reshape(-1, NCOL)
        cdef const double[:, ::1] pieces = np.ascontiguousarray(tables["pieces"], dtype=np.float64).reshape(-1, PCOL)
        cdef const double[:, ::1] conf = np.ascontiguousarray(tables["conf"], dtype=np.float64).reshape(-1, 2)
        cdef const double[:, ::1] rq = np.ascontiguousarray(tables["rq"], dtype=np.float64).reshape(-1, 2)
        cdef const long long[::1] tier_map = np.ascontiguousarray(tables["tier_map"], dtype=np.int64)
        cdef const long long[::1] topk_map = np.ascontiguousarray(tables["topk_map"], dtype=np.int64)
        cdef const long long[::1] blocks_map = np.ascontiguousarray(tables["blocks_map"], dtype=np.int64)
        lut_arr = np.ascontiguousarray(tables["lut"], dtype=np.int64)
        if lut_arr.ndim != 3:
            raise ValueError("lut must be 3-D [n_tier, n_topk, n_blocks + 1]")
        cdef const long long[:, :, ::1] lut = lut_arr
        self._arrays = (cfg, pieces, conf, rq, tier_map, topk_map, blocks_map, lut)  # keep buffers alive
        self.t.cfg = &cfg[0, 0] if cfg.shape[0] else NULL
        self.t.pieces = &pieces[0, 0] if pieces.shape[0] else NULL
        self.t.conf = &conf[0, 0] if conf.shape[0] else NULL
        self.t.rq = &rq[0, 0] if rq.shape[0] else NULL
        self.t.tier_map = &tier_map[0] if tier_map.shape[0] else NULL
        self.t.topk_map = &topk_map[0] if topk_map.shape[0] else NULL
        self.t.blocks_map = &blocks_map[0] if blocks_map.shape[0] else NULL
        self.t.lut = &lut[0, 0, 0] if lut.shape[0] and lut.shape[1] and lut.shape[2] else NULL
        self.t.n_cfg = cfg.shape[0]
        self.t.n_tier_map = tier_map.shape[0] if lut.shape[0] else 0
        self.t.n_topk_map = topk_map.shape[0]
        self.t.n_blocks_map = blocks_map.shape[0]
        self.t.lut_k = lut.shape[1]
        self.t.lut_b = lut.shape[2]

    cdef Py_ssize_t _row(self, Py_ssize_t c) except -1:
        if c < 0 or c >= self.t.n_cfg:
            raise IndexError(f"config row {c} out of range")
        return c

    # -------------------------------------------------------------- scalar entry points
    def lookup(self, long long tier_idx, long long top_k, long long num_active_blocks):
        return c_lookup(&self.t, tier_idx, top_k, num_active_blocks)

    def step(self, Py_ssize_t c, double past_len):
        return c_step(&self.t, self._row(c), past_len)

    def cumsum(self, Py_ssize_t c, double m):
        return c_cumsum(&self.t, self._row(c), m)

    def prefill(self, Py_ssize_t c, double prompt):
        return c_prefill(&self.t, self._row(c), prompt)

    def decode_sum(self, Py_ssize_t c, double prompt, double n):
        return _decode_sum(&self.t, self._row(c), prompt, n)

    def total(self, Py_ssize_t c, double prompt, double n, double factor):
        return c_total(&self.t, self._row(c), prompt, n, factor)

    def predict(self, Py_ssize_t c, double prompt, double n, double factor):
        self._row(c)
        cdef double pre = c_prefill(&self.t, c, prompt)
        cdef double dec = _decode_sum(&self.t, c, prompt, n)
        return pre * factor, dec * factor, (pre + dec) * factor

    def nfit(self, Py_ssize_t c, double prompt, double budget, double factor):
        return c_nfit(&self.t, self._row(c), prompt, budget, factor)

    def alpha_factor(self, Py_ssize_t c, double alpha):
        cdef int src = F_NONE
        cdef double f = c_alpha_factor(&self.t, self._row(c), alpha, &src)
        return f, src

    def quantile_factor(self, Py_ssize_t c, double q):
        cdef int src = F_NONE
        cdef double f = c_quantile_factor(&self.t, self._row(c), q, &src)
        return f, src

    def factorised(self, Py_ssize_t c):
        return self.t.cfg[self._row(c) * NCOL + FACTORISED] != 0.0

    def extrapolated(self, Py_ssize_t c, double prompt, double n):
        return c_extrapolated(&self.t, self._row(c), prompt, n)

    def nfit_scaled(self, Py_ssize_t c, double prompt, double budget, double prefill_scale, double decode_scale,
                    double factor):
        self._row(c)
        return _nfit_at(&self.t, c, prompt, budget, factor, c_prefill(&self.t, c, prompt) * prefill_scale,
                        c_cumsum(&self.t, c, prompt), decode_scale)

    def total_scaled(self, Py_ssize_t c, double prompt, double n, double prefill_scale, double decode_scale,
                     double factor):
        self._row(c)
        return _total_at(&self.t, c, prompt, n, factor, c_prefill(&self.t, c, prompt) * prefill_scale,
                         c_cumsum(&self.t, c, prompt), -1, decode_scale)

    def decide(self, Py_ssize_t c, double prompt, double budget, long long req, double alpha):
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = c_decide(&self.t, self._row(c), prompt, budget, req, alpha, &n, &pred)
        return code, n, pred

    cdef int _admit_code(self, object budget_ms, object vision_tokens, object text_tokens, object max_new_tokens,
                         object tier_idx, object top_k, object num_active_blocks, object alpha,
                         long long* n, double* pred) except -1:
        cdef double budget = 0.0, a = -1.0
        cdef long long prompt = 0, req = -1, ti = 0, tk = 0, bl = -1, c
        cdef int code = _parse_request(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                       num_active_blocks, &budget, &prompt, &req, &ti, &tk, &bl)
        if code >= 0:
            return code
        if alpha is not None:
            if not _to_real(alpha, &a) or not (0.0 < a < 1.0):
                return CODE_BAD + 7
        if prompt == 0:
            return CODE_EMPTY_PROMPT
        c = c_lookup(&self.t, ti, tk, bl)
        if c < 0:
            return CODE_UNKNOWN_CONFIG
        return c_decide(&self.t, c, <double>prompt, budget, req, a, n, pred)

    def admit(self, budget_ms, vision_tokens, text_tokens, max_new_tokens=None, tier_idx=0, top_k=1,
              num_active_blocks=None, alpha=None):
        """Decision(admit, max_new_tokens, predicted_ms, reason); never raises for bad fields."""
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._admit_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                         num_active_blocks, alpha, &n, &pred)
        return _decision(code, n, pred)

    cdef int _scaled_code(self, object budget_ms, object vision_tokens, object text_tokens,
                          object max_new_tokens, object tier_idx, object top_k, object num_active_blocks,
                          object prefill_scale, object decode_scale, object factor,
                          long long* n, double* pred) except -1:
        cdef double budget = 0.0, ps = 0.0, ds = 0.0, f = 0.0
        cdef long long prompt = 0, req = -1, ti = 0, tk = 0, bl = -1, c
        cdef int code = _parse_request(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                       num_active_blocks, &budget, &prompt, &req, &ti, &tk, &bl)
        if code >= 0:
            return code
        if (not _to_real(prefill_scale, &ps) or not (0.0 < ps < INFINITY)
                or not _to_real(decode_scale, &ds) or not (0.0 < ds < INFINITY)
                or not _to_real(factor, &f) or not (0.0 < f < INFINITY)):
            return CODE_BAD_SCALE
        if prompt == 0:
            return CODE_EMPTY_PROMPT
        c = c_lookup(&self.t, ti, tk, bl)
        if c < 0:
            return CODE_UNKNOWN_CONFIG
        return _decide_f(&self.t, c, <double>prompt, budget, req, f, F_NONE, n, pred, ps, ds)

    def admit_scaled(self, budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                     num_active_blocks, prefill_scale, decode_scale, factor):
        """admit() on total_scaled(n) = (prefill_scale * prefill + decode_scale * decode_sum(n)) * factor;
        never raises; Decision.code / .extrapolated / .judged say how it was judged."""
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._scaled_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                          num_active_blocks, prefill_scale, decode_scale, factor, &n, &pred)
        return _decision(code, n, pred)

    def admit_tallied(self, Tally tally not None, bint probe, budget_ms, vision_tokens, text_tokens, max_new_tokens,
                      tier_idx, top_k, num_active_blocks, prefill_scale, decode_scale, factor):
        """admit_scaled, counted into ``tally`` when judged inside the measured range (a decision
        that is neither refused nor extrapolated; those are the caller's to count)."""
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._scaled_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                          num_active_blocks, prefill_scale, decode_scale, factor, &n, &pred)
        if code < CODE_BAD and (code & EXTRAPOLATED_BIT) == 0:
            tally._count(code < 16, probe)
        return _decision(code, n, pred)

    def admit_scaled_code(self, budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                          num_active_blocks, prefill_scale, decode_scale, factor):
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._scaled_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                          num_active_blocks, prefill_scale, decode_scale, factor, &n, &pred)
        return code, n, pred

    def admit_code(self, budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                   num_active_blocks, alpha):
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._admit_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                         num_active_blocks, alpha, &n, &pred)
        return code, n, pred

    # -------------------------------------------------------------- batch entry points
    def admit_batch(self, const double[::1] budget_ms, const long long[::1] vision_tokens,
                    const long long[::1] text_tokens, const long long[::1] max_new_tokens,
                    const long long[::1] tier_idx, const long long[::1] top_k,
                    const long long[::1] num_active_blocks, double alpha=-1.0):
        """Arrays in (-1 = None for max_new_tokens / num_active_blocks; alpha <= 0 = none)
        -> (admit bool, max_new_tokens int64, predicted_ms float64, code int64)."""
        cdef Py_ssize_t size = budget_ms.shape[0], i
        if not (vision_tokens.shape[0] == text_tokens.shape[0] == max_new_tokens.shape[0] == tier_idx.shape[0]
                == top_k.shape[0] == num_active_blocks.shape[0] == size):
            raise ValueError("admit_batch: all arrays must have the same length")
        ok_arr = np.zeros(size, dtype=np.uint8)
        n_arr = np.zeros(size, dtype=np.int64)
        pred_arr = np.full(size, np.nan)
        code_arr = np.zeros(size, dtype=np.int64)
        cdef unsigned char[::1] ok = ok_arr
        cdef long long[::1] nout = n_arr
        cdef double[::1] pred = pred_arr
        cdef long long[::1] code = code_arr
        cdef bint bad_alpha = isnan(alpha) or alpha >= 1.0
        cdef double b
        cdef long long vt, tt, req, ti, tk, bl, c, n
        cdef double p
        cdef int cd
        # One alpha for the whole batch: its factor per config is computed once, not per request.
        factor_arr = np.ones(max(self.t.n_cfg, 1))
        src_arr = np.zeros(max(self.t.n_cfg, 1), dtype=np.intc)
        cdef double[::1] factor = factor_arr
        cdef int[::1] fsrc = src_arr
        if alpha > 0.0 and not bad_alpha:
            for i in range(self.t.n_cfg):
                factor[i] = c_alpha_factor(&self.t, i, alpha, &fsrc[i])
        with nogil:
            for i in range(size):
                b = budget_ms[i]
                vt = vision_tokens[i]
                tt = text_tokens[i]
                req = max_new_tokens[i]
                ti = tier_idx[i]
                tk = top_k[i]
                bl = num_active_blocks[i]
                if not (0.0 <= b < INFINITY):
                    code[i] = CODE_BAD + 0
                elif not (0 <= vt <= TOKEN_MAX):
                    code[i] = CODE_BAD + 1
                elif not (0 <= tt <= TOKEN_MAX):
                    code[i] = CODE_BAD + 2
                elif not (req == -1 or 1 <= req <= TOKEN_MAX):
                    code[i] = CODE_BAD + 3
                elif not (0 <= ti <= TOKEN_MAX):
                    code[i] = CODE_BAD + 4
                elif not (0 <= tk <= TOKEN_MAX):
                    code[i] = CODE_BAD + 5
                elif not (bl == -1 or 0 <= bl <= TOKEN_MAX):
                    code[i] = CODE_BAD + 6
                elif bad_alpha:
                    code[i] = CODE_BAD + 7
                elif vt + tt == 0:
                    code[i] = CODE_EMPTY_PROMPT
                else:
                    c = c_lookup(&self.t, ti, tk, bl)
                    if c < 0:
                        code[i] = CODE_UNKNOWN_CONFIG
                    else:
                        n = 0
                        p = NAN
                        cd = _decide_f(&self.t, c, <double>(vt + tt), b, req, factor[c], fsrc[c], &n, &p, 1.0, 1.0)
                        code[i] = cd
                        nout[i] = n
                        pred[i] = p
                        ok[i] = cd < 16
        return ok_arr.view(np.bool_), n_arr, pred_arr, code_arr

    def predict_batch(self, const long long[::1] vision_tokens, const long long[::1] text_tokens,
                      const long long[::1] output_tokens, const long long[::1] tier_idx,
                      const long long[::1] top_k, const long long[::1] num_active_blocks, double quantile=-1.0):
        """-> (prefill_ms, decode_ms, total_ms, flags); flags bit 0 extrapolated, 1 factorised,
        2 quantile beyond stored, 3 invalid (NaN results)."""
        cdef Py_ssize_t size = vision_tokens.shape[0], i
        if not (text_tokens.shape[0] == output_tokens.shape[0] == tier_idx.shape[0] == top_k.shape[0]
                == num_active_blocks.shape[0] == size):
            raise ValueError("predict_batch: all arrays must have the same length")
        pre_arr = np.full(size, np.nan)
        dec_arr = np.full(size, np.nan)
        tot_arr = np.full(size, np.nan)
        flags_arr = np.zeros(size, dtype=np.int64)
        cdef double[::1] pre_v = pre_arr
        cdef double[::1] dec_v = dec_arr
        cdef double[::1] tot_v = tot_arr
        cdef long long[::1] flags = flags_arr
        cdef long long vt, tt, n, ti, tk, bl, c
        cdef double f, prompt, pre, dec
        cdef int fsrc
        with nogil:
            for i in range(size):
                vt = vision_tokens[i]
                tt = text_tokens[i]
                n = output_tokens[i]
                ti = tier_idx[i]
                tk = top_k[i]
                bl = num_active_blocks[i]
                if (not (0 <= vt <= TOKEN_MAX) or not (0 <= tt <= TOKEN_MAX) or vt + tt == 0
                        or not (1 <= n <= TOKEN_MAX) or not (0 <= ti <= TOKEN_MAX) or not (0 <= tk <= TOKEN_MAX)
                        or bl < -1 or bl > TOKEN_MAX):
                    flags[i] = 8
                    continue
                c = c_lookup(&self.t, ti, tk, bl)
                if c < 0:
                    flags[i] = 8
                    continue
                fsrc = F_NONE
                f = 1.0
                if quantile > 0.0:
                    f = c_quantile_factor(&self.t, c, quantile, &fsrc)
                prompt = <double>(vt + tt)
                pre = c_prefill(&self.t, c, prompt)
                dec = _decode_sum(&self.t, c, prompt, <double>n)
                pre_v[i] = pre * f
                dec_v[i] = dec * f
                tot_v[i] = (pre + dec) * f
                flags[i] = ((1 if c_extrapolated(&self.t, c, prompt, <double>n) else 0)
                            | (2 if self.t.cfg[c * NCOL + FACTORISED] != 0.0 else 0)
                            | (4 if fsrc == F_CLIPPED else 0))
        return pre_arr, dec_arr, tot_arr, flags_arr


# ------------------------------------------------------------------------------ serving-loop gate

cdef enum:
    MAX_EDGES = 64  # length-bucket edges a Gate holds


cdef class Traffic:
    """A bounded ring of recent decisions (budget_ms, prompt, max_new_tokens, bucket) of one config;
    push is C under the GIL (atomic for Python threads), snapshot copies it in one call."""

    cdef double* budget
    cdef long long* prompt
    cdef long long* n
    cdef long long* bucket
    cdef Py_ssize_t capacity, head, size

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.head = 0
        self.size = 0
        self.budget = <double*>malloc(capacity * sizeof(double))
        self.prompt = <long long*>malloc(capacity * sizeof(long long))
        self.n = <long long*>malloc(capacity * sizeof(long long))
        self.bucket = <long long*>malloc(capacity * sizeof(long long))
        if not (self.budget and self.prompt and self.n and self.bucket):
            raise MemoryError()

    def __dealloc__(self):
        free(self.budget)
        free(self.prompt)
        free(self.n)
        free(self.bucket)

    cdef inline void _push(self, double budget, long long prompt, long long n, long long bucket) noexcept:
        cdef Py_ssize_t i = self.head
        self.budget[i] = budget
        self.prompt[i] = prompt
        self.n[i] = n
        self.bucket[i] = bucket
        self.head = i + 1 if i + 1 < self.capacity else 0
        if self.size < self.capacity:
            self.size += 1

    def push(self, double budget, long long prompt, long long n, long long bucket):
        self._push(budget, prompt, n, bucket)

    def snapshot(self):
        """[(budget_ms, prompt, max_new_tokens, bucket)], oldest first."""
        cdef Py_ssize_t j, i
        out = []
        for j in range(self.size):
            i = (self.head - self.size + j) % self.capacity
            if i < 0:
                i += self.capacity
            out.append((self.budget[i], self.prompt[i], self.n[i], self.bucket[i]))
        return out

    def __len__(self):
        return self.size


cdef class Gate:
    """One config's published admission state, decided in one compiled call.

    decide(request) takes the controller's Request tuple (vision, text, max_new, tier, top_k,
    blocks, budget) and, when every field is a plain int / float within range and the request is
    judged inside the measured range, returns the Decision of the scaled model
    (prefill_scale[bucket] * prefill + decode_scale[bucket] * decode_sum) * factor, pushing the
    request onto the traffic ring and counting it into the tally. Anything else returns None: the
    caller's checked path handles it (and counts it). The gate is immutable: a new state is a new Gate."""

    cdef Kernel kernel
    cdef Py_ssize_t row
    cdef long long edges[MAX_EDGES]
    cdef double ps[MAX_EDGES + 1]
    cdef double ds[MAX_EDGES + 1]
    cdef Py_ssize_t n_edges
    cdef double factor
    cdef bint online
    cdef long long probe_after, max_tokens
    cdef readonly Tally tally
    cdef readonly Traffic traffic

    def __init__(self, Kernel kernel not None, Py_ssize_t row, edges, scales, double factor, bint online,
                 long long probe_after, long long max_tokens, Tally tally not None, Traffic traffic not None):
        cdef Py_ssize_t i
        edges = tuple(edges)
        scales = tuple(scales)
        if len(edges) > MAX_EDGES or len(scales) != len(edges) + 1:
            raise ValueError(f"need <= {MAX_EDGES} edges and len(edges) + 1 scales")
        if not 0 <= row < kernel.t.n_cfg:
            raise IndexError(f"config row {row} out of range")
        if not (isfinite(factor) and factor > 0.0):
            raise ValueError("factor must be finite > 0")
        self.kernel = kernel
        self.row = row
        self.n_edges = len(edges)
        for i in range(self.n_edges):
            self.edges[i] = edges[i]
        for i in range(self.n_edges + 1):
            self.ps[i] = scales[i][0]
            self.ds[i] = scales[i][1]
            if not (isfinite(self.ps[i]) and self.ps[i] > 0.0 and isfinite(self.ds[i]) and self.ds[i] > 0.0):
                raise ValueError("scales must be finite > 0")
        self.factor = factor
        self.online = online
        self.probe_after = probe_after
        self.max_tokens = max_tokens
        self.tally = tally
        self.traffic = traffic

    def decide(self, request):
        cdef long long f[6]
        cdef int overflow = 0, code
        cdef Py_ssize_t i, bucket
        cdef object o
        cdef double budget, factor, pred = NAN
        cdef long long prompt, nout = 0
        cdef bint probe = False
        if not PyTuple_Check(request) or PyTuple_GET_SIZE(request) != 7:
            return None
        for i in range(6):
            o = <object>PyTuple_GET_ITEM(request, i)
            if i == 5 and o is None:
                f[5] = 0
                continue
            if not PyLong_CheckExact(o):
                return None
            f[i] = PyLong_AsLongLongAndOverflow(o, &overflow)
            if overflow or not (0 <= f[i] <= self.max_tokens):
                return None
        o = <object>PyTuple_GET_ITEM(request, 6)
        if not PyFloat_CheckExact(o):
            return None
        budget = PyFloat_AS_DOUBLE(o)
        if not (budget > 0.0 and budget < INFINITY) or f[2] < 1:
            return None
        prompt = f[0] + f[1]
        if prompt == 0:
            return None
        bucket = 0
        for i in range(self.n_edges):
            bucket += self.edges[i] <= prompt + f[2]
        factor = self.factor
        if self.online and self.tally.streak >= self.probe_after:
            factor = 1.0  # starving: probe with the corrected median (see AdmissionController)
            probe = True
        code = _decide_f(&self.kernel.t, self.row, <double>prompt, budget, f[2], factor, F_NONE, &nout, &pred,
                         self.ps[bucket], self.ds[bucket])
        if code & EXTRAPOLATED_BIT:
            return None
        self.traffic._push(budget, prompt, f[2], bucket)
        self.tally._count(code < 16, probe)
        return _decision(code, nout, pred)
