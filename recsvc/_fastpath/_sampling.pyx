# Batched Beta sampling and Thompson-sampling kernels.
#
# Random draws use numpy's bit-generator C API (numpy's
# random/_examples/cython/extending.pyx): the ``bitgen_t*`` comes from the
# Generator's ``bit_generator.capsule`` and every draw happens under the
# bit generator's lock, without the GIL. A kernel consumes the stream exactly
# like ``Generator.beta(alpha, beta)`` does for the same parameters in the
# same (row-major) order, so seeded results are bit-identical to numpy's.
#
# How a draw stays identical to numpy's ``random_beta`` while being cheaper:
# numpy draws Beta(a, b) by Johnk's algorithm when a <= 1 and b <= 1, and
# otherwise as Ga / (Ga + Gb) with Ga ~ Gamma(a) drawn before Gb ~ Gamma(b).
# ``random_standard_gamma(shape)`` uses Marsaglia-Tsang when shape > 1, which
# recomputes b = shape - 1/3 and c = 1/sqrt(9 b) on every call. The kernels
# below redo only that Marsaglia-Tsang loop (``_gamma_mt``), with the same
# expressions in the same order, the same calls into numpy for the random
# numbers (``random_standard_normal``, ``next_double``), and b, c computed
# once per item (``_plan_beta``): once per Monte-Carlo run in
# ``thompson_topk_propensities`` instead of once per round. Every other case
# (Johnk and its tiny-shape shortcut; Gamma(shape <= 1)) calls numpy's own
# ``random_beta`` / ``random_standard_gamma``. Identity needs the compiler to
# evaluate those expressions as numpy's build does: no fast-math, and no FMA
# contraction unless numpy's has it too (the default x86-64 target has no FMA).
# tests/test_sampling.py compares with ``Generator.beta`` draw by draw over
# every branch, on the machine at hand; a numpy that changes its algorithm
# fails there as well.
#
# Kernels do not validate shapes (the public layer, recsvc.exploration, does);
# they do refuse non-positive or non-finite Beta parameters, because numpy's
# gamma rejection loop never terminates on NaN. They report that as a status
# and the ``def`` wrapper raises once it holds the GIL again.

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.math cimport INFINITY, log, sqrt
from libc.string cimport memcpy, memset
from numpy.random cimport bitgen_t

from recsvc._fastpath._typedefs cimport float32_t, float64_t, intp_t, uint64_t

import numpy as np


cdef extern from "numpy/random/distributions.h":
    double random_beta(bitgen_t *bitgen_state, double a, double b) nogil
    double random_standard_gamma(bitgen_t *bitgen_state, double shape) nogil
    double random_standard_normal(bitgen_t *bitgen_state) nogil
    double next_double(bitgen_t *bitgen_state) nogil   # static inline there


cdef enum Status:
    OK = 0
    BAD_PARAMETER = 1     # some alpha/beta is <= 0, NaN or infinite


cdef object _bit_generator_of(object gen):
    if not isinstance(gen, np.random.Generator):
        raise TypeError(
            f"expected a numpy.random.Generator, got {type(gen).__name__}"
        )
    return gen.bit_generator


cdef bitgen_t* _bitgen_of(object bit_generator) except NULL:
    """The C ``bitgen_t`` behind a BitGenerator, from its capsule."""
    cdef object capsule = bit_generator.capsule
    if not PyCapsule_IsValid(capsule, "BitGenerator"):
        raise TypeError("the generator's bit_generator has no valid capsule")
    return <bitgen_t*> PyCapsule_GetPointer(capsule, "BitGenerator")


cdef inline bint _valid_param(float64_t x) noexcept nogil:
    # False for NaN too (every comparison with NaN is false).
    return x > 0.0 and x < INFINITY


cdef intp_t _first_bad_parameter(
    const float64_t[::1] alpha,          # IN
    const float64_t[::1] beta,           # IN
) noexcept nogil:
    """Index of the first invalid (alpha, beta) pair, or -1."""
    cdef intp_t i
    for i in range(alpha.shape[0]):
        if not (_valid_param(alpha[i]) and _valid_param(beta[i])):
            return i
    return -1


