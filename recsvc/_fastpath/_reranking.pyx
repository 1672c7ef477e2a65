# Re-ranking selection kernels: greedy selection under per-category quotas, and
# maximal marginal relevance (MMR) with the same quotas.
#
# recsvc.reranking prepares the candidate pool (filters, boosts, reserved slots),
# allocates outputs and scratch, and fills the remainder when quotas cannot fill
# the slate; these kernels only select.
#
# Conventions shared with the twin (twins/reranking.py):
#   * candidates are indices 0..m-1 into the pool arrays;
#   * a negative category is "uncategorised" and never limited by a quota;
#     ``max_per_category <= 0`` turns quotas off;
#   * ``counts`` comes in holding what is already in the slate per category
#     (e.g. pinned items) and goes out updated;
#   * MMR picks argmax (1 - lam) * score[i] - lam * max_sim[i], ties to the
#     lowest index; ``max_sim`` is the max cosine similarity to anything already
#     in the slate, -inf meaning "nothing yet" (the penalty is then 0). The
#     kernel reads each candidate's embedding as ``emb[emb_rows[i]]`` (so the
#     caller need not copy them out of the catalog) and normalises it.
#
# Return value: the number of items written to ``out`` (>= 0), or a negative
# status (the ``def`` wrapper raises).

from libc.math cimport INFINITY

from recsvc._fastpath._typedefs cimport float32_t, int32_t, intp_t, uint8_t


# The similarity update in C: GCC/Clang vector extensions, compiled twice on
# x86-64 Linux (baseline and x86-64-v3: AVX2 + FMA, picked at load time), as in
# _ranking.pyx.
cdef extern from *:
    """
    #include <math.h>
    #include "_simd.h"


    /* ET (d, m) = the rows emb[rows[i]] scaled to unit norm (zero rows stay
       zero), transposed. The caller has checked every rows[i] is in range. Blocks of 16 candidates: the 16 source rows stay in
       L1 while each ET row receives one full cache line per block. */
    static void recsvc_unit_transpose(const float *restrict emb, ptrdiff_t d,
                                      const int *restrict rows, ptrdiff_t m,
                                      float *restrict ET)
    {
        ptrdiff_t i0, b, nb, t;
        const float *src[16];
        float inv[16];
        for (i0 = 0; i0 < m; i0 += 16) {
            nb = m - i0 < 16 ? m - i0 : 16;
    #if defined(__GNUC__) || defined(__clang__)
            /* catalog rows are random: start fetching the next block now */
            for (b = 0; b < 16 && i0 + 16 + b < m; b++)
                for (t = 0; t < d; t += 16)
                    __builtin_prefetch(emb + (ptrdiff_t)rows[i0 + 16 + b] * d + t, 0, 1);
    #endif
            for (b = 0; b < nb; b++) {
                float ss;
                src[b] = emb + (ptrdiff_t)rows[i0 + b] * d;
                ss = recsvc_dot(src[b], src[b], d);
                inv[b] = ss > 0.0f ? (float)(1.0 / sqrt((double)ss)) : 0.0f;
            }
            for (t = 0; t < d; t++) {
                float *dst = ET + t * m + i0;
                for (b = 0; b < nb; b++)
                    dst[b] = src[b][t] * inv[b];
            }
        }
    }

    /* max_sim[i] = max(max_sim[i], sum_t e[t] * ET[t, i]) for the m candidates;
       ET is the (d, m) transpose of the candidates' embeddings. Candidates go
       in blocks of 32 whose partial sums stay in registers over all d. */
    RECSVC_CLONES
    static void recsvc_update_max_sim(const float *restrict ET, ptrdiff_t d, ptrdiff_t m,
                                      const float *restrict e, float *restrict max_sim)
    {
        ptrdiff_t i = 0, t, q;
    #if RECSVC_SIMD
        float tmp[32];
        for (; i + 32 <= m; i += 32) {
            recsvc_v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (t = 0; t < d; t++) {
                const float *col = ET + t * m + i;
                float et = e[t];
                a0 += et * RECSVC_LD(col);
                a1 += et * RECSVC_LD(col + 8);
                a2 += et * RECSVC_LD(col + 16);
                a3 += et * RECSVC_LD(col + 24);
            }
            RECSVC_ST(tmp, a0);
            RECSVC_ST(tmp + 8, a1);
            RECSVC_ST(tmp + 16, a2);
            RECSVC_ST(tmp + 24, a3);
            for (q = 0; q < 32; q++)
                max_sim[i + q] = tmp[q] > max_sim[i + q] ? tmp[q] : max_sim[i + q];
        }
        for (; i + 8 <= m; i += 8) {
            recsvc_v8 a0 = {0};
            for (t = 0; t < d; t++)
                a0 += e[t] * RECSVC_LD(ET + t * m + i);
            RECSVC_ST(tmp, a0);
            for (q = 0; q < 8; q++)
                max_sim[i + q] = tmp[q] > max_sim[i + q] ? tmp[q] : max_sim[i + q];
        }
    #endif
        for (; i < m; i++) {
            float s = 0.0f;
            for (t = 0; t < d; t++)
                s += e[t] * ET[t * m + i];
            max_sim[i] = s > max_sim[i] ? s : max_sim[i];
        }
    }
    """
    float32_t recsvc_dot(const float32_t* a, const float32_t* b, intp_t n) noexcept nogil
    void recsvc_unit_transpose(const float32_t* emb, intp_t d, const int32_t* rows, intp_t m,
                               float32_t* ET) noexcept nogil
    void recsvc_update_max_sim(const float32_t* ET, intp_t d, intp_t m, const float32_t* e,
                               float32_t* max_sim) noexcept nogil


