# Candidate-generation kernels: the request filter, the co-occurrence
# aggregation and the merge of the sources, each one pass over ~1000 rows.
#
#   eligible_mask         out[i] = whether rows[i] may be served (alive, mature
#                         enough, category allowed and not blocked, not
#                         excluded); returns how many may.
#   aggregate_neighbours  the sum of weights[j] * neighbour_scores[j][i] per
#                         distinct neighbour row, over every list j, for the
#                         eligible rows only; returns how many rows it wrote.
#   merge_sources         de-duplicates the concatenated sources: per distinct
#                         row, the bitmask of the sources that proposed it and
#                         each source's score (its largest, should it propose
#                         the row twice); returns the number of distinct rows.
#
# recsvc.retrieval.kernels validates and prepares every argument (dtypes,
# contiguity, lengths, output sizes, source indices); its caller,
# recsvc.retrieval.sources, resolves the request (filters to catalog codes,
# sources to ranked arrays) and allocates the outputs. These kernels only
# compute. They still check the few things that would otherwise read or write
# out of bounds (lengths against each other, output sizes, source indices) and
# the two inputs that would make them silently wrong (an unsorted ``exclude``,
# a negative row in the merge's hash table), and report them, like a failed
# allocation of the hash table, as a status; the ``def`` wrapper raises once it
# holds the GIL again. The numpy twins (twins/retrieval.py) give the same results.
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

cimport numpy as cnp
from numpy import ascontiguousarray as _ascontiguousarray
from numpy import asarray as _asarray
from numpy import dtype as _dtype
from numpy import ndarray as _ndarray

cnp.import_array()

cdef extern from "_simd.h":
    void RECSVC_PREFETCH(const void* p) noexcept nogil

cdef enum:
    PREFETCH_AHEAD = 8  # eligibility: the rows are random (an ANN answer), so fetch their columns early

_DTYPES = {cnp.NPY_INT32: _dtype("int32"), cnp.NPY_FLOAT64: _dtype("float64")}


cdef object _dtype_of_num(int typenum):
    return _DTYPES[typenum]


# Kernels return a count (>= 0) or one of these.
cdef enum Status:
    BAD_SHAPE = -1          # lengths disagree, an output is too small, or more than 8 sources
    BAD_SOURCE = -2         # a source index outside [0, n_sources)
    NO_MEMORY = -3          # the hash table could not be allocated
    UNSORTED_EXCLUDE = -4   # exclude is not sorted: the binary search would miss rows
    NEGATIVE_ROW = -5       # merge_sources: a row < 0 (-1 marks an empty hash slot)


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


cdef struct HashTable:
    int bits
    int32_t* keys       # row per slot, -1 = empty
    int32_t* where      # output index per slot (aggregate_neighbours: -2 = ineligible)


cdef inline void _table_free(HashTable* t) noexcept nogil:
    free(t.keys)
    free(t.where)
    t.keys = NULL
    t.where = NULL


cdef inline bint _table_init(HashTable* t, intp_t n_keys) noexcept nogil:
    """A table for ``n_keys`` rows, every slot empty; False if out of memory."""
    cdef intp_t size
    t.bits = _table_bits(n_keys)
    size = <intp_t>1 << t.bits
    t.keys = <int32_t*>malloc(size * sizeof(int32_t))
    t.where = <int32_t*>malloc(size * sizeof(int32_t))
    if t.keys == NULL or t.where == NULL:
        _table_free(t)
        return False
    memset(t.keys, 0xFF, size * sizeof(int32_t))
    return True


# --------------------------------------------------------------------------
# The request filter

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


cdef inline int _row_filter(
    RowFilter* f,                        # OUT the filter on raw pointers
    const uint8_t[::1] alive,            # IN  (N,) nonzero = live
    const int32_t[::1] maturity,         # IN  (>= N,)
    const int32_t[::1] categories,       # IN  (>= N,) category code per row
    int32_t max_maturity,                # IN
    const uint8_t[::1] allowed,          # IN  (C_a,) nonzero = allowed, per category code
    bint has_allowed,                    # IN  False: every category is allowed (``allowed`` unused)
    const uint8_t[::1] blocked,          # IN  (C_b,) nonzero = blocked, per category code; (0,): none
    const int32_t[::1] exclude,          # IN  (E,) rows never served, sorted ascending
) noexcept nogil:
    """Fill ``f``; BAD_SHAPE if maturity or categories do not cover every row of
    alive, UNSORTED_EXCLUDE if exclude is not sorted."""
    cdef intp_t i
    if maturity.shape[0] < alive.shape[0] or categories.shape[0] < alive.shape[0]:
        return BAD_SHAPE
    for i in range(1, exclude.shape[0]):
        if exclude[i] < exclude[i - 1]:
            return UNSORTED_EXCLUDE
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
    return 0