cdef void _raise_bad_parameter(intp_t i, double a, double b) except *:
    raise ValueError(
        f"Beta parameters must be positive and finite; "
        f"got alpha[{i}]={a!r}, beta[{i}]={b!r}"
    )


# --------------------------------------------------------------------------
# One Beta draw, numpy's random_beta with the per-item work done up front

cdef struct BetaPlan:
    float64_t a, b           # the parameters
    bint johnk               # a <= 1 and b <= 1: numpy's random_beta as is
    bint a_mt, b_mt          # Gamma(a) / Gamma(b) by Marsaglia-Tsang (shape > 1)
    float64_t a_b, a_c       # its b = a - 1/3 and c = 1/sqrt(9 b)
    float64_t b_b, b_c       # the same for Gamma(b)


cdef inline void _plan_beta(BetaPlan *p, float64_t a, float64_t b) noexcept nogil:
    # The branch tests are numpy's: random_beta's (a <= 1 && b <= 1), then
    # random_standard_gamma's shape == 1 / shape < 1 / else (shape > 1 here,
    # the parameters being positive and finite).
    p.a = a
    p.b = b
    p.johnk = a <= 1.0 and b <= 1.0
    p.a_mt = a > 1.0
    p.b_mt = b > 1.0
    if p.a_mt:
        p.a_b = a - 1.0 / 3.0
        p.a_c = 1.0 / sqrt(9.0 * p.a_b)
    if p.b_mt:
        p.b_b = b - 1.0 / 3.0
        p.b_c = 1.0 / sqrt(9.0 * p.b_b)


cdef inline float64_t _gamma_mt(bitgen_t *rng, float64_t b, float64_t c) noexcept nogil:
    """numpy's random_standard_gamma(shape) for shape > 1, given its b and c.

    Same operations in the same order (the expressions are numpy's), so the
    same random numbers give the same result bit for bit."""
    cdef float64_t X, V, U
    while True:
        while True:
            X = random_standard_normal(rng)
            V = 1.0 + c * X
            if not (V <= 0.0):
                break
        V = V * V * V
        U = next_double(rng)
        if U < 1.0 - 0.0331 * (X * X) * (X * X):
            return b * V
        # log(0.0) ok here
        if log(U) < 0.5 * X * X + b * (1.0 - V + log(V)):
            return b * V


cdef inline float64_t _beta_draw(bitgen_t *rng, const BetaPlan *p) noexcept nogil:
    """random_beta(rng, p.a, p.b), bit for bit and draw for draw."""
    cdef float64_t ga, gb
    if p.johnk:
        return random_beta(rng, p.a, p.b)
    if p.a_mt:
        ga = _gamma_mt(rng, p.a_b, p.a_c)
    else:
        ga = random_standard_gamma(rng, p.a)
    if p.b_mt:
        gb = _gamma_mt(rng, p.b_b, p.b_c)
    else:
        gb = random_standard_gamma(rng, p.b)
    return ga / (ga + gb)


# --------------------------------------------------------------------------
# Batched Beta draws

cdef int _beta_fill(
    bitgen_t *rng,
    const float64_t[::1] alpha,          # IN  (n,)
    const float64_t[::1] beta,           # IN  (n,)
    float64_t[::1] out,                  # OUT (n,)
) noexcept nogil:
    cdef intp_t i, n = alpha.shape[0]
    cdef BetaPlan p
    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(n):
        _plan_beta(&p, alpha[i], beta[i])
        out[i] = _beta_draw(rng, &p)
    return OK


def sample_beta_batch(
    gen,
    const float64_t[::1] alpha,          # IN  (n,)
    const float64_t[::1] beta,           # IN  (n,)
    float64_t[::1] out,                  # OUT (n,)
):
    """out[i] ~ Beta(alpha[i], beta[i]), drawn in index order from ``gen``."""
    cdef object bit_generator = _bit_generator_of(gen)
    cdef bitgen_t *rng = _bitgen_of(bit_generator)
    cdef int status
    with bit_generator.lock, nogil:
        status = _beta_fill(rng, alpha, beta, out)
    if status != OK:
        i = _first_bad_parameter(alpha, beta)
        _raise_bad_parameter(i, alpha[i], beta[i])


