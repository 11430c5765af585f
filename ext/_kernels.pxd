# The math core of the evaluation kernels, as C-level inline functions over flat tables
# (scikit-learn's tree/_utils.pxd habit: other .pyx modules, here or downstream, cimport it by its full name,
# `from trt_latency.ext._kernels cimport Tables, c_total, ...`, and get the same compiled arithmetic). Inline functions and types only, so cimporting
# needs no module at run time. The constants (column indices, codes, TOKEN_MAX) come from
# ext/layout.py through the generated _layout.pxi. The pure-Python mirror, property-tested equal, is
# trt_latency.estimator._reference.
#
# Semantics: C(m) = sum_{L=0}^{m-1} T(L) in closed form per piece; prefill(P) = max(a + b P + c P^2, 0) + o_p
# (+ vision(v) = max(A + B v + C v^2, 0) [N_ms at v = N_v, the native grid] + max(E_a + E_b P, 0) for a request with v > 0 vision tokens: the
# VLM encoder and embedding step; in the decisions, not in the tool functions c_prefill / c_total / c_nfit);
# total(n) = (ps * prefill(P) + ds * [n >= 2] ((C(P+n-1) - C(P)) + c)) * f for n >= 1; nfit = the largest
# n with total(n) <= budget: bisect over pieces, a quadratic solve inside the piece, then a fix-up
# against total() itself so that total(n) <= budget < total(n+1) holds exactly in floating point.

from libc.math cimport floor, sqrt

include "_layout.pxi"

# The kernels' Decision constructor (code, max_new_tokens, predicted_ms), handed to other compiled
# modules as a capsule (_kernels.DECISION_CAPSULE) so they build the same Decision type without a Python call.
ctypedef object (*decision_fn)(int, long long, double)

cdef struct Tables:
    const double* cfg        # [n_cfg, NCOL]
    const double* pieces     # [n_pieces, PCOL]
    const double* conf       # [n_conf, 2]
    const double* rq         # [n_rq, 2]
    const long long* tier_map
    const long long* topk_map
    const long long* blocks_map
    const long long* lut     # [n_t, n_k, n_b]
    Py_ssize_t n_cfg
    Py_ssize_t n_tier_map
    Py_ssize_t n_topk_map
    Py_ssize_t n_blocks_map
    Py_ssize_t lut_k
    Py_ssize_t lut_b


cdef inline long long c_lookup(const Tables* t, long long tier, long long top_k, long long blocks) noexcept nogil:
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


cdef inline double c_step(const Tables* t, Py_ssize_t c, double past_len) noexcept nogil:
    cdef const double* p = _piece(t, c, past_len)
    return p[P_VALUE] + p[P_SLOPE] * (past_len - p[P_START])


cdef inline double c_cumsum(const Tables* t, Py_ssize_t c, double m) noexcept nogil:
    cdef const double* p = _piece(t, c, m)
    cdef double k = m - p[P_START]
    return p[P_CUM] + k * p[P_VALUE] + p[P_SLOPE] * (k * (k - 1.0) * 0.5)


cdef inline double c_prefill(const Tables* t, Py_ssize_t c, double prompt) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef double x = row[PRE_A] + prompt * (row[PRE_B] + row[PRE_C] * prompt)
    return (x if x > 0.0 else 0.0) + row[LOOP_PRE]


cdef inline double _vis_call(const double* row, double u, int two) noexcept nogil:
    """One encoder call on images of u tokens each: one image (two = 0) or two (two = 1), clipped at 0."""
    cdef double x
    if two:
        if row[VIS_NAT_V] > 0.0 and u == row[VIS_NAT_V] and row[VIS2_NAT_MS] > 0.0:
            return row[VIS2_NAT_MS]
        x = row[VIS2_A] + u * (row[VIS2_B] + row[VIS2_C] * u)
    elif row[VIS_NAT_V] > 0.0 and u == row[VIS_NAT_V]:
        x = row[VIS_NAT_MS]  # the native grid: measured, not fitted
    else:
        x = row[VIS_A] + u * (row[VIS_B] + row[VIS_C] * u)
    return x if x > 0.0 else 0.0


