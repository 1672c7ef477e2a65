# Ranking kernels: the feature gather and the model forward passes.
#
# recsvc.ranking validates and prepares every argument (dtypes, contiguity,
# shapes, row ranges) and allocates the outputs; these kernels only compute.
# They still check the few things that would otherwise read out of bounds
# (shapes against each other, candidate rows against the catalog) and report
# them as a status; the ``def`` wrapper raises once it holds the GIL again.
#
# Feature matrix layout (one row per candidate; names in recsvc.ranking):
#   0  similarity         user_vec . embeddings[row]
#   1  log_popularity     log_popularity[row]
#   2  freshness          exp(-ln2 * age_days / half_life_days), age clamped at 0
#   3  category_affinity  category_affinity[categories[row]] (0 if out of range)
#   4  bandit_mean        alpha / (alpha + beta) (0 if alpha + beta <= 0 or NaN)
#   5 .. 5+S-1            source_scores[i, s]
#   5+S .. 5+2S-1         1 if source s proposed the candidate else 0
#   5+2S ..               the request's context features, copied to every row
#
# Dot products and dense layers run in SIMD C (below); their summation order
# differs from numpy's, so the twin in twins/ranking.py matches to float32
# rounding, not bit for bit.

from libc.math cimport exp, expf, log

from recsvc._fastpath._typedefs cimport (
    float32_t, float64_t, int32_t, int64_t, intp_t, uint8_t,
)

cdef enum:
    N_BASE = 5          # columns before the per-source features
    PREFETCH_AHEAD = 8  # candidates: catalog rows are random, so fetch early

cdef double MS_PER_DAY = 86400000.0


cdef enum Status:
    OK = 0
    BAD_SHAPE = 1          # arrays disagree on n, N, d, S or F
    ROW_OUT_OF_RANGE = 2   # a candidate row outside [0, N)


# --------------------------------------------------------------------------
# Small numeric helpers, in C: GCC/Clang vector extensions give explicit SIMD
# (8 floats at a time) without -ffast-math, and on x86-64 Linux with GCC each
# helper is also compiled for x86-64-v3 (AVX2 + FMA) and picked at load time
# (``target_clones``), so one wheel runs everywhere and uses FMA where present.

cdef extern from *:
    """
    #include "_simd.h"


    /* y = act(x @ W + b) for one row; W is (n_in, n_out) row-major. Output
       columns go in blocks of 32 / 8 held in registers across the whole k loop. */
    RECSVC_CLONES
    static void recsvc_dense_row(const float *restrict x, ptrdiff_t n_in,
                                 const float *restrict W, const float *restrict b,
                                 ptrdiff_t n_out, int relu, float *restrict y)
    {
        ptrdiff_t j = 0, k;
    #if RECSVC_SIMD
        for (; j + 32 <= n_out; j += 32) {
            recsvc_v8 a0 = RECSVC_LD(b + j), a1 = RECSVC_LD(b + j + 8);
            recsvc_v8 a2 = RECSVC_LD(b + j + 16), a3 = RECSVC_LD(b + j + 24);
            for (k = 0; k < n_in; k++) {
                const float *w = W + k * n_out + j;
                float xk = x[k];
                a0 += xk * RECSVC_LD(w);
                a1 += xk * RECSVC_LD(w + 8);
                a2 += xk * RECSVC_LD(w + 16);
                a3 += xk * RECSVC_LD(w + 24);
            }
            RECSVC_ST(y + j, a0);
            RECSVC_ST(y + j + 8, a1);
            RECSVC_ST(y + j + 16, a2);
            RECSVC_ST(y + j + 24, a3);
        }
        for (; j + 8 <= n_out; j += 8) {
            recsvc_v8 a0 = RECSVC_LD(b + j);
            for (k = 0; k < n_in; k++)
                a0 += x[k] * RECSVC_LD(W + k * n_out + j);
            RECSVC_ST(y + j, a0);
        }
    #endif
        for (; j < n_out; j++) {
            float acc = b[j];
            for (k = 0; k < n_in; k++)
                acc += x[k] * W[k * n_out + j];
            y[j] = acc;
        }
        if (relu)
            for (j = 0; j < n_out; j++)
                y[j] = y[j] > 0.0f ? y[j] : 0.0f;
    }
    """
    void RECSVC_PREFETCH(const void* p) noexcept nogil
    float32_t recsvc_dot(const float32_t* a, const float32_t* b, intp_t n) noexcept nogil
    void recsvc_dense_row(const float32_t* x, intp_t n_in, const float32_t* W, const float32_t* b,
                          intp_t n_out, int relu, float32_t* y) noexcept nogil