# --------------------------------------------------------------------------
# Thompson sampling: one-shot scores and Monte-Carlo top-k propensities

cdef int _thompson_scores(
    bitgen_t *rng,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None: weights >= 0
    float64_t[::1] out,                  # OUT (m,)  base_i * theta_i
) noexcept nogil:
    cdef intp_t i, m = alpha.shape[0]
    cdef bint weighted = base_scores is not None
    cdef BetaPlan p
    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(m):
        _plan_beta(&p, alpha[i], beta[i])
        out[i] = _beta_draw(rng, &p)
        if weighted:
            out[i] *= base_scores[i]
    return OK


def thompson_scores(
    gen,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None
    float64_t[::1] out,                  # OUT (m,)
):
    """One Thompson draw per candidate: out[i] = base_scores[i] * theta_i,
    theta_i ~ Beta(alpha[i], beta[i]) (theta_i alone if base_scores is None)."""
    cdef object bit_generator = _bit_generator_of(gen)
    cdef bitgen_t *rng = _bitgen_of(bit_generator)
    cdef int status
    with bit_generator.lock, nogil:
        status = _thompson_scores(rng, alpha, beta, base_scores, out)
    if status != OK:
        i = _first_bad_parameter(alpha, beta)
        _raise_bad_parameter(i, alpha[i], beta[i])


