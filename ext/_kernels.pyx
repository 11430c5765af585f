# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled evaluation kernels: the Python-facing Kernel over the math core of ext/_kernels.pxd.

The arithmetic (lookup, T(L), decode sums, inverse, prefill, factors) is the pxd's inline C; this
module adds the Decision type, the request-field parsing and the entry points (admit, admit_scaled,
choose, admit_batch, predict_batch). Only non-int/non-float request fields (numpy scalars, bools,
junk) take a slow path through ext/layout.py's converters, so the compiled kernels and the
pure-Python reference accept and reject exactly the same values. Constants come from ext/layout.py
(compiled in through the generated _layout.pxi; the Python names below come from the same module).
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.pycapsule cimport PyCapsule_New
from libc.math cimport INFINITY, NAN, isnan

# The math core (Tables, column / code enums, inline C functions) is this module's own .pxd, ext/_kernels.pxd:
# Cython reads it with this file, so it needs no cimport here.

import numpy as np

from trt_latency.ext import layout

IMPLEMENTATION = "cython"
# Capsule names: what Kernel.tables_capsule() and DECISION_CAPSULE (below) are called.
cdef const char* _TABLES_NAME = b"trt_latency.ext._kernels.Tables"
cdef const char* _DECISION_NAME = b"trt_latency.ext._kernels.decision"
TABLES_CAPSULE = <bytes>_TABLES_NAME
DECISION_CAPSULE_NAME = <bytes>_DECISION_NAME

cdef tuple _REASONS = layout.REASONS
cdef object _as_int = layout.as_int
cdef object _as_real = layout.as_real
cdef object _as_candidates = layout.as_candidates
cdef dict _CODE_OF_REASON = layout.CODE_OF_REASON


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
    cdef readonly object config  # choose: the candidate config decided on (None from admit)

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


cdef inline double _vision_of(object vision_tokens):
    """The vision token count of a request whose fields _parse_request accepted."""
    cdef long long vt = 0
    _to_ll(vision_tokens, &vt)
    return <double>vt


cdef inline int _images_field(object images, long long* im) except -1:
    """A request's images into ``im``: None = 1, else an integer in [1, TOKEN_MAX]; 0 for a bad value (the
    reference's _images_field)."""
    im[0] = 1
    if images is None:
        return 1
    return 1 if _to_ll(images, im) and 1 <= im[0] <= TOKEN_MAX else 0


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


cdef inline int _candidate_row(const Tables* t, object cand, long long* row) except -2:
    """1 and *row set when cand is a (tier_idx, top_k, num_active_blocks) of fields admit accepts that
    names a known config; 0 otherwise (never raises)."""
    cdef long long ti = 0, tk = 0, bl = -1
    if PyTuple_Check(cand) and PyTuple_GET_SIZE(cand) == 3:
        o0, o1, o2 = <object>PyTuple_GET_ITEM(cand, 0), <object>PyTuple_GET_ITEM(cand, 1), <object>PyTuple_GET_ITEM(cand, 2)
    else:
        try:
            o0, o1, o2 = cand
        except Exception:  # noqa: BLE001 - not a 3-sequence
            return 0
    if not _to_ll(o0, &ti) or not (0 <= ti <= TOKEN_MAX) or not _to_ll(o1, &tk) or not (0 <= tk <= TOKEN_MAX):
        return 0
    if o2 is not None and (not _to_ll(o2, &bl) or not (0 <= bl <= TOKEN_MAX)):
        return 0
    row[0] = c_lookup(t, ti, tk, bl)
    return row[0] >= 0


cdef inline Decision _decision(int code, long long n, double pred):
    cdef Decision d = Decision.__new__(Decision)
    d.admit = code < ADMIT_BELOW
    d.max_new_tokens = n
    d.predicted_ms = pred
    d.reason = _REASONS[code]
    d.code = code
    return d


cdef object _make_decision(int code, long long n, double pred):
    return _decision(code, n, pred)


DECISION_CAPSULE = PyCapsule_New(<void*>_make_decision, _DECISION_NAME, NULL)