cdef enum Status:
    BAD_SHAPE = -1        # arrays disagree on m, d, k or C
    BAD_INDEX = -2        # an order entry outside [0, m), or an embedding row outside [0, R)


# Quota bookkeeping on raw pointers (a memoryview argument to an inline
# function would be reference-counted on every call).
cdef inline bint _at_quota(int32_t c, int32_t max_per_category, const int32_t* counts, intp_t C) noexcept nogil:
    return max_per_category > 0 and c >= 0 and c < C and counts[c] >= max_per_category


cdef inline void _count(int32_t c, int32_t* counts, intp_t C) noexcept nogil:
    if c >= 0 and c < C:
        counts[c] += 1


# --------------------------------------------------------------------------
# Greedy selection with quotas

cdef intp_t _select_with_quotas(
    const int32_t[::1] order,            # IN  (L,) candidate indices, best first
    const int32_t[::1] categories,       # IN  (m,) category per candidate
    int32_t max_per_category,            # IN  <= 0: no quota
    intp_t k,                            # IN  items wanted
    int32_t[::1] counts,                 # IN/OUT (C,) items per category already in the slate
    int32_t[::1] out,                    # OUT (>= k,) chosen candidate indices, in slate order
) noexcept nogil:
    cdef intp_t m = categories.shape[0], C = counts.shape[0], j, count = 0
    cdef int32_t idx, c
    cdef int32_t* cnt = &counts[0] if C > 0 else NULL
    if k > out.shape[0] or k < 0:
        return BAD_SHAPE
    for j in range(order.shape[0]):
        if count >= k:
            break
        idx = order[j]
        if idx < 0 or idx >= m:
            return BAD_INDEX
        c = categories[idx]
        if _at_quota(c, max_per_category, cnt, C):
            continue
        _count(c, cnt, C)
        out[count] = idx
        count += 1
    return count


def select_with_quotas(
    const int32_t[::1] order,
    const int32_t[::1] categories,
    int32_t max_per_category,
    intp_t k,
    int32_t[::1] counts,
    int32_t[::1] out,
):
    """Walk ``order`` and keep each candidate whose category is under quota,
    until ``k`` are kept; returns how many were written to ``out``."""
    cdef intp_t count
    with nogil:
        count = _select_with_quotas(order, categories, max_per_category, k, counts, out)
    return _check(count)