# Top-k membership per round. "Better" means a higher score, or an equal score
# and a lower index, the same tie rule as recsvc.exploration.top_k_indices;
# it is a strict total order on (score, index) pairs.
#
# Each round first marks, in one branch-free pass, the candidates scoring
# strictly above a threshold t (a bit per candidate): every one of them is
# better than every unmarked one, whatever t is. With t the previous round's
# k-th or (k+1)-th best score about k are marked, and only the few around the
# boundary need a real selection: with n_above marked, the j = k - n_above
# best unmarked ones join the top k, or the j = n_above - k worst marked ones
# drop out (usually j <= 2). The first round's t = +inf marks none, so it
# selects all k from the m candidates.

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define recsvc_ctz64(x) __builtin_ctzll(x)
    #else
    static int recsvc_ctz64(unsigned long long x) {
        int n = 0;
        while (!(x & 1)) { x >>= 1; n++; }
        return n;
    }
    #endif
    """
    int _ctz64 "recsvc_ctz64" (uint64_t x) nogil   # x != 0


cdef inline bint _worse(
    float64_t s1, intp_t i1, float64_t s2, intp_t i2
) noexcept nogil:
    return s1 < s2 or (s1 == s2 and i1 > i2)


cdef inline bint _better_nobranch(
    float64_t s1, intp_t i1, float64_t s2, intp_t i2
) noexcept nogil:
    # not _worse(s1, i1, s2, i2) for distinct pairs; | and & keep it branch-free
    return (s1 > s2) | ((s1 == s2) & (i1 < i2))


cdef inline void _sift_down(
    float64_t *hs, intp_t *hi, intp_t size, intp_t pos
) noexcept nogil:
    # Min-heap on (score, index): the root is the worst member.
    cdef float64_t s = hs[pos]
    cdef intp_t idx = hi[pos]
    cdef intp_t child
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(hs[child + 1], hi[child + 1],
                                       hs[child], hi[child]):
            child += 1
        if not _worse(hs[child], hi[child], s, idx):
            break
        hs[pos] = hs[child]
        hi[pos] = hi[child]
        pos = child
    hs[pos] = s
    hi[pos] = idx


cdef inline intp_t _heap_offer(
    float64_t *hs, intp_t *hi, intp_t size, intp_t cap, float64_t s, intp_t idx
) noexcept nogil:
    """Offer (s, idx) to a min-heap keeping the ``cap`` best pairs, rooted at its worst member, that holds
    ``size``; returns its new size. Pairs are appended until it is full, then heapified at once."""
    cdef intp_t h
    if size < cap:
        hs[size] = s
        hi[size] = idx
        size += 1
        if size == cap:
            for h in range(cap // 2 - 1, -1, -1):
                _sift_down(hs, hi, cap, h)
    elif _worse(hs[0], hi[0], s, idx):
        hs[0] = s
        hi[0] = idx
        _sift_down(hs, hi, cap, 0)
    return size


cdef void _select_best(
    const float64_t *theta,              # IN  (m,) scores
    intp_t m,                            # IN
    const uint64_t *marks,               # IN  (ceil(m / 64),) bit i: theta[i] > t
    bint worst,                          # IN  the j worst marked, else the j best unmarked
    intp_t j,                            # IN  0 < j <= how many there are
    float64_t *hs,                       # OUT (j,) their scores (negated if worst)
    intp_t *hi,                          # OUT (j,) their indices (negated if worst)
) noexcept nogil:
    """The j best unmarked (or j worst marked) candidates, as a heap rooted
    at the one nearest the boundary: hs[0], hi[0].

    Selecting the worst is selecting the best of (-score, -index), a pair
    order that reverses the original one exactly (negation is exact, and
    -0.0 == 0.0), so the same min-heap serves both."""
    cdef float64_t sg = -1.0 if worst else 1.0
    cdef intp_t ig = -1 if worst else 1
    cdef intp_t w, c, size = 0
    cdef uint64_t word
    cdef float64_t s
    cdef bint swap
    for w in range((m + 63) // 64):
        word = marks[w] if worst else ~marks[w]
        if (w + 1) * 64 > m:             # drop the bits past m
            word &= ((<uint64_t> 1) << (m & 63)) - 1
        while word:
            c = w * 64 + _ctz64(word)    # the next candidate, in index order
            word &= word - 1
            s = sg * theta[c]
            c = ig * c
            if size < j or j != 1:
                size = _heap_offer(hs, hi, size, j, s, c)
            else:
                # j == 1, filled: the common case, kept free of unpredictable branches.
                swap = _better_nobranch(s, c, hs[0], hi[0])
                hs[0] = s if swap else hs[0]
                hi[0] = c if swap else hi[0]


cdef int _thompson_topk_counts(
    bitgen_t *rng,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None
    intp_t k,                            # IN  0 < k < m
    intp_t n_draws,                      # IN  > 0
    BetaPlan *plans,                     # SCRATCH (m,)
    float64_t[::1] theta,                # SCRATCH (m,)
    uint64_t[::1] marks,                 # SCRATCH (ceil(m / 64),)
    float64_t[::1] heap_scores,          # SCRATCH (m,)
    intp_t[::1] heap_index,              # SCRATCH (m,)
    intp_t[::1] counts,                  # OUT (m,) top-k memberships
) noexcept nogil:
    cdef intp_t r, i, j, n_above, m = alpha.shape[0]
    cdef bint weighted = base_scores is not None
    cdef float64_t s
    cdef float64_t t = INFINITY          # no threshold yet: nothing is above
    cdef uint64_t up
    cdef float64_t *th = &theta[0]
    cdef float64_t *hs = &heap_scores[0]
    cdef intp_t *hi = &heap_index[0]

    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(m):
        counts[i] = 0
        _plan_beta(&plans[i], alpha[i], beta[i])
    for r in range(n_draws):
        # Same stream order as Generator.beta(alpha, beta, size=(n_draws, m)).
        # Those above t are marked and counted in for now (this costs little
        # next to the draws, whose latency it overlaps).
        for i in range((m + 63) // 64):
            marks[i] = 0
        n_above = 0
        for i in range(m):
            s = _beta_draw(rng, &plans[i])
            if weighted:
                s = s * base_scores[i]
            th[i] = s
            up = s > t
            marks[i >> 6] |= up << (i & 63)
            counts[i] += up
            n_above += up
        if n_above < k:
            # The k - n_above best of the rest join.
            j = k - n_above
            _select_best(th, m, &marks[0], False, j, hs, hi)
            for i in range(j):
                counts[hi[i]] += 1
            t = hs[0]                    # this round's k-th best score
        elif n_above > k:
            # The n_above - k worst of those above drop out.
            j = n_above - k
            _select_best(th, m, &marks[0], True, j, hs, hi)
            for i in range(j):
                counts[-hi[i]] -= 1
            t = -hs[0]                   # this round's (k+1)-th best score
    return OK


def thompson_topk_propensities(
    gen,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None
    intp_t k,                            # IN
    intp_t n_draws,                      # IN  > 0
    float64_t[::1] out,                  # OUT (m,)
):
    """Monte-Carlo estimate of P(i in the top-k of base_scores * theta).

    Runs ``n_draws`` rounds; each draws theta_i ~ Beta(alpha[i], beta[i]) for
    all m candidates (row-major, like ``Generator.beta(..., size=(n_draws, m))``)
    and counts which candidates make the top k (ties: lower index first).
    out[i] = count_i / n_draws. k <= 0 gives zeros and k >= m gives ones,
    without drawing (the parameters are still checked).
    """
    cdef intp_t m = alpha.shape[0]
    cdef intp_t i
    cdef int status = OK
    cdef object bit_generator = _bit_generator_of(gen)
    cdef bitgen_t *rng = _bitgen_of(bit_generator)
    if n_draws <= 0:
        raise ValueError(f"n_draws must be positive, got {n_draws}")
    i = _first_bad_parameter(alpha, beta)
    if i >= 0:
        _raise_bad_parameter(i, alpha[i], beta[i])
    if k <= 0 or k >= m:
        out[:] = 0.0 if k <= 0 else 1.0
        return
    cdef float64_t[::1] theta = np.empty(m, dtype=np.float64)
    cdef float64_t[::1] heap_scores = np.empty(m, dtype=np.float64)
    cdef intp_t[::1] heap_index = np.empty(m, dtype=np.intp)
    cdef intp_t[::1] counts = np.empty(m, dtype=np.intp)
    cdef uint64_t[::1] marks = np.empty((m + 63) // 64, dtype=np.uint64)
    cdef BetaPlan *plans = <BetaPlan *> PyMem_Malloc(m * sizeof(BetaPlan))
    if plans == NULL:
        raise MemoryError()
    try:
        with bit_generator.lock, nogil:
            status = _thompson_topk_counts(
                rng, alpha, beta, base_scores, k, n_draws,
                plans, theta, marks, heap_scores, heap_index, counts,
            )
            if status == OK:
                for i in range(m):
                    out[i] = <float64_t> counts[i] / n_draws
    finally:
        PyMem_Free(plans)
    if status != OK:
        i = _first_bad_parameter(alpha, beta)
        _raise_bad_parameter(i, alpha[i], beta[i])


# --------------------------------------------------------------------------
# Thompson score draws for the final-slate propensities

cdef int _thompson_score_draws(
    bitgen_t *rng,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None: weights >= 0
    BetaPlan *plans,                     # SCRATCH (m,)
    float32_t[:, ::1] out,               # OUT (D, m) float32(base_i * theta_di)
    float64_t[::1] row_min,              # OUT (D,) min_i base_i * theta_di (in float64)
) noexcept nogil:
    cdef intp_t d, i, m = alpha.shape[0], D = out.shape[0]
    cdef bint weighted = base_scores is not None
    cdef float64_t s, lo
    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(m):
        _plan_beta(&plans[i], alpha[i], beta[i])
    for d in range(D):
        lo = INFINITY
        for i in range(m):
            s = _beta_draw(rng, &plans[i])
            if weighted:
                s = s * base_scores[i]
            out[d, i] = <float32_t> s
            if s < lo:
                lo = s
        row_min[d] = lo
    return OK


def thompson_score_draws(
    gen,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None
    float32_t[:, ::1] out,               # OUT (D, m)
    float64_t[::1] row_min,              # OUT (D,)
):
    """D rounds of Thompson scores: out[d, i] = float32(base_scores[i] * theta_di) and row_min[d] the
    round's lowest score (float64), theta_di ~ Beta(alpha[i], beta[i]) drawn row-major: the same draws,
    bit for bit, as ``Generator.beta(np.tile(alpha, D), np.tile(beta, D))``."""
    cdef intp_t m = alpha.shape[0]
    cdef intp_t i
    cdef int status = OK
    cdef object bit_generator = _bit_generator_of(gen)
    cdef bitgen_t *rng = _bitgen_of(bit_generator)
    if beta.shape[0] != m or out.shape[1] != m or row_min.shape[0] != out.shape[0] or (
            base_scores is not None and base_scores.shape[0] != m):
        raise ValueError("thompson_score_draws: alpha, beta, base_scores, out and row_min disagree in shape")
    cdef BetaPlan *plans = <BetaPlan *> PyMem_Malloc(max(m, 1) * sizeof(BetaPlan))
    if plans == NULL:
        raise MemoryError()
    try:
        with bit_generator.lock, nogil:
            status = _thompson_score_draws(rng, alpha, beta, base_scores, plans, out, row_min)
    finally:
        PyMem_Free(plans)
    if status != OK:
        i = _first_bad_parameter(alpha, beta)
        _raise_bad_parameter(i, alpha[i], beta[i])


# --------------------------------------------------------------------------
# One request's Thompson round: the Beta prior, the top M, the served draw and the explored scores

cdef enum ExploreStatus:
    EXPLORE_OK = 0
    EXPLORE_BAD_SCORE = 1                # a ranker score is NaN or infinite
    EXPLORE_BAD_PARAMETER = 2            # some alpha/beta is <= 0, NaN or infinite


cdef void _argsort_descending(
    const float64_t *key,                # IN  (n,) no NaN
    intp_t n,                            # IN
    intp_t *order,                       # OUT (n,) positions by key descending, ties to the lower position
    intp_t *order_tmp,                   # SCRATCH (n,)
    uint64_t *bits,                      # SCRATCH (n,)
    uint64_t *bits_tmp,                  # SCRATCH (n,)
) noexcept nogil:
    """``np.argsort(-key, kind="stable")``: an LSD radix sort (stable, so ties keep index order) on the keys'
    bits mapped to unsigned integers that order like the keys, reversed; -0.0 counts as 0.0, as it
    compares. One pass counts all 8 bytes; a byte every key shares is skipped (float32 scores as doubles
    share their low 3). About half numpy's stable argsort at n = 1000."""
    cdef intp_t i, b, d, shift, start
    cdef intp_t counts[8][256]
    cdef intp_t *swap_i
    cdef intp_t *out = order
    cdef uint64_t *swap_u
    cdef uint64_t u
    cdef float64_t x
    memset(&counts[0][0], 0, sizeof(counts))
    for i in range(n):
        x = key[i] + 0.0                 # -0.0 + 0.0 is +0.0
        memcpy(&u, &x, sizeof(uint64_t))
        # doubles order as unsigned once negatives flip every bit and the rest the sign bit; complemented
        # for descending
        u = ~(u ^ ((<uint64_t> 0xFFFFFFFFFFFFFFFF) if (u >> 63) else (<uint64_t> 1) << 63))
        bits[i] = u
        order[i] = i
        for d in range(8):
            counts[d][(u >> (8 * d)) & 255] += 1
    if n == 0:
        return
    for d in range(8):
        shift = 8 * d
        if counts[d][(bits[0] >> shift) & 255] == n:
            continue                     # every key has this byte: nothing moves
        start = 0
        for b in range(256):             # counts -> where each bucket starts
            start, counts[d][b] = start + counts[d][b], start
        for i in range(n):
            b = (bits[i] >> shift) & 255
            bits_tmp[counts[d][b]] = bits[i]
            order_tmp[counts[d][b]] = order[i]
            counts[d][b] += 1
        swap_u = bits
        bits = bits_tmp
        bits_tmp = swap_u
        swap_i = order
        order = order_tmp
        order_tmp = swap_i
    if order != out:                     # an odd number of moves: the result is in the scratch
        memcpy(out, order, n * sizeof(intp_t))