cdef inline float32_t _sigmoid(float32_t z) noexcept nogil:
    # Two branches so exp never overflows into inf/inf.
    cdef float32_t e
    if z >= 0:
        return 1.0 / (1.0 + expf(-z))
    e = expf(z)
    return e / (1.0 + e)


# --------------------------------------------------------------------------
# Feature gather

cdef int _gather_features(
    const float32_t[::1] user_vec,           # IN  (d,)
    const float32_t[:, ::1] embeddings,      # IN  (N, d)
    const int32_t[::1] rows,                 # IN  (n,)
    const float32_t[::1] log_popularity,     # IN  (N,)
    const int64_t[::1] created_at_ms,        # IN  (N,)
    int64_t now_ms,                          # IN
    double half_life_days,                   # IN  > 0
    const int32_t[::1] categories,           # IN  (N,)
    const float32_t[::1] category_affinity,  # IN  (C,)
    const float64_t[::1] bandit_alpha,       # IN  (N,)
    const float64_t[::1] bandit_beta,        # IN  (N,)
    const float32_t[:, ::1] source_scores,   # IN  (n, S)
    const uint8_t[::1] source_mask,          # IN  (n,) bitmask, or (0,): flag = score != 0
    const float32_t[::1] context,            # IN  (Fc,)
    float32_t[:, ::1] X,                     # OUT (n, 5 + 2S + Fc)
) noexcept nogil:
    cdef intp_t n = rows.shape[0], N = embeddings.shape[0], d = embeddings.shape[1]
    cdef intp_t S = source_scores.shape[1], Fc = context.shape[0]
    cdef intp_t C = category_affinity.shape[0]
    cdef bint have_mask = source_mask.shape[0] != 0
    cdef intp_t i, s, t
    cdef int32_t r, c, r_next
    cdef int64_t age_ms
    cdef double decay_per_ms = -log(2.0) / (half_life_days * MS_PER_DAY)
    cdef double a, b
    cdef float32_t* x

    if (X.shape[0] != n or X.shape[1] != N_BASE + 2 * S + Fc
            or user_vec.shape[0] != d or source_scores.shape[0] != n
            or (have_mask and source_mask.shape[0] != n)
            or log_popularity.shape[0] != N or created_at_ms.shape[0] != N
            or categories.shape[0] != N or bandit_alpha.shape[0] != N
            or bandit_beta.shape[0] != N):
        return BAD_SHAPE

    for i in range(n):
        r = rows[i]
        if r < 0 or r >= N:
            return ROW_OUT_OF_RANGE
        if i + PREFETCH_AHEAD < n:
            r_next = rows[i + PREFETCH_AHEAD]
            if 0 <= r_next < N:
                for t in range(0, d, 16):      # one 64-byte line per 16 floats
                    RECSVC_PREFETCH(&embeddings[r_next, t])
                RECSVC_PREFETCH(&log_popularity[r_next])
                RECSVC_PREFETCH(&created_at_ms[r_next])
                RECSVC_PREFETCH(&categories[r_next])
                RECSVC_PREFETCH(&bandit_alpha[r_next])
                RECSVC_PREFETCH(&bandit_beta[r_next])
        x = &X[i, 0]
        x[0] = recsvc_dot(&user_vec[0], &embeddings[r, 0], d) if d > 0 else 0
        x[1] = log_popularity[r]
        age_ms = now_ms - created_at_ms[r]
        if age_ms < 0:
            age_ms = 0
        x[2] = <float32_t> exp(<double> age_ms * decay_per_ms)
        c = categories[r]
        x[3] = category_affinity[c] if 0 <= c < C else 0
        a = bandit_alpha[r]
        b = bandit_beta[r]
        x[4] = <float32_t> (a / (a + b)) if a + b > 0 else 0
        for s in range(S):
            x[N_BASE + s] = source_scores[i, s]
            if have_mask:
                x[N_BASE + S + s] = (source_mask[i] >> s) & 1
            else:
                x[N_BASE + S + s] = 1 if source_scores[i, s] != 0 else 0
        for s in range(Fc):
            x[N_BASE + 2 * S + s] = context[s]
    return OK


