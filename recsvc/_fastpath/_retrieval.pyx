# Candidate-generation kernels: the request filter, the co-occurrence
# aggregation and the merge of the sources, each one pass over ~1000 rows.
#
# recsvc.retrieval.sources resolves the request (filters to catalog codes,
# sources to ranked arrays) and allocates outputs; these kernels only compute.
# The numpy twins (twins/retrieval.py) give the same results.
#
# Conventions:
#   * rows are catalog rows, int32 >= 0 (-1 marks an empty hash slot); a row at or beyond ``alive.shape[0]``
#     (the catalog grew after the arrays were read) is not eligible;
#   * a category code beyond a category mask is neither allowed nor blocked;
#   * ``exclude`` is sorted ascending;
#   * de-duplication keeps first-seen order: the caller passes the sources in
#     priority order, each best first, so the output starts with the best ANN
#     rows. A small open-addressing hash table (keys = rows) does the lookup.

from libc.stdlib cimport free, malloc
from libc.string cimport memset

from recsvc._fastpath._typedefs cimport float32_t, float64_t, int8_t, int32_t, intp_t, uint8_t, uint32_t, uint64_t


cdef inline int _table_bits(intp_t n) noexcept nogil:
    """log2 of the hash table size: a power of two, at least 2n and 64."""
    cdef int bits = 6
    while (<intp_t>1 << bits) < 2 * n:
        bits += 1
    return bits


cdef inline intp_t _slot(int32_t* keys, int bits, int32_t row) noexcept nogil:
    """The slot of ``row``: where it is, or the empty slot where it goes.

    Fibonacci hashing takes the product's high bits (its low bits would depend
    only on the row's low bits: rows equal modulo the table size would all
    collide). The table is at least twice the keys, so the probe ends.
    """
    cdef intp_t mask = (<intp_t>1 << bits) - 1
    cdef intp_t h = <intp_t>((<uint64_t>(<uint32_t>row) * 11400714819323198485ULL) >> (64 - bits))
    while keys[h] != -1 and keys[h] != row:
        h = (h + 1) & mask
    return h


cdef struct RowFilter:
    const uint8_t* alive
    intp_t n_rows
    const int32_t* maturity
    const int32_t* categories
    int32_t max_maturity
    const uint8_t* allowed
    intp_t n_allowed
    bint has_allowed
    const uint8_t* blocked
    intp_t n_blocked
    const int32_t* exclude
    intp_t n_exclude


cdef RowFilter _row_filter(const uint8_t[::1] alive, const int32_t[::1] maturity,
                           const int32_t[::1] categories, int32_t max_maturity,
                           const uint8_t[::1] allowed, bint has_allowed, const uint8_t[::1] blocked,
                           const int32_t[::1] exclude) except *:
    cdef RowFilter f
    if maturity.shape[0] < alive.shape[0] or categories.shape[0] < alive.shape[0]:
        raise ValueError("maturity and categories must cover every row of alive")
    f.alive = &alive[0] if alive.shape[0] else NULL
    f.n_rows = alive.shape[0]
    f.maturity = &maturity[0] if maturity.shape[0] else NULL
    f.categories = &categories[0] if categories.shape[0] else NULL
    f.max_maturity = max_maturity
    f.allowed = &allowed[0] if allowed.shape[0] else NULL
    f.n_allowed = allowed.shape[0]
    f.has_allowed = has_allowed
    f.blocked = &blocked[0] if blocked.shape[0] else NULL
    f.n_blocked = blocked.shape[0]
    f.exclude = &exclude[0] if exclude.shape[0] else NULL
    f.n_exclude = exclude.shape[0]
    return f


cdef inline bint _excluded(const RowFilter* f, int32_t row) noexcept nogil:
    cdef intp_t lo = 0, hi = f.n_exclude, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if f.exclude[mid] < row:
            lo = mid + 1
        else:
            hi = mid
    return lo < f.n_exclude and f.exclude[lo] == row


cdef inline bint _eligible(const RowFilter* f, int32_t row) noexcept nogil:
    cdef int32_t c
    if row < 0 or row >= f.n_rows or not f.alive[row] or f.maturity[row] > f.max_maturity:
        return False
    c = f.categories[row]
    if f.has_allowed and not (0 <= c < f.n_allowed and f.allowed[c]):
        return False
    if 0 <= c < f.n_blocked and f.blocked[c]:
        return False
    return f.n_exclude == 0 or not _excluded(f, row)


def eligible_mask(const int32_t[::1] rows, const uint8_t[::1] alive, const int32_t[::1] maturity,
                  const int32_t[::1] categories, int32_t max_maturity,
                  const uint8_t[::1] allowed, bint has_allowed, const uint8_t[::1] blocked,
                  const int32_t[::1] exclude, uint8_t[::1] out) -> int:
    """out[i] = whether rows[i] may be served; returns how many may."""
    cdef RowFilter f = _row_filter(alive, maturity, categories, max_maturity, allowed, has_allowed,
                                   blocked, exclude)
    cdef intp_t i, n = rows.shape[0], count = 0
    if out.shape[0] < n:
        raise ValueError(f"out needs room for {n} rows")
    with nogil:
        for i in range(n):
            out[i] = _eligible(&f, rows[i])
            count += out[i]
    return count


