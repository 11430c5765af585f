# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batch-aware admission, compiled: serving/batch_reference.py is the readable statement of the same
arithmetic (same order of operations), property-tested equal in tests/test_serving_batch.py.

A decision walks the running batch sorted by tokens left: per segment between two completions, the
closed-form sum of the piecewise-linear step cost over an arithmetic progression of KV reads, once
without the newcomer and once with it (its prefill stalls everyone first). The piece layout and the
bisect over piece starts are the math core's (ext/_kernels.pxd, cimported).
"""

from libc.math cimport INFINITY, NAN, ceil
from libc.stdlib cimport free, malloc

from trt_latency.ext._kernels cimport (  # the math core: PCOL / P_* enums, _bisect, TOKEN_MAX
    P_SLOPE,
    P_START,
    P_VALUE,
    PCOL,
    TOKEN_MAX,
    _bisect,
)

import numpy as np

from trt_latency.serving.batch_reference import BAD_REQUEST, BATCH_REASONS, PROBE_REASON

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


cdef inline bint c_prepare(const BT* t, const double* kv, const double* left, Py_ssize_t m,
                           double* agg, double* out) noexcept nogil:
    """batch_reference.prepare: suffix aggregates into agg, finish times into out; returns extrapolated."""
    cdef Py_ssize_t k
    cdef double a = 0.0, now = 0.0, jprev = 0.0, batch, x0
    cdef double top = t.sizes[t.n_sizes - 1]
    cdef bint ext = False
    for k in range(m - 1, -1, -1):
        if t.packed:
            a = a + kv[k]
        else:
            a = kv[k] if kv[k] > a else a
        agg[k] = a
    for k in range(m):
        if left[k] > jprev:
            batch = <double>(m - k)
            x0 = agg[k] if t.packed else batch * agg[k]
            now += c_batch_sum(t, batch, x0, jprev, left[k])
            if batch > top or x0 + batch * jprev < t.valid_lo or x0 + batch * (left[k] - 1.0) > t.valid_hi:
                ext = True
            jprev = left[k]
        out[k] = now
    return ext


cdef inline double c_prefill_batch(const BT* t, double prompt) noexcept nogil:
    cdef double x = t.pa + prompt * (t.pb + t.pc * prompt)
    return x if x > 0.0 else 0.0


cdef inline double c_judge(const BT* t, const double* left, const double* slack, const double* agg,
                           const double* without, Py_ssize_t m, double prompt, double n, double factor,
                           double center, bint protect, long long* pushed_out, bint* ext_out) noexcept nogil:
    """batch_reference.judge: the newcomer's predicted total * factor; pushed and extrapolated through
    the pointers."""
    cdef double r = n - 1.0, stall = c_prefill_batch(t, prompt), now = 0.0, jprev = 0.0
    cdef double top = t.sizes[t.n_sizes - 1], end, batch, a, x0, w, j0, base, shift
    cdef Py_ssize_t lo = 0, hi = m, mid, pos, k
    cdef long long pushed = 0
    cdef bint ext = False
    while lo < hi:  # bisect_right(left, r)
        mid = (lo + hi) >> 1
        if r < left[mid]:
            hi = mid
        else:
            lo = mid + 1
    pos = lo
    for k in range(pos + 1):
        end = left[k] if k < pos else r
        if end > jprev:
            batch = <double>(m - k + 1)
            a = agg[k] if k < m else 0.0
            if t.packed:
                x0 = a + prompt
            else:
                x0 = batch * (a if a > prompt else prompt)
            now += c_batch_sum(t, batch, x0, jprev, end)
            if batch > top or x0 + batch * jprev < t.valid_lo or x0 + batch * (end - 1.0) > t.valid_hi:
                ext = True
            jprev = end
        if k < pos and protect:
            w = (stall + now) * factor
            if w > slack[k] and without[k] * center <= slack[k]:
                pushed += 1
    if protect and pos < m:
        j0 = left[pos - 1] if pos > 0 else 0.0
        base = without[pos - 1] if pos > 0 else 0.0
        if r > j0:
            batch = <double>(m - pos)
            x0 = agg[pos] if t.packed else batch * agg[pos]
            base = base + c_batch_sum(t, batch, x0, j0, r)
        shift = stall + now - base
        for k in range(pos, m):
            w = (without[k] + shift) * factor
            if w > slack[k] and without[k] * center <= slack[k]:
                pushed += 1
    pushed_out[0] = pushed
    ext_out[0] = ext
    return (stall + now) * factor


cdef inline long long c_batch_nfit(const BT* t, const double* left, const double* slack, const double* agg,
                                   const double* without, Py_ssize_t m, double prompt, long long hi, double budget,
                                   double factor, double center, bint protect) noexcept nogil:
    cdef long long lo = 1, mid, pushed = 0
    cdef bint ext = False
    cdef double pred = c_judge(t, left, slack, agg, without, m, prompt, 1.0, factor, center, protect, &pushed, &ext)
    if not (pred <= budget and pushed == 0):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        pred = c_judge(t, left, slack, agg, without, m, prompt, <double>mid, factor, center, protect, &pushed, &ext)
        if pred <= budget and pushed == 0:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline int c_batch_decide(const BT* t, const double* left, const double* slack, const double* agg,
                         const double* without, bint ext0, Py_ssize_t m, double prompt, long long max_new,
                         double budget, double factor, double center, bint protect, bint want_fit, double* pred_out,
                         long long* pushed_out, long long* nfit_out) noexcept nogil:
    """batch_reference.decide_prepared's arithmetic; returns the code (status * 2 + extrapolated)."""
    cdef bint ext = False
    cdef long long nfit = 0
    cdef int status
    cdef double pred = c_judge(t, left, slack, agg, without, m, prompt, <double>max_new, factor, center, protect,
                               pushed_out, &ext)
    ext = ext or ext0 or <double>(m + 1) > t.sizes[t.n_sizes - 1]
    pred_out[0] = pred
    if pred <= budget and pushed_out[0] == 0:
        nfit_out[0] = max_new
        return BST_FITS * 2 + ext
    if want_fit:
        nfit = c_batch_nfit(t, left, slack, agg, without, m, prompt, max_new, budget, factor, center, protect)
    nfit_out[0] = nfit
    if pred > budget:
        status = BST_FEWER if nfit >= 1 else BST_NONE
    else:
        status = BST_PUSHES
    return status * 2 + ext


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
    compiled decide over a given state. Holds no state between calls: thread-safe."""

    cdef object _keep
    cdef BT t
    cdef readonly bint packed
    cdef readonly double top_size

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
        agg = np.zeros(m, dtype=np.float64)
        cdef double[::1] o = out
        cdef double[::1] a = agg
        cdef bint ext = False
        if m:
            ext = c_prepare(&self.t, &kv[0], &left[0], m, &a[0], &o[0])
        return out, ext

    def decide(self, const double[::1] kv, const double[::1] left, const double[::1] deadline, double now,
               double prompt, long long max_new, double budget, double factor=1.0, bint protect=True,
               bint want_fit=True, double center=1.0):
        """batch_reference.decide, compiled: the running state sorted by tokens left."""
        cdef Py_ssize_t m = kv.shape[0], k
        if left.shape[0] != m or deadline.shape[0] != m:
            raise ValueError("kv, left and deadline differ in length")
        buf = np.empty(3 * m + 1, dtype=np.float64)
        cdef double[::1] b = buf
        cdef double* agg = &b[0]
        cdef double* without = agg + m
        cdef double* slack = agg + 2 * m
        cdef bint ext0 = False
        cdef double pred = 0.0
        cdef long long pushed = 0, nfit = 0
        cdef int code
        for k in range(m):
            slack[k] = deadline[k] - now
        if m:
            ext0 = c_prepare(&self.t, &kv[0], &left[0], m, agg, without)
        code = c_batch_decide(&self.t, &left[0] if m else NULL, slack, agg, without, ext0, m, prompt, max_new, budget,
                        factor, center, protect, want_fit, &pred, &pushed, &nfit)
        return _make(code // 2 == BST_FITS, nfit, pred, code, pushed, code // 2)


cdef class BatchState:
    """One engine's running batch in C arrays, sorted by tokens left, with the batch's Prepared (suffix
    aggregates, finish times without a newcomer) cached until the next event. Every method runs under
    the GIL without releasing it, so each is atomic for Python threads: no lock on the decide path.
    ``decide`` is BatchAdmissionController.decide's compiled body (field checks, full batch, factor x
    the correction of the batch-size bucket, the kernel, the counts, and the probe: a request the factor
    rejected is re-decided at factor 1 when batch_reference.probe_due says so, same rule)."""

    cdef BatchKernel kernel
    cdef double* kv
    cdef double* left
    cdef double* dl
    cdef double* agg
    cdef double* without
    cdef double* slack
    cdef Py_ssize_t m, cap
    cdef bint prepared, ext0, dirty
    cdef list ids
    cdef object clock
    cdef double correction[64]
    cdef public double base_factor
    cdef public double probe_interval  # ms; inf: no probes
    cdef public double last_admit  # the clock's ms of the last admission (probes included)
    cdef readonly double last_factor  # the factor the last kernel decision used (1 for a probe): unscale with it
    cdef readonly bint protect
    cdef readonly long long max_batch, decisions, admits, rejects, probes

    def __cinit__(self, BatchKernel kernel, long long max_batch, bint protect, double base_factor, clock,
                  double probe_interval=INFINITY):
        cdef Py_ssize_t i
        self.kernel = kernel
        self.max_batch = max_batch
        self.protect = protect
        self.base_factor = base_factor
        self.clock = clock
        self.probe_interval = probe_interval
        self.last_admit = -INFINITY
        self.last_factor = 1.0
        self.cap = max_batch + 1 if max_batch > 0 else 2
        self.kv = <double*>malloc(6 * self.cap * sizeof(double))
        if self.kv == NULL:
            raise MemoryError()
        self.left = self.kv + self.cap
        self.dl = self.kv + 2 * self.cap
        self.agg = self.kv + 3 * self.cap
        self.without = self.kv + 4 * self.cap
        self.slack = self.kv + 5 * self.cap
        self.m = 0
        self.ids = []
        for i in range(64):
            self.correction[i] = 1.0

    def __dealloc__(self):
        free(self.kv)

    @property
    def running(self):
        return self.m

    def state(self):
        """(ids, kv, left, deadline) in sorted order (copies)."""
        self._resort()
        return (list(self.ids), [self.kv[i] for i in range(self.m)], [self.left[i] for i in range(self.m)],
                [self.dl[i] for i in range(self.m)])

    def invalidate(self):
        """Drop the cached finish times (what any event does): for benchmarks of a decision after an event."""
        self.prepared = False

    def set_correction(self, int bucket, double value):
        if 0 <= bucket < 64:
            self.correction[bucket] = value

    cdef void _resort(self):
        cdef Py_ssize_t i, j
        cdef double a, b, c
        if not self.dirty:
            return
        for i in range(1, self.m):  # insertion sort: one request's count moved by a few steps
            a, b, c = self.kv[i], self.left[i], self.dl[i]
            rid = self.ids[i]
            j = i - 1
            while j >= 0 and self.left[j] > b:
                self.kv[j + 1], self.left[j + 1], self.dl[j + 1] = self.kv[j], self.left[j], self.dl[j]
                self.ids[j + 1] = self.ids[j]
                j -= 1
            self.kv[j + 1], self.left[j + 1], self.dl[j + 1] = a, b, c
            self.ids[j + 1] = rid
        self.dirty = False

    def started(self, rid, double prompt, double left, double deadline):
        """Join: KV length prompt, left decode steps, absolute deadline (ms, the clock's)."""
        cdef Py_ssize_t pos, k
        self._resort()
        if self.m + 1 > self.cap:
            raise ValueError("batch over max_batch")
        pos = self.m
        while pos > 0 and self.left[pos - 1] > left:
            pos -= 1
        for k in range(self.m, pos, -1):
            self.kv[k], self.left[k], self.dl[k] = self.kv[k - 1], self.left[k - 1], self.dl[k - 1]
        self.kv[pos], self.left[pos], self.dl[pos] = prompt, left, deadline
        self.ids.insert(pos, rid)
        self.m += 1
        self.prepared = False

    def token(self, rid):
        cdef Py_ssize_t i
        try:
            i = self.ids.index(rid)
        except ValueError:
            return
        self.kv[i] += 1.0
        self.left[i] -= 1.0
        self.dirty = True
        self.prepared = False

    def step(self):
        cdef Py_ssize_t i
        for i in range(self.m):
            self.kv[i] += 1.0
            self.left[i] -= 1.0
        self.prepared = False

    def finished(self, rid):
        """Leave the batch; returns whether rid was running."""
        cdef Py_ssize_t i, k
        try:
            i = self.ids.index(rid)
        except ValueError:
            return False
        for k in range(i, self.m - 1):
            self.kv[k], self.left[k], self.dl[k] = self.kv[k + 1], self.left[k + 1], self.dl[k + 1]
        del self.ids[i]
        self.m -= 1
        self.prepared = False
        return True

    def decide(self, rid, prompt, max_new_tokens, budget_ms, now=None, bint want_fit=False):
        cdef long long p, n, pushed = 0, nfit = 0, b, pushed1 = 0, nfit1 = 0
        cdef double budget, t, factor, center, pred = 0.0, pred1 = 0.0
        cdef Py_ssize_t k, m
        cdef int code, bucket, probe
        cdef BatchDecision d
        self.decisions += 1
        if (type(prompt) is not int or type(max_new_tokens) is not int
                or not (type(budget_ms) is float or type(budget_ms) is int)):
            self.rejects += 1
            return _bad()
        p = prompt
        n = max_new_tokens
        budget = budget_ms
        if not (1 <= p <= TOKEN_MAX and 1 <= n <= TOKEN_MAX and budget >= 0.0):
            self.rejects += 1
            return _bad()
        t = self.clock() if now is None else now
        self._resort()
        m = self.m
        if m >= self.max_batch:
            self.rejects += 1
            return _full()
        if not self.prepared:
            self.ext0 = c_prepare(&self.kernel.t, self.kv, self.left, m, self.agg, self.without) if m else False
            self.prepared = True
        for k in range(m):
            self.slack[k] = self.dl[k] - t
        b = m + 1
        bucket = 0
        while b > 1:  # bit length of (m + 1) - 1: batch-size bucket 1, 2, 3-4, 5-8, ...
            bucket += 1
            b = (b + 1) >> 1
        center = self.correction[bucket if bucket < 64 else 63]  # the bucket's median bias: the give-up test's
        factor = self.base_factor * center
        self.last_factor = factor
        code = c_batch_decide(&self.kernel.t, self.left, self.slack, self.agg, self.without, self.ext0, m, <double>p, n,
                        budget, factor, center, self.protect, want_fit, &pred, &pushed, &nfit)
        if code // 2 == BST_FITS:
            self.admits += 1
            self.last_admit = t
            return _make(True, nfit, pred, code, 0, BST_FITS)
        if m == 0 and factor > 1.0 and self.probe_interval < INFINITY and t - self.last_admit >= self.probe_interval:  # batch_reference.probe_due
            probe = c_batch_decide(&self.kernel.t, self.left, self.slack, self.agg, self.without, self.ext0, 0,
                                   <double>p, n, budget, 1.0, 1.0, self.protect, False, &pred1, &pushed1, &nfit1)
            if probe // 2 == BST_FITS:
                self.admits += 1
                self.probes += 1
                self.last_admit = t
                self.last_factor = 1.0
                d = _make(True, n, pred1, probe, 0, BST_FITS)
                d.reason = PROBE_REASON
                return d
        self.rejects += 1
        return _make(False, nfit, pred, code, pushed, code // 2)


cdef BatchDecision _bad():
    cdef BatchDecision d = BatchDecision.__new__(BatchDecision)
    d.admit = False
    d.predicted_ms = NAN
    d.code = BAD_REQUEST
    d.reason = "bad request: prompt and max_new_tokens integers >= 1, budget_ms a number >= 0"
    return d


cdef BatchDecision _full():
    cdef BatchDecision d = BatchDecision.__new__(BatchDecision)
    d.admit = False
    d.predicted_ms = NAN
    d.code = BST_NONE * 2
    d.reason = "batch full (max_batch running)"
    return d