cdef int _thompson_explore(
    bitgen_t *rng,
    const float32_t[::1] scores,         # IN  (n,) the ranker's scores
    const float64_t[::1] succ,           # IN  (n,) clicks (evidence)
    const float64_t[::1] fail,           # IN  (n,) skips (evidence)
    float64_t kappa,                     # IN  prior strength
    float64_t[::1] alpha,                # OUT (n,) kappa * clip(s) + succ
    float64_t[::1] beta,                 # OUT (n,) kappa * (1 - clip(s)) + fail
    float64_t[::1] pulls,                # OUT (n,) succ + fail
    intp_t[::1] top,                     # OUT (m,) the top m by score (ties: lower index), in index order
    float64_t[::1] theta,                # OUT (m,) the served round's draws for them
    float32_t[::1] adjusted,             # OUT (n,) the explored scores
    float64_t[::1] base,                 # OUT (n,) 0 on the top m; s - max(rest) - 1 on the rest
    intp_t[::1] order,                   # OUT (n,) argsort(-adjusted, stable): the explored ordering
    intp_t[::1] rest_order,              # OUT (n - m,) the rest by base descending, ties to the lower index
    float64_t *hs,                       # SCRATCH (m,)
    intp_t *hi,                          # SCRATCH (m,)
    BetaPlan *plans,                     # SCRATCH (m,)
    float64_t *keys,                     # SCRATCH (n,)
    intp_t *cand,                        # SCRATCH (n,)
    intp_t *pos,                         # SCRATCH (n,)
    intp_t *pos_tmp,                     # SCRATCH (n,)
    uint64_t *bits,                      # SCRATCH (n,)
    uint64_t *bits_tmp,                  # SCRATCH (n,)
) noexcept nogil:
    """Each step is the numpy expression it replaces, operation for operation (see
    ``recsvc._fastpath.twins.sampling.thompson_explore``), so the results are bit-identical."""
    cdef intp_t i, j, h, n = scores.shape[0], m = top.shape[0], size = 0
    cdef float64_t s, p, lo, rest_max = -INFINITY
    cdef intp_t idx
    # the prior: p = clip(s, 1e-4, 1 - 1e-4)
    for i in range(n):
        s = <float64_t> scores[i]
        if not (s > -INFINITY and s < INFINITY):
            return EXPLORE_BAD_SCORE
        p = 1e-4 if s < 1e-4 else (1.0 - 1e-4 if s > 1.0 - 1e-4 else s)
        alpha[i] = kappa * p + succ[i]
        beta[i] = kappa * (1.0 - p) + fail[i]
        pulls[i] = succ[i] + fail[i]
        if not (_valid_param(alpha[i]) and _valid_param(beta[i])):
            return EXPLORE_BAD_PARAMETER
    # the top m: a min-heap on (score, index) rooted at its worst member
    for i in range(n):
        size = _heap_offer(hs, hi, size, m, <float64_t> scores[i], i)
    # in index order (insertion sort: m is small)
    for i in range(m):
        idx = hi[i]
        j = i
        while j > 0 and top[j - 1] > idx:
            top[j] = top[j - 1]
            j -= 1
        top[j] = idx
    # the served round, in index order of the top m
    lo = INFINITY
    for j in range(m):
        _plan_beta(&plans[j], alpha[top[j]], beta[top[j]])
        theta[j] = _beta_draw(rng, &plans[j])
        if theta[j] < lo:
            lo = theta[j]
    # the rest keep the ranker's order, ending 1 below the round's lowest top-m score
    for i in range(n):
        base[i] = -1.0                   # marks the rest until filled in below
    for j in range(m):
        base[top[j]] = 0.0
    for i in range(n):
        if base[i] != 0.0 and <float64_t> scores[i] > rest_max:
            rest_max = <float64_t> scores[i]
    for i in range(n):
        if base[i] != 0.0:
            s = <float64_t> scores[i] - rest_max
            adjusted[i] = <float32_t> (s + (lo - 1.0))
            base[i] = s - 1.0
    for j in range(m):
        adjusted[top[j]] = <float32_t> theta[j]
    # the explored ordering (float32 keys are exact as doubles: the same order and ties)
    for i in range(n):
        keys[i] = <float64_t> adjusted[i]
    _argsort_descending(keys, n, &order[0], pos_tmp, bits, bits_tmp)
    # the rest by base: what the final slate's propensity rounds walk (slate_inclusion_counts)
    h = 0
    for i in range(n):
        if base[i] != 0.0:               # (the rest's base is <= -1, the top's 0)
            keys[h] = base[i]
            cand[h] = i
            h += 1
    if h:
        _argsort_descending(keys, h, pos, pos_tmp, bits, bits_tmp)
        for j in range(h):
            rest_order[j] = cand[pos[j]]
    return EXPLORE_OK