cdef inline bint _excluded(const RowFilter* f, int32_t row) noexcept nogil:
    cdef intp_t lo = 0, hi = f.n_exclude, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if f.exclude[mid] < row:
            lo = mid + 1
        else:
            hi = mid
    return lo < f.n_exclude and f.exclude[lo] == row


cdef inline void _prefetch_filter_row(const RowFilter* f, int32_t row) noexcept nogil:
    """Start loading the columns ``_eligible`` reads for ``row``."""
    if 0 <= row < f.n_rows:
        RECSVC_PREFETCH(&f.alive[row])
        RECSVC_PREFETCH(&f.maturity[row])
        RECSVC_PREFETCH(&f.categories[row])


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


cdef intp_t _eligible_mask(
    const int32_t[::1] rows,             # IN  (n,) any values: outside [0, N) is not eligible
    const uint8_t[::1] alive,            # IN  (N,)
    const int32_t[::1] maturity,         # IN  (>= N,)
    const int32_t[::1] categories,       # IN  (>= N,)
    int32_t max_maturity,                # IN
    const uint8_t[::1] allowed,          # IN  (C_a,)
    bint has_allowed,                    # IN
    const uint8_t[::1] blocked,          # IN  (C_b,)
    const int32_t[::1] exclude,          # IN  (E,) sorted
    uint8_t[::1] out,                    # OUT (>= n,) 1 = may be served
) noexcept nogil:
    cdef RowFilter f
    cdef intp_t i, n = rows.shape[0], count = 0
    cdef uint8_t ok
    cdef int status = _row_filter(&f, alive, maturity, categories, max_maturity, allowed, has_allowed,
                                  blocked, exclude)
    if status < 0:
        return status
    if out.shape[0] < n:
        return BAD_SHAPE
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            _prefetch_filter_row(&f, rows[i + PREFETCH_AHEAD])
        ok = _eligible(&f, rows[i])
        out[i] = ok
        count += ok
    return count


def eligible_mask(const int32_t[::1] rows, const uint8_t[::1] alive, const int32_t[::1] maturity,
                  const int32_t[::1] categories, int32_t max_maturity,
                  const uint8_t[::1] allowed, bint has_allowed, const uint8_t[::1] blocked,
                  const int32_t[::1] exclude, uint8_t[::1] out) -> int:
    """out[i] = whether rows[i] may be served; returns how many may."""
    cdef intp_t count
    with nogil:
        count = _eligible_mask(rows, alive, maturity, categories, max_maturity, allowed, has_allowed,
                               blocked, exclude, out)
    return _check(count)


# --------------------------------------------------------------------------
# Co-occurrence aggregation

cdef struct NeighbourList:
    const int32_t* rows                  # n_rows neighbour rows
    const float64_t* scores              # n_scores scores (n_scores == n_rows, checked)
    intp_t n_rows
    intp_t n_scores