cdef inline double c_vision(const Tables* t, Py_ssize_t c, double vision, double prompt,
                            double images) noexcept nogil:
    """The VLM encoder + embedding step ms of a request with `vision` tokens over `images` images (0 without
    vision tokens): one call per image, or one call for all (VIS_MODE; see ext/layout.py)."""
    cdef const double* row = t.cfg + c * NCOL
    cdef double x, e, u, f1, f2
    if vision <= 0.0:
        return 0.0
    if images < 1.0:
        images = 1.0
    u = vision / images
    f1 = _vis_call(row, u, 0)
    if images == 1.0 or row[VIS_MODE] != 1.0:
        x = images * f1
    else:
        f2 = _vis_call(row, u, 1)
        x = f2 + (images - 2.0) * (f2 - f1)
    e = row[EMB_A] + row[EMB_B] * prompt
    return x + (e if e > 0.0 else 0.0)


cdef inline double c_first(const double* row, double prompt) noexcept nogil:
    """The serving loop's one-off first-step cost c(P) = c0 + c1 * P (paid when n >= 2)."""
    return row[LOOP_FIRST] + row[LOOP_FIRST_P] * prompt


cdef inline double c_decode_sum(const Tables* t, Py_ssize_t c, double prompt, double n) noexcept nogil:
    if n <= 1.0:
        return 0.0
    return (c_cumsum(t, c, prompt + n - 1.0) - c_cumsum(t, c, prompt)) + c_first(t.cfg + c * NCOL, prompt)


cdef inline double c_total(const Tables* t, Py_ssize_t c, double prompt, double n, double factor) noexcept nogil:
    return (c_prefill(t, c, prompt) + c_decode_sum(t, c, prompt, n)) * factor


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


cdef inline double c_total_at(const Tables* t, Py_ssize_t c, double prompt, double n, double factor,
                             double pre, double cp, Py_ssize_t hint, double ds) noexcept nogil:
    """c_total with prefill(prompt) = pre (times the prefill scale) and cumsum(prompt) = cp
    precomputed, the decode part times ds (same arithmetic; ds = 1.0 is exact)."""
    if n <= 1.0:
        return (pre + 0.0) * factor
    return (pre + ds * ((_cumsum_hint(t, c, prompt + n - 1.0, hint) - cp) + c_first(t.cfg + c * NCOL, prompt))) * factor


cdef inline long long _fixup(const Tables* t, Py_ssize_t c, double prompt, double budget, double factor,
                      long long n, double pre, double cp, Py_ssize_t hint, double ds) noexcept nogil:
    cdef long long lo, hi, step, probe, mid
    if c_total_at(t, c, prompt, <double>n, factor, pre, cp, hint, ds) <= budget:
        lo = n
        step = 1
        while True:
            if lo >= TOKEN_MAX:
                return TOKEN_MAX
            probe = lo + step if lo + step <= TOKEN_MAX else TOKEN_MAX
            if c_total_at(t, c, prompt, <double>probe, factor, pre, cp, hint, ds) <= budget:
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
            if probe == 1 or c_total_at(t, c, prompt, <double>probe, factor, pre, cp, hint, ds) <= budget:
                lo = probe
                break
            hi = probe
            step = step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if c_total_at(t, c, prompt, <double>mid, factor, pre, cp, hint, ds) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline long long c_nfit(const Tables* t, Py_ssize_t c, double prompt, double budget, double factor) noexcept nogil:
    return c_nfit_at(t, c, prompt, budget, factor, c_prefill(t, c, prompt), c_cumsum(t, c, prompt), 1.0)


