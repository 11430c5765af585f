# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batch-aware admission, compiled: serving/batch_reference.py is the readable statement of the same
arithmetic (same order of operations), property-tested equal in tests/test_serving_batch.py.

A decision walks the running batch sorted by tokens left: per segment between two completions, the
closed-form sum of the piecewise-linear step cost over an arithmetic progression of KV reads, once
without the newcomer and once with it (its prefill stalls everyone first). The piece layout and the
bisect over piece starts are the math core's (ext/_kernels.pxd, cimported).
"""

from libc.math cimport ceil
from libc.stdlib cimport free, malloc

from ext._kernels cimport *  # the math core: PCOL / P_* enums, _bisect, TOKEN_MAX

import numpy as np

from trt_latency.serving.batch_reference import BAD_REQUEST, BATCH_REASONS

cdef int BST_FITS = 0, BST_FEWER = 1, BST_NONE = 2, BST_PUSHES = 3
cdef Py_ssize_t STACK = 128


cdef struct BT:
    const double* sizes
    Py_ssize_t n_sizes
    const long long* off
    const double* pieces
    bint packed
    double valid_lo
    double valid_hi
    double pa, pb, pc
    double n_blend


cdef inline double c_segment_sum(const BT* t, Py_ssize_t curve, double x0, double s, double j0,
                                 double j1) noexcept nogil:
    cdef Py_ssize_t off = <Py_ssize_t>t.off[curve]
    cdef Py_ssize_t cnt = <Py_ssize_t>t.off[curve + 1] - off
    cdef const double* p = t.pieces + off * PCOL
    cdef const double* row
    cdef double total = 0.0, j = j0, je, k, slope
    cdef Py_ssize_t i = _bisect(p + P_START, cnt, x0 + s * j0)
    if i < 0:
        i = 0
    if i + 1 >= cnt or x0 + s * (j1 - 1.0) < p[(i + 1) * PCOL + P_START]:  # one piece: no crossing
        row = p + i * PCOL
        slope = row[P_SLOPE]
        k = j1 - j0
        return k * (row[P_VALUE] + slope * (x0 - row[P_START])) + slope * s * ((j0 + j1 - 1.0) * k * 0.5)
    while j < j1:
        if i + 1 < cnt:
            je = ceil((p[(i + 1) * PCOL + P_START] - x0) / s)
            if je > j1:
                je = j1
            if je < j:
                je = j
        else:
            je = j1
        k = je - j
        if k > 0.0:
            row = p + i * PCOL
            slope = row[P_SLOPE]
            total += k * (row[P_VALUE] + slope * (x0 - row[P_START])) + slope * s * ((j + je - 1.0) * k * 0.5)
        j = je
        i += 1
    return total


cdef inline double c_batch_sum(const BT* t, double batch, double x0, double j0, double j1) noexcept nogil:
    cdef Py_ssize_t n = t.n_sizes, lo = 0
    cdef double w, s_lo
    if batch <= t.n_blend:
        return c_segment_sum(t, n + <Py_ssize_t>batch - 1, x0, batch, j0, j1)
    if n == 1:
        return c_segment_sum(t, 0, x0, batch, j0, j1)
    while lo + 2 < n and t.sizes[lo + 1] <= batch:
        lo += 1
    w = (batch - t.sizes[lo]) / (t.sizes[lo + 1] - t.sizes[lo])
    s_lo = c_segment_sum(t, lo, x0, batch, j0, j1)
    return s_lo + w * (c_segment_sum(t, lo + 1, x0, batch, j0, j1) - s_lo)


cdef inline bint c_finish_times(const BT* t, const double* kv, const double* left, Py_ssize_t m,
                                double* x0, double* out) noexcept nogil:
    """Finish times into out[0..m); returns extrapolated. x0: scratch of m doubles."""
    cdef Py_ssize_t k
    cdef double agg = 0.0, now = 0.0, jprev = 0.0, batch, xa, xb
    cdef double top = t.sizes[t.n_sizes - 1]
    cdef bint ext = False
    for k in range(m - 1, -1, -1):
        if t.packed:
            agg = agg + kv[k]
            x0[k] = agg
        else:
            agg = kv[k] if kv[k] > agg else agg
            x0[k] = <double>(m - k) * agg
    for k in range(m):
        if left[k] > jprev:
            batch = <double>(m - k)
            now += c_batch_sum(t, batch, x0[k], jprev, left[k])
            xa = x0[k] + batch * jprev
            xb = x0[k] + batch * (left[k] - 1.0)
            if batch > top or xa < t.valid_lo or xb > t.valid_hi:
                ext = True
            jprev = left[k]
        out[k] = now
    return ext


cdef inline double c_prefill_batch(const BT* t, double prompt) noexcept nogil:
    cdef double x = t.pa + prompt * (t.pb + t.pc * prompt)
    return x if x > 0.0 else 0.0


cdef inline double c_judge(const BT* t, const double* kv, const double* left, const double* slack,
                           const double* without, Py_ssize_t m, double prompt, double n, double factor,
                           bint protect, double* scratch, long long* pushed_out, bint* ext_out) noexcept nogil:
    """The newcomer's predicted total * factor; pushed count and extrapolation through the pointers.
    scratch: 4 * (m + 1) doubles."""
    cdef double* kv2 = scratch
    cdef double* left2 = scratch + (m + 1)
    cdef double* x0 = scratch + 2 * (m + 1)
    cdef double* times = scratch + 3 * (m + 1)
    cdef double stall = c_prefill_batch(t, prompt), pred, w, r = n - 1.0
    cdef Py_ssize_t pos = 0, k, lo = 0, hi = m, mid
    cdef long long pushed = 0
    while lo < hi:  # bisect_right(left, n - 1)
        mid = (lo + hi) >> 1
        if r < left[mid]:
            hi = mid
        else:
            lo = mid + 1
    pos = lo
    for k in range(pos):
        kv2[k] = kv[k]
        left2[k] = left[k]
    kv2[pos] = prompt
    left2[pos] = r
    for k in range(pos, m):
        kv2[k + 1] = kv[k]
        left2[k + 1] = left[k]
    ext_out[0] = c_finish_times(t, kv2, left2, m + 1, x0, times)
    pred = (stall + times[pos]) * factor
    if protect:
        for k in range(m):
            w = (stall + times[k if k < pos else k + 1]) * factor
            if w > slack[k] and without[k] * factor <= slack[k]:
                pushed += 1
    pushed_out[0] = pushed
    return pred


cdef inline long long c_batch_nfit(const BT* t, const double* kv, const double* left, const double* slack,
                             const double* without, Py_ssize_t m, double prompt, long long hi, double budget,
                             double factor, bint protect, double* scratch) noexcept nogil:
    cdef long long lo = 1, mid, pushed = 0
    cdef bint ext = False
    cdef double pred = c_judge(t, kv, left, slack, without, m, prompt, 1.0, factor, protect, scratch, &pushed, &ext)
    if not (pred <= budget and pushed == 0):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        pred = c_judge(t, kv, left, slack, without, m, prompt, <double>mid, factor, protect, scratch, &pushed, &ext)
        if pred <= budget and pushed == 0:
            lo = mid
        else:
            hi = mid
    return lo


cdef class BatchDecision:
    """batch_reference.BatchDecision's fields, as a compiled object (built without a Python call)."""

    cdef readonly bint admit
    cdef readonly long long max_new_tokens
    cdef readonly double predicted_ms
    cdef readonly int code
    cdef readonly long long pushed
    cdef readonly object reason

    @property
    def extrapolated(self):
        return self.code != BAD_REQUEST and bool(self.code & 1)

    def __repr__(self):
        return (f"BatchDecision(admit={self.admit}, max_new_tokens={self.max_new_tokens}, "
                f"predicted_ms={self.predicted_ms!r}, code={self.code}, pushed={self.pushed}, reason={self.reason!r})")