def aggregate_neighbours(list neighbour_rows, list neighbour_scores, const float64_t[::1] weights,
                         const uint8_t[::1] alive, const int32_t[::1] maturity,
                         const int32_t[::1] categories, int32_t max_maturity,
                         const uint8_t[::1] allowed, bint has_allowed, const uint8_t[::1] blocked,
                         const int32_t[::1] exclude,
                         int32_t[::1] out_rows, float32_t[::1] out_scores) -> int:
    """Sum ``weights[j] * neighbour_scores[j]`` per distinct eligible neighbour row.

    ``out_rows`` / ``out_scores`` need room for every neighbour of every list;
    returns how many distinct eligible rows were written (first-seen order).
    """
    cdef RowFilter f = _row_filter(alive, maturity, categories, max_maturity, allowed, has_allowed,
                                   blocked, exclude)
    cdef intp_t j, i, h, size, n_total = 0, n_out = 0
    cdef int bits
    cdef const int32_t[::1] nr
    cdef const float64_t[::1] ns
    cdef int32_t row
    cdef double w
    if len(neighbour_scores) != len(neighbour_rows) or weights.shape[0] < len(neighbour_rows):
        raise ValueError("one score array and one weight per neighbour array")
    for j in range(len(neighbour_rows)):
        if len(neighbour_scores[j]) != len(neighbour_rows[j]):
            raise ValueError("neighbour_rows[j] and neighbour_scores[j] differ in length")
        n_total += len(neighbour_rows[j])
    if out_rows.shape[0] < n_total or out_scores.shape[0] < n_total:
        raise ValueError(f"outputs need room for {n_total} rows")
    bits = _table_bits(n_total)
    size = <intp_t>1 << bits
    cdef int32_t* keys = <int32_t*>malloc(size * sizeof(int32_t))
    cdef int32_t* where = <int32_t*>malloc(size * sizeof(int32_t))  # output index, -2 = ineligible
    if keys == NULL or where == NULL:
        free(keys)
        free(where)
        raise MemoryError()
    memset(keys, 0xFF, size * sizeof(int32_t))
    try:
        for j in range(len(neighbour_rows)):
            nr = neighbour_rows[j]
            ns = neighbour_scores[j]
            w = weights[j]
            with nogil:
                for i in range(nr.shape[0]):
                    row = nr[i]
                    h = _slot(keys, bits, row)
                    if keys[h] == -1:
                        keys[h] = row
                        if _eligible(&f, row):
                            where[h] = <int32_t>n_out
                            out_rows[n_out] = row
                            out_scores[n_out] = <float32_t>(w * ns[i])
                            n_out += 1
                        else:
                            where[h] = -2
                    elif where[h] >= 0:
                        out_scores[where[h]] = <float32_t>(out_scores[where[h]] + w * ns[i])
    finally:
        free(keys)
        free(where)
    return n_out


def merge_sources(const int32_t[::1] rows, const int8_t[::1] src, const float32_t[::1] scores,
                  int32_t[::1] out_rows, uint8_t[::1] out_sources, float32_t[:, ::1] out_scores) -> int:
    """De-duplicate the concatenated sources.

    ``out_scores`` comes in zeroed, shape (>= n unique, n sources); for each
    distinct row it gets the bitmask of the sources that proposed it and each
    source's score (the largest, should a source propose a row twice). Returns
    the number of distinct rows.
    """
    cdef intp_t i, h, at, size, n = rows.shape[0], n_out = 0, n_src = out_scores.shape[1]
    cdef int bits, bad = 0
    cdef int8_t s
    if src.shape[0] != n or scores.shape[0] != n:
        raise ValueError("rows, src and scores differ in length")
    if out_rows.shape[0] < n or out_sources.shape[0] < n or out_scores.shape[0] < n or n_src > 8:
        raise ValueError(f"outputs need room for {n} rows and at most 8 sources")
    with nogil:
        for i in range(n):
            bad |= src[i] < 0 or src[i] >= n_src
    if bad:
        raise ValueError(f"src must be in [0, {n_src})")
    bits = _table_bits(n)
    size = <intp_t>1 << bits
    cdef int32_t* keys = <int32_t*>malloc(size * sizeof(int32_t))
    cdef int32_t* where = <int32_t*>malloc(size * sizeof(int32_t))
    if keys == NULL or where == NULL:
        free(keys)
        free(where)
        raise MemoryError()
    memset(keys, 0xFF, size * sizeof(int32_t))
    with nogil:
        for i in range(n):
            h = _slot(keys, bits, rows[i])
            s = src[i]
            if keys[h] == -1:
                keys[h] = rows[i]
                where[h] = <int32_t>n_out
                out_rows[n_out] = rows[i]
                out_sources[n_out] = <uint8_t>(1 << s)
                out_scores[n_out, s] = scores[i]
                n_out += 1
            else:
                at = where[h]
                if out_sources[at] & (1 << s):
                    if scores[i] > out_scores[at, s]:
                        out_scores[at, s] = scores[i]
                else:
                    out_sources[at] |= <uint8_t>(1 << s)
                    out_scores[at, s] = scores[i]
    free(keys)
    free(where)
    return n_out