cdef intp_t _aggregate_neighbours(
    const NeighbourList* lists,          # IN  (n_lists,) the recent items' neighbour rows and scores
    intp_t n_lists,                      # IN
    const float64_t[::1] weights,        # IN  (>= n_lists,) weight of each list
    const uint8_t[::1] alive,            # IN  (N,)
    const int32_t[::1] maturity,         # IN  (>= N,)
    const int32_t[::1] categories,       # IN  (>= N,)
    int32_t max_maturity,                # IN
    const uint8_t[::1] allowed,          # IN  (C_a,)
    bint has_allowed,                    # IN
    const uint8_t[::1] blocked,          # IN  (C_b,)
    const int32_t[::1] exclude,          # IN  (E,) sorted
    int32_t[::1] out_rows,               # OUT (>= sum of n_rows,) distinct eligible rows, first seen first
    float32_t[::1] out_scores,           # OUT (>= sum of n_rows,) their weighted score sums
) noexcept nogil:
    cdef RowFilter f
    cdef HashTable t
    cdef intp_t j, i, h, n_total = 0, n_out = 0
    cdef const int32_t* nr
    cdef const float64_t* ns
    cdef int32_t row
    cdef double w
    cdef int status = _row_filter(&f, alive, maturity, categories, max_maturity, allowed, has_allowed,
                                  blocked, exclude)
    if status < 0:
        return status
    if weights.shape[0] < n_lists:
        return BAD_SHAPE
    for j in range(n_lists):
        if lists[j].n_scores != lists[j].n_rows:
            return BAD_SHAPE
        n_total += lists[j].n_rows
    if out_rows.shape[0] < n_total or out_scores.shape[0] < n_total:
        return BAD_SHAPE
    if not _table_init(&t, n_total):
        return NO_MEMORY
    for j in range(n_lists):
        nr = lists[j].rows
        ns = lists[j].scores
        w = weights[j]
        for i in range(lists[j].n_rows):
            row = nr[i]
            h = _slot(t.keys, t.bits, row)
            if t.keys[h] == -1:
                t.keys[h] = row
                if _eligible(&f, row):
                    t.where[h] = <int32_t>n_out
                    out_rows[n_out] = row
                    out_scores[n_out] = <float32_t>(w * ns[i])
                    n_out += 1
                else:
                    t.where[h] = -2
            elif t.where[h] >= 0:
                out_scores[t.where[h]] = <float32_t>(out_scores[t.where[h]] + w * ns[i])
    _table_free(&t)
    return n_out


cdef const void* _vector_data(object x, int typenum, intp_t* n, list held) except? NULL:
    """The data of a 1-D array of this dtype in native byte order, its length in ``n``: an ndarray's own data
    pointer (no typed memoryview: ~1 us each, 40 per request); any other buffer (an array.array, a strided
    view) through a C-contiguous array kept in ``held``; another dtype or shape is refused."""
    if not (type(x) is _ndarray and cnp.PyArray_TYPE(<cnp.ndarray> x) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray> x) == 1 and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray> x)):
        arr = _asarray(x)
        want = _dtype_of_num(typenum)
        if arr.dtype != want or arr.ndim != 1:
            raise ValueError(f"Buffer dtype mismatch: a neighbour list must be 1-D {want} in native byte order, "
                             f"got {arr.dtype.str} with shape {arr.shape}")
        x = _ascontiguousarray(arr)
        held.append(x)
    n[0] = cnp.PyArray_DIM(<cnp.ndarray> x, 0)
    return cnp.PyArray_DATA(<cnp.ndarray> x) if n[0] else NULL


def aggregate_neighbours(list neighbour_rows, list neighbour_scores, const float64_t[::1] weights,
                         const uint8_t[::1] alive, const int32_t[::1] maturity,
                         const int32_t[::1] categories, int32_t max_maturity,
                         const uint8_t[::1] allowed, bint has_allowed, const uint8_t[::1] blocked,
                         const int32_t[::1] exclude,
                         int32_t[::1] out_rows, float32_t[::1] out_scores) -> int:
    """Sum ``weights[j] * neighbour_scores[j]`` per distinct eligible neighbour row.

    ``neighbour_rows[j]`` (int32) and ``neighbour_scores[j]`` (float64) are
    C-contiguous arrays of the same length; ``out_rows`` / ``out_scores`` need
    room for every neighbour of every list. Returns how many distinct eligible
    rows were written (first-seen order).
    """
    cdef intp_t j, n_lists, count = BAD_SHAPE
    cdef NeighbourList* lists
    # The kernel reads the lists without the GIL: hold every array (a snapshot,
    # should the caller's lists change meanwhile), and the buffer of anything
    # but an ndarray (whose memory lives as long as the array does).
    cdef tuple rows_held = tuple(neighbour_rows), scores_held = tuple(neighbour_scores)
    cdef list buffers_held = []
    n_lists = len(rows_held)
    if len(scores_held) != n_lists:
        return _check(BAD_SHAPE)
    lists = <NeighbourList*>malloc((n_lists if n_lists else 1) * sizeof(NeighbourList))
    if lists == NULL:
        return _check(NO_MEMORY)
    try:
        for j in range(n_lists):
            lists[j].rows = <const int32_t*> _vector_data(rows_held[j], cnp.NPY_INT32, &lists[j].n_rows,
                                                          buffers_held)
            lists[j].scores = <const float64_t*> _vector_data(scores_held[j], cnp.NPY_FLOAT64, &lists[j].n_scores,
                                                              buffers_held)
        with nogil:
            count = _aggregate_neighbours(lists, n_lists, weights, alive, maturity, categories, max_maturity,
                                          allowed, has_allowed, blocked, exclude, out_rows, out_scores)
    finally:
        free(lists)
    return _check(count)