cdef tuple _REASONS = tuple(BATCH_REASONS)


cdef inline BatchDecision _make(bint admit, long long n, double pred, int code, long long pushed, int status):
    cdef BatchDecision d = BatchDecision.__new__(BatchDecision)
    d.admit = admit
    d.max_new_tokens = n
    d.predicted_ms = pred
    d.code = code
    d.pushed = pushed
    d.reason = _REASONS[status]
    return d


cdef class BatchKernel:
    """One config's batch model as flat tables (batch_reference.build_batch_tables' arrays), with the
    compiled decide. Holds no state between calls: thread-safe."""

    cdef object _keep
    cdef BT t
    cdef readonly bint packed
    cdef readonly double top_size
    cdef object _bound
    cdef double* _bkv
    cdef double* _bleft
    cdef double* _bdl
    cdef Py_ssize_t _bcap

    def __init__(self, tables):
        sizes = np.ascontiguousarray(tables.sizes, dtype=np.float64)
        off = np.ascontiguousarray(tables.curve_off, dtype=np.int64)
        pieces = np.ascontiguousarray(tables.pieces, dtype=np.float64)
        if sizes.size < 1 or off.size != sizes.size + int(tables.n_blend) + 1:
            raise ValueError("batch tables need at least one size and n_sizes + n_blend + 1 offsets")
        self._keep = (sizes, off, pieces)
        cdef const double[::1] s = sizes
        cdef const long long[::1] o = off
        cdef const double[::1] p = pieces
        self.t.sizes = &s[0]
        self.t.n_sizes = sizes.size
        self.t.off = &o[0]
        self.t.pieces = &p[0] if p.shape[0] else NULL
        self.t.packed = bool(tables.packed)
        self.t.valid_lo = float(tables.valid_lo)
        self.t.valid_hi = float(tables.valid_hi)
        self.t.pa, self.t.pb, self.t.pc = (float(v) for v in tables.prefill)
        self.t.n_blend = float(tables.n_blend)
        self.packed = self.t.packed
        self.top_size = sizes[sizes.size - 1]

    def finish_times(self, const double[::1] kv, const double[::1] left):
        """Finish times (ms) of a batch sorted by tokens left, and whether any step extrapolated."""
        cdef Py_ssize_t m = kv.shape[0]
        if left.shape[0] != m:
            raise ValueError("kv and left differ in length")
        out = np.zeros(m, dtype=np.float64)
        x0 = np.zeros(m, dtype=np.float64)
        cdef double[::1] o = out
        cdef double[::1] x = x0
        cdef bint ext = False
        if m:
            ext = c_finish_times(&self.t, &kv[0], &left[0], m, &x[0], &o[0])
        return out, ext

    def decide(self, const double[::1] kv, const double[::1] left, const double[::1] deadline, double now,
               double prompt, long long max_new, double budget, double factor=1.0, bint protect=True,
               bint want_fit=True):
        """batch_reference.decide, compiled: the running state sorted by tokens left."""
        cdef Py_ssize_t m = kv.shape[0]
        if left.shape[0] != m or deadline.shape[0] != m:
            raise ValueError("kv, left and deadline differ in length")
        return self._decide(&kv[0] if m else NULL, &left[0] if m else NULL, &deadline[0] if m else NULL, m, now,
                            prompt, max_new, budget, factor, protect, want_fit)

    def bind(self, double[::1] kv, double[::1] left, double[::1] deadline):
        """Decide on these arrays (the controller's state buffers) with decide_bound: no buffer
        acquisition per call. The arrays must stay alive and unresized while bound (the kernel keeps them)."""
        if left.shape[0] != kv.shape[0] or deadline.shape[0] != kv.shape[0]:
            raise ValueError("kv, left and deadline differ in length")
        self._bound = (kv, left, deadline)
        self._bkv = &kv[0] if kv.shape[0] else NULL
        self._bleft = &left[0] if kv.shape[0] else NULL
        self._bdl = &deadline[0] if kv.shape[0] else NULL
        self._bcap = kv.shape[0]

    def decide_bound(self, Py_ssize_t m, double now, double prompt, long long max_new, double budget,
                     double factor, bint protect, bint want_fit):
        """decide over the first m entries of the bound arrays."""
        if m < 0 or m > self._bcap:
            raise ValueError("m outside the bound arrays")
        return self._decide(self._bkv, self._bleft, self._bdl, m, now, prompt, max_new, budget, factor, protect,
                            want_fit)

    cdef BatchDecision _decide(self, const double* kv, const double* left, const double* deadline, Py_ssize_t m,
                               double now, double prompt, long long max_new, double budget, double factor,
                               bint protect, bint want_fit):
        cdef Py_ssize_t k
        cdef double stack[6 * 128 + 8]
        cdef double* buf = stack
        cdef double* slack
        cdef double* without
        cdef double* scratch
        cdef double pred = 0.0
        cdef long long pushed = 0, nfit = 0
        cdef bint ext0 = False, ext = False
        cdef int status = BST_FITS
        if m + 1 > STACK:
            buf = <double*>malloc((6 * (m + 1) + 8) * sizeof(double))
            if buf == NULL:
                raise MemoryError()
        with nogil:
            slack = buf
            without = buf + (m + 1)
            scratch = buf + 2 * (m + 1)
            for k in range(m):
                slack[k] = deadline[k] - now
                without[k] = 0.0
            if protect and m:
                ext0 = c_finish_times(&self.t, kv, left, m, scratch, without)
            pred = c_judge(&self.t, kv, left, slack, without, m, prompt, <double>max_new, factor, protect, scratch,
                           &pushed, &ext)
            ext = ext or ext0 or <double>(m + 1) > self.top_size
            if not (pred <= budget and pushed == 0):
                if want_fit:
                    nfit = c_batch_nfit(&self.t, kv, left, slack, without, m, prompt, max_new, budget, factor,
                                        protect, scratch)
                if pred > budget:
                    status = BST_FEWER if nfit >= 1 else BST_NONE
                else:
                    status = BST_PUSHES
        if buf != stack:
            free(buf)
        if status == BST_FITS:
            return _make(True, max_new, pred, ext, 0, BST_FITS)
        return _make(False, nfit, pred, status * 2 + ext, pushed, status)