cdef class Kernel:
    """Holds one Estimator's tables (read-only copies) and evaluates them."""

    cdef Tables t
    cdef object _arrays
    cdef public tuple preference  # choose's candidates when none are given (Estimator sets it)

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
        self.preference = ()
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
        return c_decode_sum(&self.t, self._row(c), prompt, n)

    def total(self, Py_ssize_t c, double prompt, double n, double factor):
        return c_total(&self.t, self._row(c), prompt, n, factor)

    def predict(self, Py_ssize_t c, double prompt, double n, double factor):
        self._row(c)
        cdef double pre = c_prefill(&self.t, c, prompt)
        cdef double dec = c_decode_sum(&self.t, c, prompt, n)
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

    def extrapolated(self, Py_ssize_t c, double prompt, double n, double vision=0.0, double images=1.0):
        return c_extrapolated(&self.t, self._row(c), prompt, n, vision, images)

    def vision(self, Py_ssize_t c, double vision, double prompt, double images=1.0):
        """The encoder + embedding ms of a request with `vision` tokens over `images` images (the tables' term)."""
        return c_vision(&self.t, self._row(c), vision, prompt, images)

    def nfit_scaled(self, Py_ssize_t c, double prompt, double budget, double prefill_scale, double decode_scale,
                    double factor):
        self._row(c)
        return c_nfit_at(&self.t, c, prompt, budget, factor, c_prefill(&self.t, c, prompt) * prefill_scale,
                        c_cumsum(&self.t, c, prompt), decode_scale)

    def _fixup_from(self, Py_ssize_t c, double prompt, double budget, double factor, long long n_start,
                    double prefill_scale=1.0, double decode_scale=1.0):
        """Test seam: nfit_scaled's fix-up search started from n_start (1 .. TOKEN_MAX, total(1) <= budget)
        instead of the closed-form estimate, so the search is tested from a wrong estimate."""
        self._row(c)
        if not 1 <= n_start <= TOKEN_MAX:
            raise ValueError("n_start must be in [1, TOKEN_MAX]")
        return _fixup(&self.t, c, prompt, budget, factor, n_start, c_prefill(&self.t, c, prompt) * prefill_scale,
                      c_cumsum(&self.t, c, prompt), -1, decode_scale)

    def total_scaled(self, Py_ssize_t c, double prompt, double n, double prefill_scale, double decode_scale,
                     double factor):
        self._row(c)
        return c_total_at(&self.t, c, prompt, n, factor, c_prefill(&self.t, c, prompt) * prefill_scale,
                         c_cumsum(&self.t, c, prompt), -1, decode_scale)

    def decide(self, Py_ssize_t c, double prompt, double budget, long long req, double alpha, double vision=0.0,
               double images=1.0):
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = c_decide(&self.t, self._row(c), prompt, budget, req, alpha, &n, &pred, vision, images)
        return code, n, pred

    cdef int _admit_code(self, object budget_ms, object vision_tokens, object text_tokens, object max_new_tokens,
                         object tier_idx, object top_k, object num_active_blocks, object alpha,
                         long long* n, double* pred, object images=None) except -1:
        cdef double budget = 0.0, a = -1.0
        cdef long long prompt = 0, req = -1, ti = 0, tk = 0, bl = -1, c, im = 1
        cdef int code = _parse_request(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                       num_active_blocks, &budget, &prompt, &req, &ti, &tk, &bl)
        if code >= 0:
            return code
        if alpha is not None:
            if not _to_real(alpha, &a) or not (0.0 < a < 1.0):
                return CODE_BAD + 7
        if not _images_field(images, &im):
            return CODE_BAD_IMAGES
        if prompt == 0:
            return CODE_EMPTY_PROMPT
        c = c_lookup(&self.t, ti, tk, bl)
        if c < 0:
            return CODE_UNKNOWN_CONFIG
        return c_decide(&self.t, c, <double>prompt, budget, req, a, n, pred, _vision_of(vision_tokens), <double>im)

    def admit(self, budget_ms, vision_tokens, text_tokens, max_new_tokens=None, tier_idx=0, top_k=1,
              num_active_blocks=None, alpha=None, images=None):
        """Decision(admit, max_new_tokens, predicted_ms, reason); never raises for bad fields. `images`: how
        many images the vision tokens come as (None = 1)."""
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._admit_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                         num_active_blocks, alpha, &n, &pred, images)
        return _decision(code, n, pred)

    cdef int _scaled_code(self, object budget_ms, object vision_tokens, object text_tokens,
                          object max_new_tokens, object tier_idx, object top_k, object num_active_blocks,
                          object prefill_scale, object decode_scale, object factor,
                          long long* n, double* pred, object images=None) except -1:
        cdef double budget = 0.0, ps = 0.0, ds = 0.0, f = 0.0
        cdef long long prompt = 0, req = -1, ti = 0, tk = 0, bl = -1, c, im = 1
        cdef int code = _parse_request(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                       num_active_blocks, &budget, &prompt, &req, &ti, &tk, &bl)
        if code >= 0:
            return code
        if (not _to_real(prefill_scale, &ps) or not (0.0 < ps < INFINITY)
                or not _to_real(decode_scale, &ds) or not (0.0 < ds < INFINITY)
                or not _to_real(factor, &f) or not (0.0 < f < INFINITY)):
            return CODE_BAD_SCALE
        if not _images_field(images, &im):
            return CODE_BAD_IMAGES
        if prompt == 0:
            return CODE_EMPTY_PROMPT
        c = c_lookup(&self.t, ti, tk, bl)
        if c < 0:
            return CODE_UNKNOWN_CONFIG
        return c_decide_scaled(&self.t, c, <double>prompt, budget, req, f, F_NONE, n, pred, ps, ds,
                               _vision_of(vision_tokens), <double>im)

    def admit_scaled(self, budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                     num_active_blocks, prefill_scale, decode_scale, factor, images=None):
        """admit() on total_scaled(n) = (prefill_scale * (prefill + vision) + decode_scale * decode_sum(n)) * factor;
        `images` as in admit. Never raises; Decision.code / .extrapolated / .judged say how it was judged."""
        cdef long long n = 0
        cdef double pred = NAN
        cdef int code = self._scaled_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, tier_idx, top_k,
                                          num_active_blocks, prefill_scale, decode_scale, factor, &n, &pred, images)
        return _decision(code, n, pred)

    cdef int _candidate_code(self, object budget_ms, object vision_tokens, object text_tokens, object max_new_tokens,
                             object cand, object alpha, long long* n, double* pred, object images) except -1:
        """admit's code for one choose candidate; a candidate that is not a 3-tuple is an unknown config."""
        try:
            ti, tk, bl = cand
        except Exception:  # noqa: BLE001
            return CODE_UNKNOWN_CONFIG
        return self._admit_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, ti, tk, bl, alpha, n, pred,
                                images)

    def tables_capsule(self):
        """A capsule holding a pointer to this Kernel's Tables (for serving/_gate.pyx; keep the Kernel alive)."""
        return PyCapsule_New(&self.t, _TABLES_NAME, NULL)

    def choose(self, budget_ms, vision_tokens, text_tokens, max_new_tokens=None, candidates=None, alpha=None,
               images=None):
        """The admit Decision of the first candidate config (tier_idx, top_k, num_active_blocks) that
        admits, in the given order (None: self.preference), with .config = that candidate; when none
        admits, candidate 0's Decision (with .config = candidate 0). No candidates: CODE_NO_CANDIDATE.
        `images` as in admit. Never raises."""
        cdef long long n = 0
        cdef double pred = NAN
        cdef Py_ssize_t chosen = -1
        cdef Decision d
        candidates = self.preference if candidates is None else _as_candidates(candidates)
        d = _decision(self._choose_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, candidates, alpha,
                                        images, &n, &pred, &chosen), n, pred)
        d.config = None if chosen < 0 else candidates[chosen]
        return d

    cdef int _choose_code(self, object budget_ms, object vision_tokens, object text_tokens, object max_new_tokens,
                          object candidates, object alpha, object images, long long* n, double* pred,
                          Py_ssize_t* chosen) except -1:
        """choose's code, max_new_tokens, prediction and candidate index (-1: none). The request fields
        are read once; a candidate after the first costs a lookup and one predicted total."""
        cdef long long n0 = 0, prompt = 0, req = -1, ti = 0, tk = 0, bl = -1, row, im = 1
        cdef double pred0 = NAN, budget = 0.0, a = -1.0
        cdef int code, code0
        cdef Py_ssize_t i, size = len(candidates)
        if size == 0:
            return CODE_NO_CANDIDATE
        chosen[0] = 0
        code0 = self._candidate_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, candidates[0], alpha,
                                     n, pred, images)
        if code0 < ADMIT_BELOW or size == 1:
            return code0
        n0, pred0 = n[0], pred[0]
        # The request's own fields, once (a bad one, or an empty prompt, admits with no candidate).
        if _parse_request(budget_ms, vision_tokens, text_tokens, max_new_tokens, 0, 0, None, &budget, &prompt, &req,
                          &ti, &tk, &bl) >= 0 or prompt == 0:
            return code0
        if alpha is not None and (not _to_real(alpha, &a) or not (0.0 < a < 1.0)):
            return code0
        if not _images_field(images, &im):
            return code0
        for i in range(1, size):
            if not _candidate_row(&self.t, candidates[i], &row):
                continue  # a malformed or unknown candidate does not admit
            if not c_fits(&self.t, row, <double>prompt, budget, req, a, _vision_of(vision_tokens), <double>im):
                continue
            code = self._candidate_code(budget_ms, vision_tokens, text_tokens, max_new_tokens, candidates[i], alpha,
                                        n, pred, images)
            if code < ADMIT_BELOW:
                chosen[0] = i
                return code
        n[0], pred[0] = n0, pred0
        return code0

    # -------------------------------------------------------------- batch entry points
    def admit_batch(self, const double[::1] budget_ms, const long long[::1] vision_tokens,
                    const long long[::1] text_tokens, const long long[::1] max_new_tokens,
                    const long long[::1] tier_idx, const long long[::1] top_k,
                    const long long[::1] num_active_blocks, double alpha=-1.0, const long long[::1] images=None):
        """Arrays in (-1 = None for max_new_tokens / num_active_blocks; alpha <= 0 = none; images None = one
        image per request) -> (admit bool, max_new_tokens int64, predicted_ms float64, code int64)."""
        cdef Py_ssize_t size = budget_ms.shape[0], i
        cdef bint per_images = images is not None
        if not (vision_tokens.shape[0] == text_tokens.shape[0] == max_new_tokens.shape[0] == tier_idx.shape[0]
                == top_k.shape[0] == num_active_blocks.shape[0] == size) or (per_images and images.shape[0] != size):
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
        cdef long long vt, tt, req, ti, tk, bl, c, n, im
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
                im = images[i] if per_images else 1
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
                elif not (1 <= im <= TOKEN_MAX):
                    code[i] = CODE_BAD_IMAGES
                elif vt + tt == 0:
                    code[i] = CODE_EMPTY_PROMPT
                else:
                    c = c_lookup(&self.t, ti, tk, bl)
                    if c < 0:
                        code[i] = CODE_UNKNOWN_CONFIG
                    else:
                        n = 0
                        p = NAN
                        cd = c_decide_scaled(&self.t, c, <double>(vt + tt), b, req, factor[c], fsrc[c], &n, &p, 1.0, 1.0,
                                             <double>vt, <double>im)
                        code[i] = cd
                        nout[i] = n
                        pred[i] = p
                        ok[i] = cd < ADMIT_BELOW
        return ok_arr.view(np.bool_), n_arr, pred_arr, code_arr

    def predict_batch(self, const long long[::1] vision_tokens, const long long[::1] text_tokens,
                      const long long[::1] output_tokens, const long long[::1] tier_idx,
                      const long long[::1] top_k, const long long[::1] num_active_blocks, double quantile=-1.0,
                      const long long[::1] images=None):
        """-> (prefill_ms, decode_ms, total_ms, flags); flags bit 0 extrapolated, 1 factorised,
        2 quantile beyond stored, 3 invalid (NaN results). images None = one image per request."""
        cdef Py_ssize_t size = vision_tokens.shape[0], i
        cdef bint per_images = images is not None
        if not (text_tokens.shape[0] == output_tokens.shape[0] == tier_idx.shape[0] == top_k.shape[0]
                == num_active_blocks.shape[0] == size) or (per_images and images.shape[0] != size):
            raise ValueError("predict_batch: all arrays must have the same length")
        pre_arr = np.full(size, np.nan)
        dec_arr = np.full(size, np.nan)
        tot_arr = np.full(size, np.nan)
        flags_arr = np.zeros(size, dtype=np.int64)
        cdef double[::1] pre_v = pre_arr
        cdef double[::1] dec_v = dec_arr
        cdef double[::1] tot_v = tot_arr
        cdef long long[::1] flags = flags_arr
        cdef long long vt, tt, n, ti, tk, bl, c, im
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
                im = images[i] if per_images else 1
                if (not (0 <= vt <= TOKEN_MAX) or not (0 <= tt <= TOKEN_MAX) or vt + tt == 0
                        or not (1 <= n <= TOKEN_MAX) or not (0 <= ti <= TOKEN_MAX) or not (0 <= tk <= TOKEN_MAX)
                        or bl < -1 or bl > TOKEN_MAX or not (1 <= im <= TOKEN_MAX)):
                    flags[i] = PB_INVALID
                    continue
                c = c_lookup(&self.t, ti, tk, bl)
                if c < 0:
                    flags[i] = PB_INVALID
                    continue
                fsrc = F_NONE
                f = 1.0
                if quantile > 0.0:
                    f = c_quantile_factor(&self.t, c, quantile, &fsrc)
                prompt = <double>(vt + tt)
                pre = c_prefill(&self.t, c, prompt) + c_vision(&self.t, c, <double>vt, prompt, <double>im)
                dec = c_decode_sum(&self.t, c, prompt, <double>n)
                pre_v[i] = pre * f
                dec_v[i] = dec * f
                tot_v[i] = (pre + dec) * f
                flags[i] = ((PB_EXTRAPOLATED if c_extrapolated(&self.t, c, prompt, <double>n, <double>vt, <double>im)
                             else 0)
                            | (PB_FACTORISED if self.t.cfg[c * NCOL + FACTORISED] != 0.0 else 0)
                            | (PB_CLIPPED if fsrc == F_CLIPPED else 0))
        return pre_arr, dec_arr, tot_arr, flags_arr