# --------------------------------------------------------------------------
# Merge of the sources

cdef intp_t _merge_sources(
    const int32_t[::1] rows,             # IN  (n,) catalog rows (>= 0), the sources concatenated in priority order
    const int8_t[::1] src,               # IN  (n,) source of each entry, in [0, S)
    const float32_t[::1] scores,         # IN  (n,) score of each entry
    int32_t[::1] out_rows,               # OUT (>= n,) distinct rows, first seen first
    uint8_t[::1] out_sources,            # OUT (>= n,) bitmask of the sources that proposed each row
    float32_t[:, ::1] out_scores,        # OUT (>= n, S), S <= 8, comes in zeroed: each source's best score
) noexcept nogil:
    cdef HashTable t
    cdef intp_t i, h, at, n = rows.shape[0], n_out = 0, n_src = out_scores.shape[1]
    cdef int bad = 0, negative = 0
    cdef int8_t s
    if src.shape[0] != n or scores.shape[0] != n:
        return BAD_SHAPE
    if out_rows.shape[0] < n or out_sources.shape[0] < n or out_scores.shape[0] < n or n_src > 8:
        return BAD_SHAPE
    for i in range(n):
        bad |= src[i] < 0 or src[i] >= n_src
        negative |= rows[i] < 0
    if bad:
        return BAD_SOURCE
    if negative:
        return NEGATIVE_ROW
    if not _table_init(&t, n):
        return NO_MEMORY
    for i in range(n):
        h = _slot(t.keys, t.bits, rows[i])
        s = src[i]
        if t.keys[h] == -1:
            t.keys[h] = rows[i]
            t.where[h] = <int32_t>n_out
            out_rows[n_out] = rows[i]
            out_sources[n_out] = <uint8_t>(1 << s)
            out_scores[n_out, s] = scores[i]
            n_out += 1
        else:
            at = t.where[h]
            if out_sources[at] & (1 << s):
                if scores[i] > out_scores[at, s]:
                    out_scores[at, s] = scores[i]
            else:
                out_sources[at] |= <uint8_t>(1 << s)
                out_scores[at, s] = scores[i]
    _table_free(&t)
    return n_out


def merge_sources(const int32_t[::1] rows, const int8_t[::1] src, const float32_t[::1] scores,
                  int32_t[::1] out_rows, uint8_t[::1] out_sources, float32_t[:, ::1] out_scores) -> int:
    """De-duplicate the concatenated sources.

    ``out_scores`` comes in zeroed, shape (>= n unique, n sources); for each
    distinct row it gets the bitmask of the sources that proposed it and each
    source's score (the largest, should a source propose a row twice). Returns
    the number of distinct rows.
    """
    cdef intp_t count
    with nogil:
        count = _merge_sources(rows, src, scores, out_rows, out_sources, out_scores)
    return _check(count)


cdef intp_t _check(intp_t count) except -100:
    if count == BAD_SHAPE:
        raise ValueError("retrieval kernel: array lengths disagree, an output is too small or there are "
                         "more than 8 sources (call it through recsvc.retrieval.kernels)")
    if count == BAD_SOURCE:
        raise IndexError("retrieval kernel: a source index is outside [0, n_sources)")
    if count == NO_MEMORY:
        raise MemoryError("retrieval kernel: cannot allocate the hash table")
    if count == UNSORTED_EXCLUDE:
        raise ValueError("retrieval kernel: exclude must be sorted ascending (np.unique sorts it)")
    if count == NEGATIVE_ROW:
        raise ValueError("retrieval kernel: merge_sources rows must be catalog rows (>= 0)")
    return count
