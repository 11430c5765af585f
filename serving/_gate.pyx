# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The serving loop's compiled gate: one config's published admission state, decided in one call.

Built on the math core (ext/_kernels.pxd, cimported: the same inline C the kernels use) over the
tables of a compiled Kernel (its tables_capsule). Tally counts decisions and Traffic keeps the
recent ones (C under the GIL: atomic for Python threads, so the controller needs no lock on its hot
path). Without this extension (or with the pure-Python kernels) the AdmissionController decides every
request on its Python path (serving/admission.py) and keeps the counts in its ConfigState.
"""

from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport INFINITY, NAN, isfinite
from libc.stdlib cimport free, malloc

from trt_latency.ext._kernels cimport (  # the math core: Tables, code enums, the inline decision
    ADMIT_BELOW,
    EXTRAPOLATED_BIT,
    F_NONE,
    TOKEN_MAX,
    Tables,
    c_decide_scaled,
    decision_fn,
)

from trt_latency.ext import _kernels

# The kernels' own Decision constructor, as a C function pointer (no Python call per decision).
cdef decision_fn _decision = <decision_fn>PyCapsule_GetPointer(_kernels.DECISION_CAPSULE,
                                                                _kernels.DECISION_CAPSULE_NAME)
cdef bytes _TABLES = _kernels.TABLES_CAPSULE


cdef class Tally:
    """Per-config decision counts of a serving loop, updated by Gate.decide in the same call as the
    decision: plain C increments while the GIL is held, atomic for Python threads, so a controller
    needs no lock of its own on its hot path. streak = rejections since the last admit."""

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


cdef enum:
    MAX_EDGES = 64  # length-bucket edges a Gate holds


cdef class Traffic:
    """A bounded ring of recent decisions (budget_ms, prompt, max_new_tokens, bucket, vision_tokens,
    images) of one config; push is C under the GIL (atomic for Python threads), snapshot copies it in
    one call. The vision fields let the threshold re-price a VLM request's encoder term."""

    cdef double* budget
    cdef long long* prompt
    cdef long long* n
    cdef long long* bucket
    cdef long long* vision
    cdef long long* images
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
        self.vision = <long long*>malloc(capacity * sizeof(long long))
        self.images = <long long*>malloc(capacity * sizeof(long long))
        if not (self.budget and self.prompt and self.n and self.bucket and self.vision and self.images):
            raise MemoryError()

    def __dealloc__(self):
        free(self.budget)
        free(self.prompt)
        free(self.n)
        free(self.bucket)
        free(self.vision)
        free(self.images)

    cdef inline void _push(self, double budget, long long prompt, long long n, long long bucket,
                           long long vision, long long images) noexcept:
        cdef Py_ssize_t i = self.head
        self.budget[i] = budget
        self.prompt[i] = prompt
        self.n[i] = n
        self.bucket[i] = bucket
        self.vision[i] = vision
        self.images[i] = images
        self.head = i + 1 if i + 1 < self.capacity else 0
        if self.size < self.capacity:
            self.size += 1

    def push(self, double budget, long long prompt, long long n, long long bucket, long long vision=0,
             long long images=1):
        self._push(budget, prompt, n, bucket, vision, images)

    def snapshot(self):
        """[(budget_ms, prompt, max_new_tokens, bucket, vision_tokens, images)], oldest first."""
        cdef Py_ssize_t j, i
        out = []
        for j in range(self.size):
            i = (self.head - self.size + j) % self.capacity
            if i < 0:
                i += self.capacity
            out.append((self.budget[i], self.prompt[i], self.n[i], self.bucket[i], self.vision[i], self.images[i]))
        return out

    def __len__(self):
        return self.size


cdef class Gate:
    """One config's published admission state, decided in one compiled call.

    decide(request) takes the controller's Request tuple (vision, text, max_new, tier, top_k,
    blocks, budget[, images]) and, when every field is a plain int / float within range and the request is
    judged inside the measured range, returns the Decision of the scaled model
    (prefill_scale[bucket] * prefill + decode_scale[bucket] * decode_sum) * factor, pushing the
    request onto the traffic ring and counting it into the tally. Anything else returns None: the
    caller's checked path handles it (and counts it). The gate is immutable: a new state is a new Gate."""

    cdef object kernel  # keeps the tables alive
    cdef const Tables* t
    cdef Py_ssize_t row
    cdef long long edges[MAX_EDGES]
    cdef double ps[MAX_EDGES + 1]
    cdef double ds[MAX_EDGES + 1]
    cdef Py_ssize_t n_edges
    cdef double factor
    cdef bint online
    cdef long long probe_after
    cdef readonly Tally tally
    cdef readonly Traffic traffic

    def __init__(self, kernel not None, Py_ssize_t row, edges, scales, double factor, bint online,
                 long long probe_after, Tally tally not None, Traffic traffic not None):
        cdef Py_ssize_t i
        self.t = <const Tables*>PyCapsule_GetPointer(kernel.tables_capsule(), _TABLES)
        edges = tuple(edges)
        scales = tuple(scales)
        if len(edges) > MAX_EDGES or len(scales) != len(edges) + 1:
            raise ValueError(f"need <= {MAX_EDGES} edges and len(edges) + 1 scales")
        if not 0 <= row < self.t.n_cfg:
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
        self.tally = tally
        self.traffic = traffic

    def decide(self, request):
        cdef long long f[6]
        cdef long long images = 1
        cdef int overflow = 0, code
        cdef Py_ssize_t size
        cdef Py_ssize_t i, bucket
        cdef object o
        cdef double budget, factor, pred = NAN
        cdef long long prompt, nout = 0
        cdef bint probe = False
        if not PyTuple_Check(request):
            return None
        size = PyTuple_GET_SIZE(request)
        if size != 7 and size != 8:
            return None
        if size == 8:
            o = <object>PyTuple_GET_ITEM(request, 7)
            if not PyLong_CheckExact(o):
                return None
            images = PyLong_AsLongLongAndOverflow(o, &overflow)
            if overflow or not (1 <= images <= TOKEN_MAX):
                return None
        for i in range(6):
            o = <object>PyTuple_GET_ITEM(request, i)
            if i == 5 and o is None:
                f[5] = 0
                continue
            if not PyLong_CheckExact(o):
                return None
            f[i] = PyLong_AsLongLongAndOverflow(o, &overflow)
            if overflow or not (0 <= f[i] <= TOKEN_MAX):
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
        code = c_decide_scaled(self.t, self.row, <double>prompt, budget, f[2], factor, F_NONE, &nout, &pred,
                         self.ps[bucket], self.ds[bucket], <double>f[0], <double>images)
        if code & EXTRAPOLATED_BIT:
            return None
        self.traffic._push(budget, prompt, f[2], bucket, f[0], images)
        self.tally._count(code < ADMIT_BELOW, probe)
        return _decision(code, nout, pred)