# --------------------------------------------------------------------------
# MMR with quotas

cdef intp_t _mmr_select(
    const float32_t[::1] scores,         # IN  (m,) relevance
    const float32_t[:, ::1] emb,         # IN  (R, d) embeddings; normalised here, zero rows stay zero
    const int32_t[::1] emb_rows,         # IN  (m,) row of emb holding each candidate's embedding
    double lam,                          # IN  0: pure relevance, 1: pure diversity
    intp_t k,                            # IN  items wanted
    const int32_t[::1] categories,       # IN  (m,)
    int32_t max_per_category,            # IN  <= 0: no quota
    int32_t[::1] counts,                 # IN/OUT (C,) items per category already in the slate
    float32_t[::1] max_sim,              # IN/OUT (m,) max cosine similarity to the slate; -inf: none yet
    float32_t[:, ::1] emb_t,             # SCRATCH (d, m) unit-norm candidate embeddings, transposed
    float32_t[::1] vec,                  # SCRATCH (d,)
    uint8_t[::1] taken,                  # SCRATCH (m,)
    int32_t[::1] out,                    # OUT (>= k,) chosen candidate indices, in slate order
) noexcept nogil:
    cdef intp_t m = scores.shape[0], R = emb.shape[0], d = emb.shape[1], C = counts.shape[0]
    cdef intp_t i, t, step, best, count = 0
    cdef int32_t r
    cdef int32_t* cnt = &counts[0] if C > 0 else NULL
    cdef double val, best_val, pen
    if (emb_rows.shape[0] != m or categories.shape[0] != m or max_sim.shape[0] != m
            or taken.shape[0] != m or emb_t.shape[0] != d or emb_t.shape[1] != m
            or vec.shape[0] != d or k > out.shape[0] or k < 0):
        return BAD_SHAPE
    if k == 0 or m == 0:
        return 0

    for i in range(m):
        r = emb_rows[i]
        if r < 0 or r >= R:
            return BAD_INDEX
        taken[i] = 0
    # Gather, normalise and transpose once, so that each similarity update is
    # a register-blocked pass over contiguous memory (recsvc_update_max_sim).
    if d > 0:
        recsvc_unit_transpose(&emb[0, 0], d, &emb_rows[0], m, &emb_t[0, 0])

    for step in range(k):
        best = -1
        best_val = -INFINITY
        for i in range(m):
            if taken[i] or _at_quota(categories[i], max_per_category, cnt, C):
                continue
            pen = max_sim[i] if max_sim[i] != -INFINITY else 0.0
            val = (1.0 - lam) * scores[i] - lam * pen
            if best < 0 or val > best_val:
                best = i
                best_val = val
        if best < 0:
            break
        out[count] = <int32_t> best
        count += 1
        taken[best] = 1
        _count(categories[best], cnt, C)
        if step + 1 == k:
            break
        # max_sim = max(max_sim, unit_emb @ unit_emb[best]): O(m * d) per chosen item.
        if d > 0:
            for t in range(d):
                vec[t] = emb_t[t, best]
            recsvc_update_max_sim(&emb_t[0, 0], d, m, &vec[0], &max_sim[0])
        else:
            for i in range(m):
                if max_sim[i] < 0:
                    max_sim[i] = 0
    return count


def mmr_select(
    const float32_t[::1] scores,
    const float32_t[:, ::1] emb,
    const int32_t[::1] emb_rows,
    double lam,
    intp_t k,
    const int32_t[::1] categories,
    int32_t max_per_category,
    int32_t[::1] counts,
    float32_t[::1] max_sim,
    float32_t[:, ::1] emb_t,
    float32_t[::1] vec,
    uint8_t[::1] taken,
    int32_t[::1] out,
):
    """Greedy MMR under quotas over candidates whose embeddings are
    ``emb[emb_rows]`` (normalised inside); returns how many were written to ``out``."""
    cdef intp_t count
    with nogil:
        count = _mmr_select(
            scores, emb, emb_rows, lam, k, categories, max_per_category, counts,
            max_sim, emb_t, vec, taken, out,
        )
    return _check(count)


