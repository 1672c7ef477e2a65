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
#   1  log_popularity     log_popularity[row]  (by_candidate: log_popularity[i], likewise
#                         bandit_alpha and bandit_beta: the request's own per-candidate reads)
#   2  freshness          exp(-ln2 * age_days / half_life_days), age clamped at 0
#   3  category_affinity  category_affinity[categories[row]] (0 if out of range)
#   4  bandit_mean        alpha / (alpha + beta) (0 if alpha + beta <= 0 or NaN)
#   5 .. 5+S-1            source_scores[i, s]
#   5+S .. 5+2S-1         1 if source s proposed the candidate else 0
#   5+2S ..               the request's context features, copied to every row
#
# The extended gather (``gather_extended_features``) writes the same columns and
# then, from B = 5 + 2S + Fc on (names in recsvc.ranking.EXTENDED_FEATURES):
#   B+0   item_norm           |embeddings[row]|
#   B+1   cosine              similarity / (|user_vec| |embeddings[row]|) (0 if either is 0)
#   B+2   cooc_cosine         sum_i w_i c_ij / sqrt(n_i n_j)   over the user's recent items i,
#   B+3   cooc_conditional    sum_i w_i c_ij / n_i             c_ij = co-occurrence count, n = positive
#   B+4   cooc_reverse        sum_i w_i c_ij / n_j             interactions (each at least 1),
#   B+5   cooc_log_count      log1p(sum_i w_i c_ij)            w_i = recency weight
#   B+6   cooc_max_cosine     max_i c_ij / sqrt(n_i n_j)
#   B+7   cooc_support        #{i : c_ij > 0}
#   B+8   recent_max_cosine   max over the R most recent items of cos(embeddings[row], recent)
#   B+9   recent_mean_cosine  mean of the same (0 when R = 0)
#   B+10  user_activity       the request's log1p(positive interactions of the user)
#   B+11  log_item_count      log1p(n_j)
#   B+12  profile_cosine      profile . embeddings[row] / |embeddings[row]| (profile: unit-norm or 0)
#   B+13 .. B+13+S-1          rank_<source>: 0-based rank by that source's score among the
#                             candidates it proposed (ties: candidate order); n when it did not
#   B+13+S                    log_age_days: sign(age) * log1p(|age| in days), age = now - created
#
# Dot products and dense layers run in SIMD C (below); their summation order
# differs from numpy's, so the twin in twins/ranking.py matches to float32
# rounding, not bit for bit.

from libc.math cimport exp, expf, log, log1p, sqrt

from recsvc._fastpath._typedefs cimport (
    float32_t, float64_t, int32_t, int64_t, intp_t, uint8_t, uint32_t, uint64_t,
)

cdef enum:
    N_BASE = 5          # columns before the per-source features
    PREFETCH_AHEAD = 8  # candidates: catalog rows are random, so fetch early
    N_EXT_FIXED = 13    # extended columns before the per-source ranks
    MAX_FOREST_DEPTH = 12

cdef double MS_PER_DAY = 86400000.0


