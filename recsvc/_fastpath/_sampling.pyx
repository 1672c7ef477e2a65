# Batched Beta sampling and Thompson-sampling kernels.
#
# Random draws use numpy's bit-generator C API (numpy's
# random/_examples/cython/extending.pyx): the ``bitgen_t*`` comes from the
# Generator's ``bit_generator.capsule`` and every draw happens under the
# bit generator's lock, without the GIL, through numpy's own ``random_beta``.
# A kernel therefore consumes the stream exactly like
# ``Generator.beta(alpha, beta)`` does for the same parameters in the same
# (row-major) order, so seeded results are bit-identical to numpy's.
#
# Kernels do not validate shapes (the public layer, recsvc.exploration, does);
# they do refuse non-positive or non-finite Beta parameters, because numpy's
# gamma rejection loop never terminates on NaN. They report that as a status
# and the ``def`` wrapper raises once it holds the GIL again.

from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.math cimport INFINITY
from numpy.random cimport bitgen_t

from recsvc._fastpath._typedefs cimport float64_t, intp_t

import numpy as np


cdef extern from "numpy/random/distributions.h":
    double random_beta(bitgen_t *bitgen_state, double a, double b) nogil


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
# Batched Beta draws

cdef int _beta_fill(
    bitgen_t *rng,
    const float64_t[::1] alpha,          # IN  (n,)
    const float64_t[::1] beta,           # IN  (n,)
    float64_t[::1] out,                  # OUT (n,)
) noexcept nogil:
    cdef intp_t i, n = alpha.shape[0]
    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(n):
        out[i] = random_beta(rng, alpha[i], beta[i])
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
    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(m):
        out[i] = random_beta(rng, alpha[i], beta[i])
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


# A min-heap of the k best (score, index) pairs seen so far. "Better" means a
# higher score, or an equal score and a lower index, the same tie rule as
# recsvc.exploration.top_k_indices. The root is the worst member.

cdef inline bint _worse(
    float64_t s1, intp_t i1, float64_t s2, intp_t i2
) noexcept nogil:
    return s1 < s2 or (s1 == s2 and i1 > i2)


cdef inline void _sift_down(
    float64_t *hs, intp_t *hi, intp_t size, intp_t pos
) noexcept nogil:
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


cdef int _thompson_topk_counts(
    bitgen_t *rng,
    const float64_t[::1] alpha,          # IN  (m,)
    const float64_t[::1] beta,           # IN  (m,)
    const float64_t[::1] base_scores,    # IN  (m,) or None
    intp_t k,                            # IN  0 < k < m
    intp_t n_draws,                      # IN  > 0
    float64_t[::1] theta,                # SCRATCH (m,)
    float64_t[::1] heap_scores,          # SCRATCH (k,)
    intp_t[::1] heap_index,              # SCRATCH (k,)
    float64_t[::1] out,                  # OUT (m,) membership counts
) noexcept nogil:
    cdef intp_t r, i, j, m = alpha.shape[0]
    cdef bint weighted = base_scores is not None
    cdef float64_t s
    cdef float64_t *hs = &heap_scores[0]
    cdef intp_t *hi = &heap_index[0]

    if _first_bad_parameter(alpha, beta) >= 0:
        return BAD_PARAMETER
    for i in range(m):
        out[i] = 0.0
    for r in range(n_draws):
        # Same stream order as Generator.beta(alpha, beta, size=(n_draws, m)).
        for i in range(m):
            s = random_beta(rng, alpha[i], beta[i])
            if weighted:
                s = s * base_scores[i]
            theta[i] = s
        # Heapify the first k, then let each later candidate replace the
        # worst member if it beats it: O(m log k) per round, no sort.
        for i in range(k):
            hs[i] = theta[i]
            hi[i] = i
        for j in range(k // 2 - 1, -1, -1):
            _sift_down(hs, hi, k, j)
        for i in range(k, m):
            if _worse(hs[0], hi[0], theta[i], i):
                hs[0] = theta[i]
                hi[0] = i
                _sift_down(hs, hi, k, 0)
        for j in range(k):
            out[hi[j]] += 1.0
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
    cdef float64_t[::1] heap_scores = np.empty(k, dtype=np.float64)
    cdef intp_t[::1] heap_index = np.empty(k, dtype=np.intp)
    with bit_generator.lock, nogil:
        status = _thompson_topk_counts(
            rng, alpha, beta, base_scores, k, n_draws,
            theta, heap_scores, heap_index, out,
        )
        if status == OK:
            for i in range(m):
                out[i] = out[i] / n_draws
    if status != OK:
        i = _first_bad_parameter(alpha, beta)
        _raise_bad_parameter(i, alpha[i], beta[i])