def gather_features(
    const float32_t[::1] user_vec,
    const float32_t[:, ::1] embeddings,
    const int32_t[::1] rows,
    const float32_t[::1] log_popularity,
    const int64_t[::1] created_at_ms,
    int64_t now_ms,
    double half_life_days,
    const int32_t[::1] categories,
    const float32_t[::1] category_affinity,
    const float64_t[::1] bandit_alpha,
    const float64_t[::1] bandit_beta,
    const float32_t[:, ::1] source_scores,
    const uint8_t[::1] source_mask,
    const float32_t[::1] context,
    float32_t[:, ::1] X,
):
    """Fill X (n, 5 + 2S + Fc) with the candidates' features; see the module
    comment for the column layout."""
    cdef int status
    with nogil:
        status = _gather_features(
            user_vec, embeddings, rows, log_popularity, created_at_ms, now_ms,
            half_life_days, categories, category_affinity, bandit_alpha,
            bandit_beta, source_scores, source_mask, context, X,
        )
    _check(status)


# --------------------------------------------------------------------------
# Models

cdef int _logistic_score(
    const float32_t[:, ::1] X,           # IN  (n, F)
    const float32_t[::1] w,              # IN  (F,)
    float32_t bias,                      # IN
    float32_t[::1] out,                  # OUT (n,)
) noexcept nogil:
    cdef intp_t n = X.shape[0], F = X.shape[1], i
    if w.shape[0] != F or out.shape[0] != n:
        return BAD_SHAPE
    if F == 0:
        for i in range(n):
            out[i] = _sigmoid(bias)
        return OK
    for i in range(n):
        out[i] = _sigmoid(recsvc_dot(&X[i, 0], &w[0], F) + bias)
    return OK


def logistic_score(
    const float32_t[:, ::1] X,
    const float32_t[::1] w,
    float32_t bias,
    float32_t[::1] out,
):
    """out = sigmoid(X @ w + bias)."""
    cdef int status
    with nogil:
        status = _logistic_score(X, w, bias, out)
    _check(status)


cdef int _mlp_score(
    const float32_t[:, ::1] X,           # IN  (n, F)
    const float32_t[:, ::1] W1,          # IN  (F, H1)
    const float32_t[::1] b1,             # IN  (H1,)
    const float32_t[:, ::1] W2,          # IN  (H1, H2), or (0, 0): one hidden layer
    const float32_t[::1] b2,             # IN  (H2,)
    const float32_t[::1] w_out,          # IN  (H,) H = H2 if two hidden layers else H1
    float32_t b_out,                     # IN
    float32_t[::1] h1,                   # SCRATCH (H1,)
    float32_t[::1] h2,                   # SCRATCH (H2,)
    float32_t[::1] out,                  # OUT (n,)
) noexcept nogil:
    cdef intp_t n = X.shape[0], F = X.shape[1], H1 = W1.shape[1], i
    cdef bint two = W2.shape[0] != 0
    cdef intp_t H = W2.shape[1] if two else H1
    cdef const float32_t* x
    cdef float32_t* last
    if (W1.shape[0] != F or b1.shape[0] != H1 or h1.shape[0] != H1 or H1 == 0
            or out.shape[0] != n or w_out.shape[0] != H):
        return BAD_SHAPE
    if two and (W2.shape[0] != H1 or b2.shape[0] != H or h2.shape[0] != H or H == 0):
        return BAD_SHAPE
    last = &h2[0] if two else &h1[0]
    for i in range(n):
        x = &X[i, 0] if F > 0 else <const float32_t*> &h1[0]   # F == 0: loop body never reads x
        recsvc_dense_row(x, F, &W1[0, 0], &b1[0], H1, 1, &h1[0])
        if two:
            recsvc_dense_row(&h1[0], H1, &W2[0, 0], &b2[0], H, 1, &h2[0])
        out[i] = _sigmoid(recsvc_dot(last, &w_out[0], H) + b_out)
    return OK


def mlp_score(
    const float32_t[:, ::1] X,
    const float32_t[:, ::1] W1,
    const float32_t[::1] b1,
    const float32_t[:, ::1] W2,
    const float32_t[::1] b2,
    const float32_t[::1] w_out,
    float32_t b_out,
    float32_t[::1] h1,
    float32_t[::1] h2,
    float32_t[::1] out,
):
    """out = sigmoid(relu(relu(X @ W1 + b1) @ W2 + b2) @ w_out + b_out); pass
    W2 of shape (0, 0) (and empty b2, h2) for a single hidden layer."""
    cdef int status
    with nogil:
        status = _mlp_score(X, W1, b1, W2, b2, w_out, b_out, h1, h2, out)
    _check(status)


cdef int _check(int status) except -1:
    if status == BAD_SHAPE:
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    if status == ROW_OUT_OF_RANGE:
        raise IndexError("ranking kernel: a candidate row is outside the catalog")
    return 0