cdef enum Status:
    OK = 0
    BAD_SHAPE = 1          # arrays disagree on n, N, d, S or F
    ROW_OUT_OF_RANGE = 2   # a candidate row outside [0, N)
    BAD_FOREST = 3         # a tree refers to a column outside X, or the depth is out of range
    DUPLICATE_ROW = 4      # two candidates share a catalog row (extended gather)


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


    /* out[i] = bias + sum over trees (in order) of the leaf row i reaches.
       Every tree is complete, of depth `depth`: node k's children are 2k+1
       (x <= threshold) and 2k+2 (x > threshold), leaves follow the
       2^depth - 1 inner nodes. The walk is branch-free. Sixteen rows walk
       each tree together so that their dependent loads overlap (more rows
       spill the walk's state out of the registers), the root, which every
       row tests, is read once per tree instead of once per row, and the
       usual depths get their own copy of the walk with the depth a constant
       (the level loop unrolled). */
    #define RECSVC_WALK_ROWS 16
    static inline __attribute__((always_inline)) void
    recsvc_forest_walk(const float *restrict X, ptrdiff_t n, ptrdiff_t F,
                       const int *restrict feature, const float *restrict threshold,
                       const float *restrict leaf, ptrdiff_t n_trees, const int depth,
                       float bias, float *restrict out)
    {
        const ptrdiff_t inner = ((ptrdiff_t)1 << depth) - 1, stride_leaf = inner + 1;
        ptrdiff_t i = 0, t, r;
        int d;
        for (; i + RECSVC_WALK_ROWS <= n; i += RECSVC_WALK_ROWS) {
            const float *x = X + i * F;
            float a[RECSVC_WALK_ROWS];
            for (r = 0; r < RECSVC_WALK_ROWS; r++)
                a[r] = bias;
            for (t = 0; t < n_trees; t++) {
                const int *f = feature + t * inner;
                const float *h = threshold + t * inner;
                const float *l = leaf + t * stride_leaf - inner;
                ptrdiff_t k[RECSVC_WALK_ROWS];
                if (depth > 0) {
                    const int f0 = f[0];
                    const float h0 = h[0];
                    for (r = 0; r < RECSVC_WALK_ROWS; r++)
                        k[r] = 1 + (x[r * F + f0] > h0);
                } else {
                    for (r = 0; r < RECSVC_WALK_ROWS; r++)
                        k[r] = 0;
                }
                for (d = 1; d < depth; d++)
                    for (r = 0; r < RECSVC_WALK_ROWS; r++)
                        k[r] = 2 * k[r] + 1 + (x[r * F + f[k[r]]] > h[k[r]]);
                for (r = 0; r < RECSVC_WALK_ROWS; r++)
                    a[r] += l[k[r]];
            }
            for (r = 0; r < RECSVC_WALK_ROWS; r++)
                out[i + r] = a[r];
        }
        for (; i < n; i++) {
            const float *x = X + i * F;
            float a = bias;
            for (t = 0; t < n_trees; t++) {
                const int *f = feature + t * inner;
                const float *h = threshold + t * inner;
                ptrdiff_t k = 0;
                for (d = 0; d < depth; d++)
                    k = 2 * k + 1 + (x[f[k]] > h[k]);
                a += leaf[t * stride_leaf + k - inner];
            }
            out[i] = a;
        }
    }

    RECSVC_CLONES
    static void recsvc_forest_rows(const float *restrict X, ptrdiff_t n, ptrdiff_t F,
                                   const int *restrict feature, const float *restrict threshold,
                                   const float *restrict leaf, ptrdiff_t n_trees, int depth,
                                   float bias, float *restrict out)
    {
        switch (depth) {
    #define RECSVC_WALK_DEPTH(D) \
        case D: recsvc_forest_walk(X, n, F, feature, threshold, leaf, n_trees, D, bias, out); break;
        RECSVC_WALK_DEPTH(3) RECSVC_WALK_DEPTH(4) RECSVC_WALK_DEPTH(5) RECSVC_WALK_DEPTH(6)
        RECSVC_WALK_DEPTH(7) RECSVC_WALK_DEPTH(8)
    #undef RECSVC_WALK_DEPTH
        default: recsvc_forest_walk(X, n, F, feature, threshold, leaf, n_trees, depth, bias, out);
        }
    }


    /* Sort a[0..n) ascending: quicksort (median of three), insertion sort below 16. */
    static void recsvc_sort_u64(unsigned long long *a, ptrdiff_t n)
    {
        while (n > 16) {
            ptrdiff_t mid = n / 2, i = 0, j = n - 1;
            unsigned long long p, t;
            if (a[mid] < a[0]) { t = a[mid]; a[mid] = a[0]; a[0] = t; }
            if (a[n - 1] < a[0]) { t = a[n - 1]; a[n - 1] = a[0]; a[0] = t; }
            if (a[n - 1] < a[mid]) { t = a[n - 1]; a[n - 1] = a[mid]; a[mid] = t; }
            p = a[mid];
            for (;;) {
                while (a[i] < p) i++;
                while (p < a[j]) j--;
                if (i >= j) break;
                t = a[i]; a[i] = a[j]; a[j] = t;
                i++; j--;
            }
            /* [0, j] <= p <= [j + 1, n): recurse into the smaller side, loop on the larger */
            if (j + 1 < n - j - 1) {
                recsvc_sort_u64(a, j + 1);
                a += j + 1;
                n -= j + 1;
            } else {
                recsvc_sort_u64(a + j + 1, n - j - 1);
                n = j + 1;
            }
        }
        for (ptrdiff_t i = 1; i < n; i++) {
            unsigned long long v = a[i];
            ptrdiff_t j = i;
            while (j > 0 && a[j - 1] > v) { a[j] = a[j - 1]; j--; }
            a[j] = v;
        }
    }


    /* A float's bits as an unsigned key that sorts like the float. */
    static inline unsigned int recsvc_float_key(float v)
    {
        union { float f; unsigned int u; } c;
        c.f = v;
        return (c.u & 0x80000000u) ? ~c.u : (c.u | 0x80000000u);
    }
    """
    void RECSVC_PREFETCH(const void* p) noexcept nogil
    float32_t recsvc_dot(const float32_t* a, const float32_t* b, intp_t n) noexcept nogil
    void recsvc_dense_row(const float32_t* x, intp_t n_in, const float32_t* W, const float32_t* b,
                          intp_t n_out, int relu, float32_t* y) noexcept nogil
    void recsvc_forest_rows(const float32_t* X, intp_t n, intp_t F, const int32_t* feature,
                            const float32_t* threshold, const float32_t* leaf, intp_t n_trees, int depth,
                            float32_t bias, float32_t* out) noexcept nogil
    uint32_t recsvc_float_key(float32_t v) noexcept nogil
    void recsvc_sort_u64(uint64_t* a, intp_t n) noexcept nogil


cdef inline float32_t _sigmoid(float32_t z) noexcept nogil:
    # Two branches so exp never overflows into inf/inf.
    cdef float32_t e
    if z >= 0:
        return 1.0 / (1.0 + expf(-z))
    e = expf(z)
    return e / (1.0 + e)


# --------------------------------------------------------------------------
# Feature gather

cdef inline bint _shapes_ok(
    const float32_t[::1] user_vec, const float32_t[:, ::1] embeddings, const int32_t[::1] rows,
    const float32_t[::1] log_popularity, const int64_t[::1] created_at_ms, const int32_t[::1] categories,
    const float64_t[::1] bandit_alpha, const float64_t[::1] bandit_beta,
    const float32_t[:, ::1] source_scores, const uint8_t[::1] source_mask, bint by_candidate,
) noexcept nogil:
    cdef intp_t n = rows.shape[0], N = embeddings.shape[0]
    cdef intp_t E = n if by_candidate else N  # entries of log_popularity, bandit_alpha, bandit_beta
    return not (user_vec.shape[0] != embeddings.shape[1] or source_scores.shape[0] != n
                or (source_mask.shape[0] != 0 and source_mask.shape[0] != n)
                or log_popularity.shape[0] != E or created_at_ms.shape[0] != N
                or categories.shape[0] != N or bandit_alpha.shape[0] != E
                or bandit_beta.shape[0] != E)


cdef inline void _prefetch_row(
    int32_t r, intp_t N, intp_t d, const float32_t[:, ::1] embeddings,
    const float32_t[::1] log_popularity, const int64_t[::1] created_at_ms, const int32_t[::1] categories,
    const float64_t[::1] bandit_alpha, const float64_t[::1] bandit_beta, bint by_candidate,
) noexcept nogil:
    cdef intp_t t
    if 0 <= r < N:
        for t in range(0, d, 16):      # one 64-byte line per 16 floats
            RECSVC_PREFETCH(&embeddings[r, t])
        RECSVC_PREFETCH(&created_at_ms[r])
        RECSVC_PREFETCH(&categories[r])
        if not by_candidate:           # (by candidate: read in order)
            RECSVC_PREFETCH(&log_popularity[r])
            RECSVC_PREFETCH(&bandit_alpha[r])
            RECSVC_PREFETCH(&bandit_beta[r])


cdef inline void _base_row(
    float32_t* x,                            # OUT (5 + 2S + Fc,) one row of X
    intp_t i, int32_t r,                     # IN  candidate index, its (checked) row
    intp_t e,                                # IN  where its log_popularity and bandit evidence are (i or r)
    const float32_t[::1] user_vec,
    const float32_t[:, ::1] embeddings,
    const float32_t[::1] log_popularity,
    const int64_t[::1] created_at_ms,
    int64_t now_ms,
    double decay_per_ms,
    const int32_t[::1] categories,
    const float32_t[::1] category_affinity,
    const float64_t[::1] bandit_alpha,
    const float64_t[::1] bandit_beta,
    const float32_t[:, ::1] source_scores,
    const uint8_t[::1] source_mask,
    const float32_t[::1] context,
) noexcept nogil:
    cdef intp_t d = embeddings.shape[1], S = source_scores.shape[1], Fc = context.shape[0]
    cdef intp_t C = category_affinity.shape[0], s
    cdef bint have_mask = source_mask.shape[0] != 0
    cdef int64_t age_ms
    cdef int32_t c
    cdef double a, b
    x[0] = recsvc_dot(&user_vec[0], &embeddings[r, 0], d) if d > 0 else 0
    x[1] = log_popularity[e]
    age_ms = now_ms - created_at_ms[r]
    if age_ms < 0:
        age_ms = 0
    x[2] = <float32_t> exp(<double> age_ms * decay_per_ms)
    c = categories[r]
    x[3] = category_affinity[c] if 0 <= c < C else 0
    a = bandit_alpha[e]
    b = bandit_beta[e]
    x[4] = <float32_t> (a / (a + b)) if a + b > 0 else 0
    for s in range(S):
        x[N_BASE + s] = source_scores[i, s]
        if have_mask:
            x[N_BASE + S + s] = (source_mask[i] >> s) & 1
        else:
            x[N_BASE + S + s] = 1 if source_scores[i, s] != 0 else 0
    for s in range(Fc):
        x[N_BASE + 2 * S + s] = context[s]


cdef int _gather_features(
    const float32_t[::1] user_vec,           # IN  (d,)
    const float32_t[:, ::1] embeddings,      # IN  (N, d)
    const int32_t[::1] rows,                 # IN  (n,)
    const float32_t[::1] log_popularity,     # IN  (N,), or (n,) by_candidate
    const int64_t[::1] created_at_ms,        # IN  (N,)
    int64_t now_ms,                          # IN
    double half_life_days,                   # IN  > 0
    const int32_t[::1] categories,           # IN  (N,)
    const float32_t[::1] category_affinity,  # IN  (C,)
    const float64_t[::1] bandit_alpha,       # IN  (N,), or (n,) by_candidate
    const float64_t[::1] bandit_beta,        # IN  (N,), or (n,) by_candidate
    const float32_t[:, ::1] source_scores,   # IN  (n, S)
    const uint8_t[::1] source_mask,          # IN  (n,) bitmask, or (0,): flag = score != 0
    const float32_t[::1] context,            # IN  (Fc,)
    bint by_candidate,                       # IN  log_popularity, bandit_*: (n,) by candidate, not (N,)
    float32_t[:, ::1] X,                     # OUT (n, 5 + 2S + Fc)
) noexcept nogil:
    cdef intp_t n = rows.shape[0], N = embeddings.shape[0], d = embeddings.shape[1]
    cdef intp_t S = source_scores.shape[1], Fc = context.shape[0]
    cdef intp_t i
    cdef int32_t r
    cdef double decay_per_ms = -log(2.0) / (half_life_days * MS_PER_DAY)

    if (X.shape[0] != n or X.shape[1] != N_BASE + 2 * S + Fc
            or not _shapes_ok(user_vec, embeddings, rows, log_popularity, created_at_ms, categories,
                              bandit_alpha, bandit_beta, source_scores, source_mask, by_candidate)):
        return BAD_SHAPE

    for i in range(n):
        r = rows[i]
        if r < 0 or r >= N:
            return ROW_OUT_OF_RANGE
        if i + PREFETCH_AHEAD < n:
            _prefetch_row(rows[i + PREFETCH_AHEAD], N, d, embeddings, log_popularity, created_at_ms,
                          categories, bandit_alpha, bandit_beta, by_candidate)
        _base_row(&X[i, 0], i, r, i if by_candidate else r, user_vec, embeddings, log_popularity,
                  created_at_ms, now_ms, decay_per_ms, categories, category_affinity, bandit_alpha, bandit_beta,
                  source_scores, source_mask, context)
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
    bint by_candidate,
    float32_t[:, ::1] X,
):
    """Fill X (n, 5 + 2S + Fc) with the candidates' features; see the module
    comment for the column layout."""
    cdef int status
    with nogil:
        status = _gather_features(
            user_vec, embeddings, rows, log_popularity, created_at_ms, now_ms,
            half_life_days, categories, category_affinity, bandit_alpha,
            bandit_beta, source_scores, source_mask, context, by_candidate, X,
        )
    _check(status)


cdef inline intp_t _slot(const int32_t* keys, int bits, int32_t row) noexcept nogil:
    """Where ``row`` is in the open-addressing table, or the empty slot where it goes (Fibonacci
    hashing, linear probing; the table is at least twice the keys, so the probe ends)."""
    cdef intp_t mask = (<intp_t> 1 << bits) - 1
    cdef intp_t h = <intp_t> ((<uint64_t> (<uint32_t> row) * 11400714819323198485ULL) >> (64 - bits))
    while keys[h] != -1 and keys[h] != row:
        h = (h + 1) & mask
    return h


cdef int _gather_extended(
    const float32_t[::1] user_vec,           # IN  (d,)
    const float32_t[:, ::1] embeddings,      # IN  (N, d)
    const int32_t[::1] rows,                 # IN  (n,)
    const float32_t[::1] log_popularity,     # IN  (N,), or (n,) by_candidate
    const int64_t[::1] created_at_ms,        # IN  (N,)
    int64_t now_ms,                          # IN
    double half_life_days,                   # IN  > 0
    const int32_t[::1] categories,           # IN  (N,)
    const float32_t[::1] category_affinity,  # IN  (C,)
    const float64_t[::1] bandit_alpha,       # IN  (N,), or (n,) by_candidate
    const float64_t[::1] bandit_beta,        # IN  (N,), or (n,) by_candidate
    const float32_t[:, ::1] source_scores,   # IN  (n, S)
    const uint8_t[::1] source_mask,          # IN  (n,) bitmask, or (0,): flag = score != 0
    const float32_t[::1] context,            # IN  (Fc,)
    bint by_candidate,                       # IN  log_popularity, bandit_*: (n,) by candidate, not (N,)
    const int32_t[::1] item_rows,            # IN  (n,) catalog row of each candidate, distinct
    const float32_t[::1] item_counts,        # IN  (n,) n_j: positive interactions of each candidate
    const int32_t[::1] nb_rows,              # IN  (M,) co-occurrence neighbours (catalog rows)
    const float32_t[::1] nb_counts,          # IN  (M,) c_ij of each neighbour
    const int32_t[::1] nb_owner,             # IN  (M,) i: the recent item each neighbour belongs to
    const float32_t[::1] recent_weights,     # IN  (W,) w_i
    const float32_t[::1] recent_counts,      # IN  (W,) n_i
    const float32_t[:, ::1] recent_emb,      # IN  (R, d) unit-norm embeddings of the R most recent items
    const float32_t[::1] profile,            # IN  (d,) unit-norm history profile, or zeros
    double user_interactions,                # IN  the user's positive interactions
    uint64_t[::1] keys,                      # SCRATCH (n,)
    int32_t[::1] slots,                      # SCRATCH (2 * 2^bits,) with 2^bits >= 2n: row -> candidate
    float32_t[:, ::1] X,                     # OUT (n, 5 + 2S + Fc + 14 + S)
) noexcept nogil:
    cdef intp_t n = rows.shape[0], N = embeddings.shape[0], d = embeddings.shape[1]
    cdef intp_t S = source_scores.shape[1], Fc = context.shape[0]
    cdef intp_t B = N_BASE + 2 * S + Fc, R = recent_emb.shape[0], M = nb_rows.shape[0]
    cdef intp_t W = recent_weights.shape[0]
    cdef bint have_mask = source_mask.shape[0] != 0
    cdef intp_t i, k, m, s, q, count
    cdef int32_t r, o
    cdef double decay_per_ms = -log(2.0) / (half_life_days * MS_PER_DAY)
    cdef double user_norm, norm, sim, best, total, age, n_i, n_j, c, cos_ij
    cdef double activity = log1p(user_interactions if user_interactions > 0 else 0.0)
    cdef float32_t* x
    cdef bint proposed
    cdef int bits = 4
    cdef intp_t size, h
    cdef int32_t* slot_rows
    cdef int32_t* slot_index

    if (X.shape[0] != n or X.shape[1] != B + N_EXT_FIXED + S + 1
            or not _shapes_ok(user_vec, embeddings, rows, log_popularity, created_at_ms, categories,
                              bandit_alpha, bandit_beta, source_scores, source_mask, by_candidate)
            or item_rows.shape[0] != n or item_counts.shape[0] != n
            or nb_counts.shape[0] != M or nb_owner.shape[0] != M or recent_counts.shape[0] != W
            or (R > 0 and recent_emb.shape[1] != d) or keys.shape[0] != n or profile.shape[0] != d):
        return BAD_SHAPE
    while (<intp_t> 1 << bits) < 2 * n:
        bits += 1
    size = <intp_t> 1 << bits
    if slots.shape[0] < 2 * size:
        return BAD_SHAPE
    slot_rows = &slots[0]
    slot_index = &slots[size]
    for h in range(size):
        slot_rows[h] = -1
    for i in range(n):
        h = _slot(slot_rows, bits, item_rows[i])
        if slot_rows[h] != -1:
            return DUPLICATE_ROW
        slot_rows[h] = item_rows[i]
        slot_index[h] = <int32_t> i
    for m in range(M):
        if nb_owner[m] < 0 or nb_owner[m] >= W:
            return BAD_SHAPE

    user_norm = sqrt(recsvc_dot(&user_vec[0], &user_vec[0], d)) if d > 0 else 0.0
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= N:
            return ROW_OUT_OF_RANGE
        if i + PREFETCH_AHEAD < n:
            _prefetch_row(rows[i + PREFETCH_AHEAD], N, d, embeddings, log_popularity, created_at_ms,
                          categories, bandit_alpha, bandit_beta, by_candidate)
        x = &X[i, 0]
        _base_row(x, i, r, i if by_candidate else r, user_vec, embeddings, log_popularity,
                  created_at_ms, now_ms, decay_per_ms, categories, category_affinity, bandit_alpha, bandit_beta,
                  source_scores, source_mask, context)
        x += B
        norm = sqrt(recsvc_dot(&embeddings[r, 0], &embeddings[r, 0], d)) if d > 0 else 0.0
        x[0] = <float32_t> norm
        x[1] = <float32_t> (x[-B] / (user_norm * norm)) if user_norm > 0 and norm > 0 else 0
        for k in range(2, 8):
            x[k] = 0
        best = 0.0
        total = 0.0
        if norm > 0:
            for q in range(R):
                sim = recsvc_dot(&embeddings[r, 0], &recent_emb[q, 0], d) / norm
                total += sim
                if q == 0 or sim > best:
                    best = sim
        x[8] = <float32_t> best
        x[9] = <float32_t> (total / R) if R > 0 else 0
        x[10] = <float32_t> activity
        x[11] = <float32_t> log1p(item_counts[i] if item_counts[i] > 0 else 0.0)
        x[12] = <float32_t> (recsvc_dot(&profile[0], &embeddings[r, 0], d) / norm) if norm > 0 else 0
        age = <double> (now_ms - created_at_ms[r]) / MS_PER_DAY
        x[N_EXT_FIXED + S] = <float32_t> (log1p(age) if age >= 0 else -log1p(-age))

    # co-occurrence with the recent items, one neighbour entry at a time
    for m in range(M):
        h = _slot(slot_rows, bits, nb_rows[m])
        c = nb_counts[m]
        if slot_rows[h] == -1 or not c > 0:
            continue
        k = slot_index[h]
        o = nb_owner[m]
        n_i = recent_counts[o] if recent_counts[o] > 1 else 1.0
        n_j = item_counts[k] if item_counts[k] > 1 else 1.0
        cos_ij = c / sqrt(n_i * n_j)
        x = &X[k, B]
        x[2] += <float32_t> (recent_weights[o] * cos_ij)
        x[3] += <float32_t> (recent_weights[o] * c / n_i)
        x[4] += <float32_t> (recent_weights[o] * c / n_j)
        x[5] += <float32_t> (recent_weights[o] * c)
        if <float32_t> cos_ij > x[6]:
            x[6] = <float32_t> cos_ij
        x[7] += 1
    for i in range(n):
        X[i, B + 5] = <float32_t> log1p(X[i, B + 5] if X[i, B + 5] > 0 else 0.0)

    # each source's rank: sort (descending score, ascending index) keys
    for s in range(S):
        count = 0
        for i in range(n):
            proposed = ((source_mask[i] >> s) & 1) if have_mask else source_scores[i, s] != 0
            if proposed:
                keys[count] = ((<uint64_t> (~recsvc_float_key(source_scores[i, s]))) << 32) | <uint64_t> i
                count += 1
            X[i, B + N_EXT_FIXED + s] = <float32_t> n
        recsvc_sort_u64(&keys[0], count)
        for q in range(count):
            X[<intp_t> (keys[q] & 0xFFFFFFFFu), B + N_EXT_FIXED + s] = <float32_t> q
    return OK


def gather_extended_features(
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
    bint by_candidate,
    const int32_t[::1] item_rows,
    const float32_t[::1] item_counts,
    const int32_t[::1] nb_rows,
    const float32_t[::1] nb_counts,
    const int32_t[::1] nb_owner,
    const float32_t[::1] recent_weights,
    const float32_t[::1] recent_counts,
    const float32_t[:, ::1] recent_emb,
    const float32_t[::1] profile,
    double user_interactions,
    uint64_t[::1] keys,
    int32_t[::1] slots,
    float32_t[:, ::1] X,
):
    """Fill X (n, 5 + 2S + Fc + 14 + S): the base columns, then the extended
    ones; see the module comment for the layout."""
    cdef int status
    with nogil:
        status = _gather_extended(
            user_vec, embeddings, rows, log_popularity, created_at_ms, now_ms,
            half_life_days, categories, category_affinity, bandit_alpha,
            bandit_beta, source_scores, source_mask, context, by_candidate, item_rows,
            item_counts, nb_rows, nb_counts, nb_owner, recent_weights, recent_counts,
            recent_emb, profile, user_interactions, keys, slots, X,
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


cdef int _forest_score(
    const float32_t[:, ::1] X,           # IN  (n, F)
    const int32_t[::1] feature,          # IN  (T * (2^depth - 1),) column of X tested at each inner node
    const float32_t[::1] threshold,      # IN  (T * (2^depth - 1),) go right when x > threshold
    const float32_t[::1] leaf,           # IN  (T * 2^depth,) leaf values, tree after tree
    int depth,                           # IN  0 .. MAX_FOREST_DEPTH, the same for every tree
    float32_t bias,                      # IN
    float32_t[::1] out,                  # OUT (n,)
) noexcept nogil:
    cdef intp_t n = X.shape[0], F = X.shape[1], i, inner, T
    if depth < 0 or depth > MAX_FOREST_DEPTH:
        return BAD_FOREST
    inner = (1 << depth) - 1
    T = leaf.shape[0] >> depth
    if (out.shape[0] != n or feature.shape[0] != T * inner or threshold.shape[0] != T * inner
            or leaf.shape[0] != T * (inner + 1)):
        return BAD_SHAPE
    for i in range(T * inner):
        if feature[i] < 0 or feature[i] >= F:
            return BAD_FOREST
    if n == 0:
        return OK
    recsvc_forest_rows(&X[0, 0], n, F, &feature[0] if T * inner > 0 else <const int32_t*> NULL,
                       &threshold[0] if T * inner > 0 else <const float32_t*> NULL,
                       &leaf[0] if T > 0 else <const float32_t*> NULL, T, depth, bias, &out[0])
    for i in range(n):
        out[i] = _sigmoid(out[i])
    return OK


def forest_score(
    const float32_t[:, ::1] X,
    const int32_t[::1] feature,
    const float32_t[::1] threshold,
    const float32_t[::1] leaf,
    int depth,
    float32_t bias,
    float32_t[::1] out,
):
    """out = sigmoid(bias + sum of the complete trees' leaves); see recsvc_forest_rows."""
    cdef int status
    with nogil:
        status = _forest_score(X, feature, threshold, leaf, depth, bias, out)
    _check(status)


cdef int _check(int status) except -1:
    if status == BAD_SHAPE:
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    if status == ROW_OUT_OF_RANGE:
        raise IndexError("ranking kernel: a candidate row is outside the catalog")
    if status == DUPLICATE_ROW:
        raise ValueError("ranking kernel: extended.item_rows must be distinct (one entry per candidate)")
    if status == BAD_FOREST:
        raise ValueError("ranking kernel: a tree tests a column outside X or its depth is out of range")
    return 0