cdef intp_t _check(intp_t count) except -100:
    if count == BAD_SHAPE:
        raise ValueError("re-ranking kernel: array shapes disagree (call it through recsvc.reranking)")
    if count == BAD_INDEX:
        raise IndexError("re-ranking kernel: an index is outside the candidate pool or the embeddings")
    return count


# --------------------------------------------------------------------------
# Inclusion counts of the final slate over Monte-Carlo draws of the explored scores
#
# recsvc.slate_propensity draws D independent explored-score vectors from the
# serving policy and calls this kernel, which re-runs the selection step of
# recsvc.reranking.rerank on each draw (boosts, quotas or MMR with quotas, and
# the fill that ignores quotas when they cannot be met) and counts, per pool
# item, the draws whose slate holds it. Reserved (pinned, sponsored) items are
# outside the pool and enter through ``counts0`` and ``max_sim0``.
#
# A draw's explored scores: the T random items (the policy's top M) take
# top_scores[d, top_col[j]]; every other ("fixed") item i takes
# (float) (base[i] + shift[d]), so the fixed items keep one order in every
# draw (``fixed_order``, best first) and a quota walk merges the T random items
# (a heap) with that list: O(T + walked * log T) per draw instead of O(p).
#
# Order, as in rerank: the pool is sorted by explored score (descending, ties
# to the lower pool index), so "i before j" is adj desc, then explored desc,
# then index asc; MMR ties go to the earlier item in that pool order.

cdef inline bint _before(intp_t i, intp_t j, const float32_t* adj, const float32_t* e) noexcept nogil:
    if adj[i] != adj[j]:
        return adj[i] > adj[j]
    if e[i] != e[j]:
        return e[i] > e[j]
    return i < j


cdef inline bint _pool_before(intp_t i, intp_t j, const float32_t* e) noexcept nogil:
    if e[i] != e[j]:
        return e[i] > e[j]
    return i < j