cdef inline long long c_nfit_at(const Tables* t, Py_ssize_t c, double prompt, double budget, double factor,
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
    target = cp + ((budget / factor - pre) / ds - c_first(row, prompt))  # an estimate: _fixup makes it exact
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


cdef inline double c_quantile_factor(const Tables* t, Py_ssize_t c, double q, int* src) noexcept nogil:
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


cdef inline double c_alpha_factor(const Tables* t, Py_ssize_t c, double alpha, int* src) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef Py_ssize_t off = <Py_ssize_t>row[CONF_OFF], cnt = <Py_ssize_t>row[CONF_CNT], j, best = -1
    for j in range(cnt):
        if t.conf[(off + j) * 2] <= alpha:
            best = j
    if best >= 0:
        src[0] = F_CONFORMAL
        return t.conf[(off + best) * 2 + 1]
    return c_quantile_factor(t, c, 1.0 - alpha, src)


cdef inline bint c_extrapolated(const Tables* t, Py_ssize_t c, double prompt, double n,
                                double vision, double images) noexcept nogil:
    cdef const double* row = t.cfg + c * NCOL
    cdef double u
    if prompt < row[PRE_LO] or prompt > row[PRE_HI]:
        return True
    if vision > 0.0 and row[VIS_HI] > 0.0:
        u = vision / (images if images > 1.0 else 1.0)  # tokens per image: the swept range is per image
        if u < row[VIS_LO] or u > row[VIS_HI]:
            return True
        if images > 1.0 and (row[VIS_MODE] == 2.0 or (row[VIS_MODE] == 1.0 and images > 2.0)):
            return True  # more images per call than were swept
    return n >= 2.0 and (prompt < row[PAST_LO] or prompt + n - 2.0 > row[PAST_HI])


cdef inline bint c_fits(const Tables* t, Py_ssize_t c, double prompt, double budget, long long req,
                        double alpha, double vision, double images) noexcept nogil:
    """Whether c_decide admits: its predicted total for the requested tokens (1 when none) fits the
    budget (the same arithmetic, without the inverse c_decide also runs when it does not)."""
    cdef int fsrc = F_NONE
    cdef double factor = 1.0
    if alpha > 0.0:
        factor = c_alpha_factor(t, c, alpha, &fsrc)
    return c_total_at(t, c, prompt, <double>(req if req > 0 else 1), factor,
                      (c_prefill(t, c, prompt) + c_vision(t, c, vision, prompt, images)) * 1.0,
                      c_cumsum(t, c, prompt), -1, 1.0) <= budget


cdef inline int c_decide(const Tables* t, Py_ssize_t c, double prompt, double budget, long long req, double alpha,
                  long long* n_out, double* pred_out, double vision, double images) noexcept nogil:
    cdef int fsrc = F_NONE
    cdef double factor = 1.0
    if alpha > 0.0:
        factor = c_alpha_factor(t, c, alpha, &fsrc)
    return c_decide_scaled(t, c, prompt, budget, req, factor, fsrc, n_out, pred_out, 1.0, 1.0, vision, images)


cdef inline int c_decide_scaled(const Tables* t, Py_ssize_t c, double prompt, double budget, long long req,
                          double factor, int fsrc, long long* n_out, double* pred_out,
                          double ps, double ds, double vision, double images) noexcept nogil:
    cdef int status
    cdef double pred, pre, cp
    cdef long long need, n
    need = req if req > 0 else 1
    pre = (c_prefill(t, c, prompt) + c_vision(t, c, vision, prompt, images)) * ps
    cp = c_cumsum(t, c, prompt)
    pred = c_total_at(t, c, prompt, <double>need, factor, pre, cp, -1, ds)
    if req > 0 and pred <= budget:
        n = req
        status = ST_FITS
    else:
        n = c_nfit_at(t, c, prompt, budget, factor, pre, cp, ds)
        status = ST_FITS if n >= need else (ST_FEWER if n >= 1 else ST_NONE)
    n_out[0] = n
    pred_out[0] = pred
    return (status * STATUS_STRIDE + (FACTORISED_BIT if t.cfg[c * NCOL + FACTORISED] != 0.0 else 0)
            + (EXTRAPOLATED_BIT if c_extrapolated(t, c, prompt, <double>(n if n > need else need), vision, images) else 0) + fsrc)