def thompson_explore(
    gen,
    const float32_t[::1] scores,         # IN  (n,)
    const float64_t[::1] succ,           # IN  (n,)
    const float64_t[::1] fail,           # IN  (n,)
    float64_t kappa,                     # IN
    float64_t[::1] alpha,                # OUT (n,)
    float64_t[::1] beta,                 # OUT (n,)
    float64_t[::1] pulls,                # OUT (n,)
    intp_t[::1] top,                     # OUT (m,), 1 <= m <= n
    float64_t[::1] theta,                # OUT (m,)
    float32_t[::1] adjusted,             # OUT (n,)
    float64_t[::1] base,                 # OUT (n,)
    intp_t[::1] order,                   # OUT (n,)
    intp_t[::1] rest_order,              # OUT (n - m,)
):
    """One Thompson round over the top m (unweighted), with its Beta prior, in one call: alpha, beta and
    pulls from the ranker's scores and the evidence, the top m, their Beta draws (``theta``, drawn in index
    order, as ``gen.beta(alpha[top], beta[top])``), the explored scores and the rest's base for further
    draws, the explored ordering (``np.argsort(-adjusted, kind="stable")``) and the rest by base
    (descending, ties to the lower index). Raises ValueError (drawing nothing) for a non-finite score or an invalid Beta parameter."""
    cdef intp_t n = scores.shape[0], m = top.shape[0]
    cdef int status
    cdef object bit_generator = _bit_generator_of(gen)
    cdef bitgen_t *rng = _bitgen_of(bit_generator)
    if not (succ.shape[0] == fail.shape[0] == alpha.shape[0] == beta.shape[0] == pulls.shape[0]
            == adjusted.shape[0] == base.shape[0] == order.shape[0] == n) or theta.shape[0] != m \
            or rest_order.shape[0] != n - m or not 1 <= m <= n:
        raise ValueError("thompson_explore: the arrays disagree in shape (or the top m is not 1..n)")
    # one block for every scratch array: m (score, index, plan) heap entries, n keys, 3 n positions, 2 n bits
    cdef char *block = <char *> PyMem_Malloc(m * (sizeof(float64_t) + sizeof(intp_t) + sizeof(BetaPlan))
                                             + n * (sizeof(float64_t) + 3 * sizeof(intp_t) + 2 * sizeof(uint64_t)))
    if block == NULL:
        raise MemoryError()
    cdef float64_t *hs = <float64_t *> block
    cdef float64_t *keys = hs + m
    cdef uint64_t *bits = <uint64_t *> (keys + n)
    cdef uint64_t *bits_tmp = bits + n
    cdef intp_t *hi = <intp_t *> (bits_tmp + n)
    cdef intp_t *cand = hi + m
    cdef intp_t *pos = cand + n
    cdef intp_t *pos_tmp = pos + n
    cdef BetaPlan *plans = <BetaPlan *> (pos_tmp + n)
    try:
        with bit_generator.lock, nogil:
            status = _thompson_explore(rng, scores, succ, fail, kappa, alpha, beta, pulls, top, theta, adjusted,
                                       base, order, rest_order, hs, hi, plans, keys, cand, pos, pos_tmp, bits,
                                       bits_tmp)
    finally:
        PyMem_Free(block)
    if status == EXPLORE_BAD_SCORE:
        raise ValueError("scores must be finite (the ranker returned NaN or an infinite score)")
    if status == EXPLORE_BAD_PARAMETER:
        i = _first_bad_parameter(alpha, beta)
        _raise_bad_parameter(i, alpha[i], beta[i])