cdef inline void _sift_down(int32_t* heap, intp_t size, intp_t pos,
                            const float32_t* adj, const float32_t* e) noexcept nogil:
    cdef intp_t child
    cdef int32_t top = heap[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _before(heap[child + 1], heap[child], adj, e):
            child += 1
        if not _before(heap[child], top, adj, e):
            break
        heap[pos] = heap[child]
        pos = child
    heap[pos] = top


cdef intp_t _quota_walk(
    const int32_t* drawn,                # IN  (T,) the random items (any order)
    intp_t T,                            # IN
    const int32_t* order,                # IN  (W,) fixed items, best first
    intp_t W,                            # IN
    const double[::1] base,              # IN  (p,)
    double sh,                           # IN  this draw's shift of the fixed items
    const float32_t[::1] boost,          # IN  (p,)
    const int32_t[::1] categories,       # IN  (p,)
    int32_t max_per_category,            # IN
    intp_t need,                         # IN
    const int32_t[::1] counts0,          # IN  (C,)
    float32_t* a,                        # IN/OUT (p,) adjusted scores (random items set by the caller)
    float32_t* e,                        # IN/OUT (p,) explored scores (random items set by the caller)
    int32_t* heap,                       # SCRATCH (T,)
    int32_t* skipped,                    # SCRATCH (p,)
    int32_t* picked,                     # OUT (need,)
    int32_t* cnt,                        # SCRATCH (C,)
    intp_t C,                            # IN
    bint complete,                       # IN  order is every fixed item (else -1 when it runs out short)
) noexcept nogil:
    """One draw's greedy walk under quotas: the random items (a heap) merged with the fixed ones (already
    in order), then the fill from the skipped ones. The number picked, or -1 (see ``complete``)."""
    cdef intp_t j, size, n_skip = 0, chosen = 0, r = 0, f, best
    cdef int32_t c
    for j in range(C):
        cnt[j] = counts0[j]
    for j in range(T):
        heap[j] = drawn[j]
    size = T
    j = T // 2
    while j > 0:
        j -= 1
        _sift_down(heap, size, j, a, e)
    while chosen < need:
        f = -1
        if r < W:
            f = order[r]
            e[f] = <float32_t> (base[f] + sh)
            a[f] = e[f] + boost[f]
        if size > 0 and (f < 0 or _before(heap[0], f, a, e)):
            best = heap[0]
            size -= 1
            if size > 0:
                heap[0] = heap[size]
                _sift_down(heap, size, 0, a, e)
        elif f >= 0:
            best = f
            r += 1
        else:
            break
        c = categories[best]
        if _at_quota(c, max_per_category, cnt, C):
            skipped[n_skip] = <int32_t> best
            n_skip += 1
            continue
        _count(c, cnt, C)
        picked[chosen] = <int32_t> best
        chosen += 1
    if chosen < need and not complete:
        return -1
    # quotas could not fill the slate: the skipped ones, in order, ignoring them
    j = 0
    while chosen < need and j < n_skip:
        picked[chosen] = skipped[j]
        chosen += 1
        j += 1
    return chosen


cdef intp_t _first_per_category(
    const int32_t[::1] top_pool,         # IN  (T,) the random items
    const int32_t[::1] categories,       # IN  (p,)
    int32_t Q,                           # IN  > 0: the quota
    intp_t C,                            # IN
    const float32_t* a,                  # IN  (p,) this draw's adjusted scores
    const float32_t* e,                  # IN  (p,) this draw's explored scores
    int32_t* qbuf,                       # SCRATCH (C * Q,)
    int32_t* qlen,                       # SCRATCH (C,) all 0 on entry and on return
    int32_t* kept,                       # OUT (<= T,) the random items a quota walk can pick
) noexcept nogil:
    """This draw's random items that can be picked under quotas: each category's first Q (in this
    draw's order) and every item without a quota. How many, in ``kept``."""
    cdef intp_t T = top_pool.shape[0], j, n = 0
    cdef int32_t i, c, L, pos
    cdef int32_t* buf
    for j in range(T):
        i = top_pool[j]
        c = categories[i]
        if c < 0 or c >= C:
            kept[n] = i
            n += 1
            continue
        buf = &qbuf[c * Q]
        L = qlen[c]
        if L == Q:
            if not _before(i, buf[Q - 1], a, e):
                continue
            L -= 1  # the last one drops out
        pos = L
        while pos > 0 and _before(i, buf[pos - 1], a, e):
            buf[pos] = buf[pos - 1]
            pos -= 1
        buf[pos] = i
        qlen[c] = L + 1
    for j in range(T):
        c = categories[top_pool[j]]
        if c >= 0 and c < C and qlen[c] > 0:
            for pos in range(qlen[c]):
                kept[n] = qbuf[c * Q + pos]
                n += 1
            qlen[c] = 0
    return n


cdef intp_t _slate_inclusion_counts(
    const float32_t[:, ::1] top_scores,  # IN  (D, M) explored scores of the random items, one row per draw
    const int32_t[::1] top_pool,         # IN  (T,) pool index of each random item in the pool
    const int32_t[::1] top_col,          # IN  (T,) its column of top_scores
    const double[::1] base,              # IN  (p,) fixed items' explored score is (float) (base + shift[d])
    const double[::1] shift,             # IN  (D,)
    const int32_t[::1] fixed_order,      # IN  (F,) the fixed items, best first (same order in every draw)
    const float32_t[::1] boost,          # IN  (p,) added to the explored score (freshness, long tail)
    const int32_t[::1] categories,       # IN  (p,) negative: no quota
    int32_t max_per_category,            # IN  <= 0: no quota
    intp_t need,                         # IN  organic positions to fill
    double lam,                          # IN  MMR weight; 0: greedy selection under quotas
    const float32_t[:, ::1] sim,         # IN  (p, p) cosine similarities when lam > 0, else any shape
    const float32_t[::1] max_sim0,       # IN  (p,) similarity to the reserved items; -inf: none
    const int32_t[::1] counts0,          # IN  (C,) reserved items per category
    float32_t[::1] adj,                  # SCRATCH (p,)
    float32_t[::1] expl,                 # SCRATCH (p,)
    int32_t[::1] heap,                   # SCRATCH (p,)
    int32_t[::1] skipped,                # SCRATCH (p,)
    int32_t[::1] picked,                 # SCRATCH (p,)
    uint8_t[::1] taken,                  # SCRATCH (p,)
    float32_t[::1] max_sim,              # SCRATCH (p,)
    int32_t[::1] counts,                 # SCRATCH (C,)
    int32_t[::1] walk,                   # SCRATCH (F,)
    int32_t[::1] kept,                   # SCRATCH (T,)
    int32_t[::1] qbuf,                   # SCRATCH (C * max_per_category,), or (0,): no per-draw pruning
    int32_t[::1] qlen,                   # SCRATCH (C,) zeros
    double[::1] hits,                    # IN/OUT (p,) += 1 for every draw whose slate holds the item
) noexcept nogil:
    cdef intp_t D = top_scores.shape[0], M = top_scores.shape[1], T = top_pool.shape[0]
    cdef intp_t p = base.shape[0], F = fixed_order.shape[0], C = counts0.shape[0]
    cdef intp_t d, i, j, size, n_skip, chosen, best, step, r, f, W
    cdef int32_t c
    cdef int32_t* cnt = &counts[0] if C > 0 else NULL
    cdef const int32_t* order
    cdef float32_t* e
    cdef float32_t* a
    cdef double val, best_val, pen, sh
    cdef bint pruned, per_draw
    cdef intp_t nk
    if (boost.shape[0] != p or categories.shape[0] != p or max_sim0.shape[0] != p or top_col.shape[0] != T
            or shift.shape[0] != D or adj.shape[0] != p or expl.shape[0] != p or heap.shape[0] != p
            or skipped.shape[0] != p or picked.shape[0] != p or taken.shape[0] != p
            or max_sim.shape[0] != p or counts.shape[0] != C or hits.shape[0] != p or need < 0
            or T + F != p or walk.shape[0] != F or kept.shape[0] != T or qlen.shape[0] != C
            or (qbuf.shape[0] != 0 and (max_per_category <= 0
                                        or qbuf.shape[0] != C * <intp_t> max_per_category))):
        return BAD_SHAPE
    if lam > 0 and (sim.shape[0] != p or sim.shape[1] != p):
        return BAD_SHAPE
    for j in range(T):
        if top_pool[j] < 0 or top_pool[j] >= p or top_col[j] < 0 or top_col[j] >= M:
            return BAD_INDEX
    for j in range(F):
        if fixed_order[j] < 0 or fixed_order[j] >= p:
            return BAD_INDEX
    if p == 0 or need == 0 or D == 0:
        return 0
    a = &adj[0]
    e = &expl[0]
    # Under quotas only the first max_per_category fixed items of a category can be picked by the
    # walk: a later one comes after that many of its category, each picked (the quota is then full)
    # or skipped (it already was), and counts only grow. The walk runs on that short list; a draw
    # whose walk cannot fill the slate (the fill then needs every skipped item) runs again on the
    # full list. Same slates, O(T + C * quota) per draw where the full list walks the pool.
    W = F
    pruned = False
    if lam <= 0 and max_per_category > 0 and C > 0:
        for j in range(C):
            cnt[j] = 0
        W = 0
        for r in range(F):
            f = fixed_order[r]
            c = categories[f]
            if c >= 0 and c < C:
                if cnt[c] >= max_per_category:
                    continue
                cnt[c] += 1
            walk[W] = <int32_t> f
            W += 1
        pruned = W < F
        for j in range(C):
            qlen[j] = 0
    # Likewise each draw's random items: only each category's first max_per_category can be picked.
    per_draw = lam <= 0 and max_per_category > 0 and C > 0 and qbuf.shape[0] > 0
    for d in range(D):
        sh = shift[d]
        if lam > 0:
            for i in range(p):
                e[i] = <float32_t> (base[i] + sh)
        for j in range(T):
            i = top_pool[j]
            e[i] = top_scores[d, top_col[j]]
            a[i] = e[i] + boost[i]
        for j in range(C):
            cnt[j] = counts0[j]
        chosen = 0
        if lam <= 0:
            nk = T
            if per_draw:
                nk = _first_per_category(top_pool, categories, max_per_category, C, a, e, &qbuf[0], &qlen[0],
                                         &kept[0])
            chosen = _quota_walk(&kept[0] if per_draw else &top_pool[0], nk,
                                 &walk[0] if pruned else &fixed_order[0], W if pruned else F,
                                 base, sh, boost, categories, max_per_category, need, counts0, a, e,
                                 &heap[0], &skipped[0], &picked[0], cnt, C, not (pruned or nk < T))
            if chosen < 0:  # a short list ran out: this draw needs the full ones
                chosen = _quota_walk(&top_pool[0], T, &fixed_order[0], F, base, sh, boost, categories,
                                     max_per_category, need, counts0, a, e, &heap[0], &skipped[0],
                                     &picked[0], cnt, C, True)
        else:
            for i in range(p):
                a[i] = e[i] + boost[i]
                taken[i] = 0
                max_sim[i] = max_sim0[i]
            for step in range(need):
                best = -1
                best_val = -INFINITY
                for i in range(p):
                    if taken[i] or _at_quota(categories[i], max_per_category, cnt, C):
                        continue
                    pen = max_sim[i] if max_sim[i] != -INFINITY else 0.0
                    val = (1.0 - lam) * a[i] - lam * pen
                    if best < 0 or val > best_val or (val == best_val and _pool_before(i, best, e)):
                        best = i
                        best_val = val
                if best < 0:
                    break
                taken[best] = 1
                picked[chosen] = <int32_t> best
                chosen += 1
                _count(categories[best], cnt, C)
                for i in range(p):
                    if sim[best, i] > max_sim[i]:
                        max_sim[i] = sim[best, i]
            while chosen < need:  # the fill ignoring quotas, in score order
                best = -1
                for i in range(p):
                    if not taken[i] and (best < 0 or _before(i, best, a, e)):
                        best = i
                if best < 0:
                    break
                taken[best] = 1
                picked[chosen] = <int32_t> best
                chosen += 1
        for j in range(chosen):
            hits[picked[j]] += 1.0
    return 0


def slate_inclusion_counts(
    const float32_t[:, ::1] top_scores,
    const int32_t[::1] top_pool,
    const int32_t[::1] top_col,
    const double[::1] base,
    const double[::1] shift,
    const int32_t[::1] fixed_order,
    const float32_t[::1] boost,
    const int32_t[::1] categories,
    int32_t max_per_category,
    intp_t need,
    double lam,
    const float32_t[:, ::1] sim,
    const float32_t[::1] max_sim0,
    const int32_t[::1] counts0,
    float32_t[::1] adj,
    float32_t[::1] expl,
    int32_t[::1] heap,
    int32_t[::1] skipped,
    int32_t[::1] picked,
    uint8_t[::1] taken,
    float32_t[::1] max_sim,
    int32_t[::1] counts,
    int32_t[::1] walk,
    int32_t[::1] kept,
    int32_t[::1] qbuf,
    int32_t[::1] qlen,
    double[::1] hits,
):
    """Re-run rerank's selection on each draw of the explored scores and add 1 to
    ``hits[i]`` for every draw whose slate holds pool item i."""
    cdef intp_t status
    with nogil:
        status = _slate_inclusion_counts(
            top_scores, top_pool, top_col, base, shift, fixed_order, boost, categories, max_per_category,
            need, lam, sim, max_sim0, counts0, adj, expl, heap, skipped, picked, taken, max_sim, counts, walk,
            kept, qbuf, qlen, hits,
        )
    return _check(status)
