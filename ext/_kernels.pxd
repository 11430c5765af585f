# Shared C types of the evaluation kernels (layout documented in estimator/_reference.py).
# Types only (no functions, no classes), so cimporting it needs no module at run time. setup.py names
# the extension trt_latency.ext._kernels but the source folder is ext/, so Cython does not pair this
# file with _kernels.pyx by itself: the .pyx cimports it explicitly (`from ext._kernels cimport *`).

cdef enum:
    # cfg columns
    PRE_A = 0
    PRE_B = 1
    PRE_C = 2
    PAST_LO = 3
    PAST_HI = 4
    PRE_LO = 5
    PRE_HI = 6
    FACTORISED = 7
    PIECE_OFF = 8
    PIECE_CNT = 9
    CONF_OFF = 10
    CONF_CNT = 11
    RQ_OFF = 12
    RQ_CNT = 13
    LOOP_FIRST = 14   # serving loop: one-off post-prefill transient c (ms), when n >= 2
    LOOP_PRE = 15     # serving loop: prefill-side overhead o_p (ms)
    NCOL = 16
    # pieces columns
    P_START = 0
    P_VALUE = 1
    P_SLOPE = 2
    P_CUM = 3
    PCOL = 4
    # factor sources
    F_NONE = 0
    F_CONFORMAL = 1
    F_RESIDUAL = 2
    F_CLIPPED = 3
    # decision codes
    CODE_BAD = 64
    CODE_EMPTY_PROMPT = 72
    CODE_UNKNOWN_CONFIG = 73
    CODE_BAD_SCALE = 74
    EXTRAPOLATED_BIT = 4

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
