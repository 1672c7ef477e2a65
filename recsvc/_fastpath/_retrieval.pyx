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
#   assemble_candidates   everything after the graph search in one call: the
#                         ANN answer, the top-popular list and the fresh index
#                         filtered, the shares (unused share flowing on), and
#                         the merge with the ranked co-occurrence rows; returns
#                         the number of candidates (or asks for more input).
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

from recsvc._fastpath._typedefs cimport (float32_t, float64_t, int8_t, int32_t, int64_t, intp_t, uint8_t, uint32_t,
                                         uint64_t)

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
    # assemble_candidates only: not errors, requests for more input (the wrapper returns them)
    ANN_SHORT = -6          # too few of the ANN answer are eligible: fetch twice as many and call again
    POPULAR_SHORT = -7      # the popular scores cover too short a prefix of the top list: score all of it
    COOC_TIES = -8          # the co-occurrence top list has ties numpy's argpartition orders its own way:
                            # rank it with numpy and pass it ranked

ANN_SHORT_STATUS = ANN_SHORT
POPULAR_SHORT_STATUS = POPULAR_SHORT
COOC_TIES_STATUS = COOC_TIES


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
    cdef intp_t j, n_total = 0
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
    return _aggregate(lists, n_lists, &weights[0] if n_lists else NULL, &f, n_total,
                      &out_rows[0] if n_total else NULL, &out_scores[0] if n_total else NULL)


cdef intp_t _aggregate(
    const NeighbourList* lists,          # IN  (n_lists,) checked: n_scores == n_rows each
    intp_t n_lists,                      # IN
    const float64_t* weights,            # IN  (n_lists,)
    const RowFilter* f,                  # IN
    intp_t n_total,                      # IN  sum of n_rows
    int32_t* out_rows,                   # OUT (n_total,) distinct eligible rows, first seen first
    float32_t* out_scores,               # OUT (n_total,) their weighted score sums
) noexcept nogil:
    """The aggregation of ``_aggregate_neighbours`` on checked inputs; returns the rows written. Without a
    filter (``f`` NULL) every row is kept: the sums of the eligible ones are the same."""
    cdef HashTable t
    cdef intp_t j, i, h, n_out = 0
    cdef const int32_t* nr
    cdef const float64_t* ns
    cdef int32_t row
    cdef double w
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
                if f == NULL or _eligible(f, row):
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


# --------------------------------------------------------------------------
# The candidates after the graph search, in one call

cdef enum:
    N_SOURCES = 4            # ann, cooccurrence, popular, fresh (recsvc.retrieval.candidates.SOURCE_NAMES)
    POPULAR_MIN_PREFIX = 64  # the popular source filters a prefix of max(2 * want, 64) rows first
    FRESH_MIN_CHUNK = 256    # the fresh source filters chunks of max(4 * want, 256) rows


cdef struct SourceInputs:
    const uint64_t* ann_labels           # (n_ann,) the graph search's labels (catalog rows), best first
    const float32_t* ann_values          # (n_ann,) its distances (score = 1 - d) or, with ann_exact, similarities
    intp_t n_ann
    bint ann_exact                       # the values are similarities already (an exact scan, not a search)
    intp_t ann_want                      # the ANN source's share
    intp_t ann_k                         # the fetch it asked for; 0: never ask for more
    const NeighbourList* lists           # (n_lists,) the recent items' neighbour rows and scores, checked
    intp_t n_lists
    const float64_t* weights             # (n_lists,) weight of each list
    intp_t cooc_want                     # the co-occurrence source's share
    bint cooc_ranked                     # the lists are not used: cooc_rows / cooc_scores are the source's rows
    const int32_t* cooc_rows             # (n_cooc,) ranked co-occurrence rows (already filtered), best first
    const float32_t* cooc_scores         # (n_cooc,)
    intp_t n_cooc
    const int32_t* popular               # (n_popular,) the top-popular list, most popular first
    intp_t n_popular
    const float32_t* popular_scores      # (n_popular_scores,) the score of each row of a prefix of that list
    intp_t n_popular_scores
    intp_t popular_want                  # the popular source's share (>= 1)
    const int32_t* fresh_rows            # (n_fresh,) the fresh index: rows newest first
    const int64_t* fresh_neg_created     # (n_fresh,) their negated creation times (ascending)
    intp_t n_fresh
    int64_t now_ms
    int64_t fresh_window_ms              # int(window_days * DAY_MS)
    float64_t fresh_window_days
    intp_t fresh_want                    # the fresh source's share (>= 1)


cdef inline intp_t _search_int64(const int64_t* a, intp_t n, int64_t key, bint right) noexcept nogil:
    """``np.searchsorted(a, key, side="right" if right else "left")`` on an ascending array."""
    cdef intp_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < key or (right and a[mid] == key):
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline void _merge_one(HashTable* t, int32_t row, int s, float32_t score, int32_t* out_rows,
                            uint8_t* out_sources, float32_t* out_scores, intp_t* n_out) noexcept nogil:
    """One entry of ``_merge_sources``'s loop (out_scores rows are N_SOURCES wide)."""
    cdef intp_t h = _slot(t.keys, t.bits, row), at
    if t.keys[h] == -1:
        t.keys[h] = row
        at = n_out[0]
        t.where[h] = <int32_t>at
        out_rows[at] = row
        out_sources[at] = <uint8_t>(1 << s)
        out_scores[at * N_SOURCES + s] = score
        n_out[0] = at + 1
    else:
        at = t.where[h]
        if out_sources[at] & (1 << s):
            if score > out_scores[at * N_SOURCES + s]:
                out_scores[at * N_SOURCES + s] = score
        else:
            out_sources[at] |= <uint8_t>(1 << s)
            out_scores[at * N_SOURCES + s] = score


cdef struct Ranked:
    float32_t value
    int32_t at                           # position in the aggregation (first seen first)


cdef inline bint _before(const Ranked* a, const Ranked* b) noexcept nogil:
    """Higher value first, then earlier: ``np.argsort(-values, kind="stable")``'s order."""
    return a.value > b.value or (a.value == b.value and a.at < b.at)


cdef void _sort_ranked(Ranked* a, Ranked* tmp, intp_t n) noexcept nogil:
    """Merge sort by ``_before`` (a total order: the result is unique)."""
    cdef intp_t width = 1, lo, mid, hi, i, j, k
    cdef Ranked* src = a
    cdef Ranked* dst = tmp
    cdef Ranked* swap
    while width < n:
        lo = 0
        while lo < n:
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if _before(&src[j], &src[i]):
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
            lo = hi
        swap = src
        src = dst
        dst = swap
        width *= 2
    if src != a:
        for i in range(n):
            a[i] = src[i]


cdef intp_t _rank_cooccurrence(
    const SourceInputs* s,               # IN  the neighbour lists, their weights and the share
    const RowFilter* f,                  # IN
    int32_t* rows,                       # OUT (sum of list lengths,) the ranked rows, best first
    float32_t* scores,                   # OUT (sum of list lengths,) their scores
) noexcept nogil:
    """Retriever.cooccurrence_source after its lists: the aggregation, then the best ``2 * want`` eligible
    rows by score (ties: first seen first). Returns how many, or COOC_TIES where numpy's argpartition
    would pick or order tied rows its own way (more eligible rows than that, and a tie among the best or
    at the cut), or when a sum is NaN.

    Every row is summed and ranked first, and the filter is asked only along the ranking until
    ``2 * want + 1`` rows passed: the rows it never reaches are never loaded (cache misses are most of
    this stage's cost). Filtering keeps the first-seen order, so the eligible rows come out in the order
    the aggregation over eligible rows only would rank them."""
    cdef intp_t j, i, n, n_total = 0, take = 2 * s.cooc_want, found = 0
    cdef Ranked* ranked
    cdef int32_t* agg_rows
    cdef float32_t* agg_scores
    cdef int32_t row
    for j in range(s.n_lists):
        n_total += s.lists[j].n_rows
    if n_total == 0 or s.cooc_want <= 0:
        return 0
    ranked = <Ranked*>malloc(2 * n_total * sizeof(Ranked) + n_total * (sizeof(int32_t) + sizeof(float32_t)))
    if ranked == NULL:
        return NO_MEMORY
    agg_rows = <int32_t*>(ranked + 2 * n_total)
    agg_scores = <float32_t*>(agg_rows + n_total)
    n = _aggregate(s.lists, s.n_lists, s.weights, NULL, n_total, agg_rows, agg_scores)
    if n < 0:
        free(ranked)
        return n
    for i in range(n):
        if agg_scores[i] != agg_scores[i]:  # NaN: numpy sorts it its own way
            free(ranked)
            return COOC_TIES
        ranked[i].value = agg_scores[i]
        ranked[i].at = <int32_t>i
    _sort_ranked(ranked, ranked + n_total, n)
    # the eligible ones along the ranking, up to one past the cut (kept in place at the front)
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            _prefetch_filter_row(f, agg_rows[ranked[i + PREFETCH_AHEAD].at])
        if _eligible(f, agg_rows[ranked[i].at]):
            ranked[found] = ranked[i]
            found += 1
            if found > take:
                break
    if found > take:
        for i in range(take):
            if ranked[i].value == ranked[i + 1].value:
                free(ranked)
                return COOC_TIES
        found = take
    for i in range(found):
        rows[i] = agg_rows[ranked[i].at]
        scores[i] = ranked[i].value
    free(ranked)
    return found


cdef struct Lazy:
    # One source's rows filtered on demand: only as far as the shares need (each row's columns are a
    # cache miss or three; the rows no share reaches are never loaded).
    const int32_t* rows                  # the source's rows (NULL: read ``labels`` instead)
    const uint64_t* labels               # the graph search's labels
    int32_t* at                          # OUT positions of the eligible rows found so far
    intp_t n_ok                          # eligible rows found so far
    intp_t scanned                       # rows looked at
    intp_t end                           # rows it may look at for now
    intp_t limit                         # rows there are
    # popular: past the prefix only when it holds fewer than ``want``; fresh: chunk after chunk while the
    # rows found are fewer than ``want``
    intp_t chunk                         # 0: no chunks (ann); > 0: the next end is end + chunk
    intp_t want
    bint whole_after_prefix              # popular: one extension to the whole list


cdef inline int32_t _lazy_row(const Lazy* z, intp_t i) noexcept nogil:
    return z.rows[i] if z.rows != NULL else <int32_t>z.labels[i]


cdef bint _lazy_extend(Lazy* z) noexcept nogil:
    """The source's rule for looking past ``end`` (it has been reached); False: the list is complete."""
    if z.whole_after_prefix:
        if z.n_ok < z.want and z.limit > z.end:
            z.end = z.limit
            z.whole_after_prefix = False
            return True
        return False
    if z.chunk > 0 and z.n_ok < z.want and z.end < z.limit:
        z.end = min(z.end + z.chunk, z.limit)
        return True
    return False


cdef intp_t _lazy_fill(Lazy* z, const RowFilter* f, intp_t k) noexcept nogil:
    """Filter until ``k`` eligible rows are found or the list is complete; returns the rows found."""
    cdef intp_t i
    while z.n_ok < k:
        if z.scanned >= z.end and not _lazy_extend(z):
            break
        i = z.scanned
        if i + PREFETCH_AHEAD < z.end:
            _prefetch_filter_row(f, _lazy_row(z, i + PREFETCH_AHEAD))
        if _eligible(f, _lazy_row(z, i)):
            z.at[z.n_ok] = <int32_t>i
            z.n_ok += 1
        z.scanned = i + 1
    return z.n_ok


cdef intp_t _assemble_candidates(
    const SourceInputs* s,               # IN  the sources' raw inputs (see SourceInputs)
    const RowFilter* f,                  # IN  the request's filter
    const intp_t* want,                  # IN  (N_SOURCES,) each source's share of the candidates
    intp_t total,                        # IN  candidates wanted in all
    int32_t* out_rows,                   # OUT (cap,) distinct rows, first seen first
    uint8_t* out_sources,                # OUT (cap,) bitmask of the sources that proposed each row
    float32_t* out_scores,               # OUT (cap, N_SOURCES), comes in zeroed: each source's score
    intp_t cap,                          # IN  room in the outputs: >= max(total, sum of want)
) noexcept nogil:
    cdef intp_t i, k, lo, hi, take, spare, extra, n_in = 0, n_out = 0
    cdef intp_t taken[N_SOURCES]
    cdef int32_t* scratch
    cdef Lazy ann, pop, fresh
    cdef Lazy* lazy[N_SOURCES]
    cdef HashTable t
    cdef float32_t one = 1.0
    cdef intp_t n_lists_rows = 0, n_cooc = s.n_cooc
    cdef const int32_t* cooc_rows = s.cooc_rows
    cdef const float32_t* cooc_scores = s.cooc_scores
    cdef int32_t* cooc_ranked_rows
    cdef float32_t* cooc_ranked_scores
    if not s.cooc_ranked:
        for i in range(s.n_lists):
            n_lists_rows += s.lists[i].n_rows
    scratch = <int32_t*>malloc((s.n_ann + s.n_popular + s.n_fresh + 2 * n_lists_rows + 1) * sizeof(int32_t))
    if scratch == NULL:
        return NO_MEMORY
    cooc_ranked_rows = scratch + s.n_ann + s.n_popular + s.n_fresh
    cooc_ranked_scores = <float32_t*>(cooc_ranked_rows + n_lists_rows)

    # co-occurrence: ranked here (Retriever.cooccurrence_source), or by the caller
    if s.cooc_ranked:
        for i in range(s.n_cooc):
            if s.cooc_rows[i] < 0:
                free(scratch)
                return NEGATIVE_ROW
    else:
        n_cooc = _rank_cooccurrence(s, f, cooc_ranked_rows, cooc_ranked_scores)
        if n_cooc < 0:
            free(scratch)
            return n_cooc
        cooc_rows, cooc_scores = cooc_ranked_rows, cooc_ranked_scores

    # ANN: the eligible rows of the answer (Retriever.ann_source); short of the share, a larger fetch
    ann.rows, ann.labels, ann.at = NULL, s.ann_labels, scratch
    ann.n_ok, ann.scanned, ann.end, ann.limit = 0, 0, s.n_ann, s.n_ann
    ann.chunk, ann.want, ann.whole_after_prefix = 0, s.ann_want, False
    if (s.ann_k > 0 and _lazy_fill(&ann, f, s.ann_want) < s.ann_want and s.n_ann >= s.ann_k
            and s.ann_k < 16 * s.ann_want):
        free(scratch)
        return ANN_SHORT

    # popular: the eligible rows of a prefix, or of the whole list when the prefix has fewer than the share
    # (Retriever.popular_source)
    take = max(2 * s.popular_want, <intp_t>POPULAR_MIN_PREFIX)
    pop.rows, pop.labels, pop.at = s.popular, NULL, scratch + s.n_ann
    pop.n_ok, pop.scanned, pop.end, pop.limit = 0, 0, min(take, s.n_popular), s.n_popular
    pop.chunk, pop.want, pop.whole_after_prefix = 0, s.popular_want, True
    if pop.end > s.n_popular_scores:
        free(scratch)
        return POPULAR_SHORT
    _lazy_fill(&pop, f, s.popular_want)  # (decides whether the whole list is looked at)
    if pop.end > s.n_popular_scores:
        free(scratch)
        return POPULAR_SHORT

    # fresh: created in (now - window, now], newest first, filtered chunk by chunk until twice the share
    # (Retriever.fresh_source)
    lo = _search_int64(s.fresh_neg_created, s.n_fresh, -s.now_ms, False)
    hi = _search_int64(s.fresh_neg_created, s.n_fresh, -(s.now_ms - s.fresh_window_ms), True)
    fresh.rows, fresh.labels, fresh.at = s.fresh_rows, NULL, scratch + s.n_ann + s.n_popular
    fresh.n_ok, fresh.scanned, fresh.limit = 0, lo, max(hi, lo)
    fresh.chunk = max(4 * s.fresh_want, <intp_t>FRESH_MIN_CHUNK)
    fresh.end = min(lo + fresh.chunk, fresh.limit)
    fresh.want, fresh.whole_after_prefix = 2 * s.fresh_want, False

    # the shares: each source's want, then unused share flows to the sources that have more (Retriever._merge)
    lazy[0], lazy[1], lazy[2], lazy[3] = &ann, NULL, &pop, &fresh
    spare = total
    for k in range(N_SOURCES):
        taken[k] = min(want[k], n_cooc if k == 1 else _lazy_fill(lazy[k], f, want[k]))
        spare -= taken[k]
    for k in range(N_SOURCES):
        if spare <= 0:
            break
        extra = min(spare, (n_cooc if k == 1 else _lazy_fill(lazy[k], f, taken[k] + spare)) - taken[k])
        if extra > 0:
            taken[k] += extra
            spare -= extra
    for k in range(N_SOURCES):
        if taken[k] > 0:
            n_in += taken[k]
    if n_in > cap:
        free(scratch)
        return BAD_SHAPE
    if not _table_init(&t, n_in):
        free(scratch)
        return NO_MEMORY

    # the merge, sources in priority order (merge_sources)
    for i in range(taken[0]):
        k = ann.at[i]
        _merge_one(&t, <int32_t>s.ann_labels[k], 0,
                   s.ann_values[k] if s.ann_exact else one - s.ann_values[k],
                   out_rows, out_sources, out_scores, &n_out)
    for i in range(taken[1]):
        _merge_one(&t, cooc_rows[i], 1, cooc_scores[i], out_rows, out_sources, out_scores, &n_out)
    for i in range(taken[2]):
        k = pop.at[i]
        _merge_one(&t, s.popular[k], 2, s.popular_scores[k], out_rows, out_sources, out_scores, &n_out)
    for i in range(taken[3]):
        k = fresh.at[i]
        # (1 - age_days / window_days) in float64, then float32, as numpy computes it
        _merge_one(&t, s.fresh_rows[k], 3,
                   <float32_t>(1.0 - (<float64_t>(s.now_ms + s.fresh_neg_created[k]) / 86400000.0)
                               / s.fresh_window_days),
                   out_rows, out_sources, out_scores, &n_out)
    _table_free(&t)
    free(scratch)
    return n_out


cdef const void* _array_data(object x, int typenum, intp_t* n, str name, bint writable=False) except? NULL:
    """The data pointer of a C-contiguous 1-D ndarray of this dtype (its length in ``n``); anything else is
    refused (recsvc.retrieval.kernels coerces). No typed memoryview: ~1 us each."""
    if not (type(x) is _ndarray and cnp.PyArray_TYPE(<cnp.ndarray> x) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray> x) == 1
            and (cnp.PyArray_ISCARRAY(<cnp.ndarray> x) if writable else cnp.PyArray_ISCARRAY_RO(<cnp.ndarray> x))):
        raise ValueError(f"{name} must be a {'writable, ' if writable else ''}C-contiguous 1-D "
                         f"{_dtype_of_num(typenum)} array (call it through recsvc.retrieval.kernels)")
    n[0] = cnp.PyArray_DIM(<cnp.ndarray> x, 0)
    return cnp.PyArray_DATA(<cnp.ndarray> x) if n[0] else NULL


def assemble_candidates(ann_labels, ann_values, bint ann_exact, intp_t ann_want, intp_t ann_k,
                        list neighbour_rows, list neighbour_scores, neighbour_weights, intp_t cooc_want,
                        bint cooc_ranked, cooc_rows, cooc_scores,
                        popular, popular_scores, intp_t popular_want,
                        fresh_rows, fresh_neg_created, int64_t now_ms, int64_t fresh_window_ms,
                        float64_t fresh_window_days, intp_t fresh_want,
                        intp_t want_ann, intp_t want_cooccurrence, intp_t want_popular, intp_t want_fresh,
                        intp_t total,
                        alive, maturity, categories, int32_t max_maturity,
                        allowed, bint has_allowed, blocked, exclude,
                        out_rows, out_sources, out_scores) -> int:
    """The merged candidates of one request from its sources' raw inputs; see
    recsvc.retrieval.kernels.assemble_candidates. Returns the number of candidates, or ANN_SHORT_STATUS /
    POPULAR_SHORT_STATUS / COOC_TIES_STATUS (call again with more input)."""
    cdef SourceInputs s
    cdef NeighbourList* lists = NULL
    cdef tuple rows_held, scores_held
    cdef list buffers_held = []
    cdef intp_t j
    cdef RowFilter f
    cdef intp_t n, n_alive, n_mat, n_cat, n_allowed, n_blocked, n_exclude, cap, n_src_rows, n_scores, count
    cdef intp_t want[N_SOURCES]
    cdef const uint8_t* alive_p
    cdef const int32_t* maturity_p
    cdef const int32_t* categories_p
    cdef const uint8_t* allowed_p
    cdef const uint8_t* blocked_p
    cdef const int32_t* exclude_p
    cdef int32_t* rows_out
    cdef uint8_t* sources_out
    cdef float32_t* scores_out
    cdef intp_t i
    s.ann_labels = <const uint64_t*>_array_data(ann_labels, cnp.NPY_UINT64, &s.n_ann, "ann_labels")
    s.ann_values = <const float32_t*>_array_data(ann_values, cnp.NPY_FLOAT32, &n, "ann_values")
    if n != s.n_ann:
        return _check(BAD_SHAPE)
    s.ann_exact, s.ann_want, s.ann_k = ann_exact, ann_want, ann_k
    s.cooc_want, s.cooc_ranked = cooc_want, cooc_ranked
    s.weights = <const float64_t*>_array_data(neighbour_weights, cnp.NPY_FLOAT64, &n, "neighbour_weights")
    # held (a snapshot, should the caller's lists change) while the kernel reads them without the GIL
    rows_held, scores_held = tuple(neighbour_rows), tuple(neighbour_scores)
    s.n_lists = 0 if cooc_ranked else len(rows_held)
    if s.n_lists and (len(scores_held) != s.n_lists or n < s.n_lists):
        return _check(BAD_SHAPE)
    s.cooc_rows = <const int32_t*>_array_data(cooc_rows, cnp.NPY_INT32, &s.n_cooc, "cooc_rows")
    s.cooc_scores = <const float32_t*>_array_data(cooc_scores, cnp.NPY_FLOAT32, &n, "cooc_scores")
    if n != s.n_cooc:
        return _check(BAD_SHAPE)
    s.popular = <const int32_t*>_array_data(popular, cnp.NPY_INT32, &s.n_popular, "popular")
    s.popular_scores = <const float32_t*>_array_data(popular_scores, cnp.NPY_FLOAT32, &s.n_popular_scores,
                                                     "popular_scores")
    s.popular_want = popular_want
    s.fresh_rows = <const int32_t*>_array_data(fresh_rows, cnp.NPY_INT32, &s.n_fresh, "fresh_rows")
    s.fresh_neg_created = <const int64_t*>_array_data(fresh_neg_created, cnp.NPY_INT64, &n, "fresh_neg_created")
    if n != s.n_fresh:
        return _check(BAD_SHAPE)
    s.now_ms, s.fresh_window_ms, s.fresh_window_days, s.fresh_want = (now_ms, fresh_window_ms,
                                                                      fresh_window_days, fresh_want)
    want[0], want[1], want[2], want[3] = want_ann, want_cooccurrence, want_popular, want_fresh
    alive_p = <const uint8_t*>_array_data(alive, cnp.NPY_UINT8, &n_alive, "alive")
    maturity_p = <const int32_t*>_array_data(maturity, cnp.NPY_INT32, &n_mat, "maturity")
    categories_p = <const int32_t*>_array_data(categories, cnp.NPY_INT32, &n_cat, "categories")
    allowed_p = <const uint8_t*>_array_data(allowed, cnp.NPY_UINT8, &n_allowed, "allowed")
    blocked_p = <const uint8_t*>_array_data(blocked, cnp.NPY_UINT8, &n_blocked, "blocked")
    exclude_p = <const int32_t*>_array_data(exclude, cnp.NPY_INT32, &n_exclude, "exclude")
    rows_out = <int32_t*>_array_data(out_rows, cnp.NPY_INT32, &cap, "out_rows", True)
    sources_out = <uint8_t*>_array_data(out_sources, cnp.NPY_UINT8, &n, "out_sources", True)
    if n < cap:
        cap = n
    if not (type(out_scores) is _ndarray and cnp.PyArray_TYPE(<cnp.ndarray> out_scores) == cnp.NPY_FLOAT32
            and cnp.PyArray_NDIM(<cnp.ndarray> out_scores) == 2 and cnp.PyArray_ISCARRAY(<cnp.ndarray> out_scores)
            and cnp.PyArray_DIM(<cnp.ndarray> out_scores, 1) == N_SOURCES):
        raise ValueError(f"out_scores must be a writable, C-contiguous float32 array of shape (rows, {N_SOURCES})")
    if cnp.PyArray_DIM(<cnp.ndarray> out_scores, 0) < cap:
        cap = cnp.PyArray_DIM(<cnp.ndarray> out_scores, 0)
    scores_out = <float32_t*>cnp.PyArray_DATA(<cnp.ndarray> out_scores)
    if n_mat < n_alive or n_cat < n_alive:
        return _check(BAD_SHAPE)
    for i in range(1, n_exclude):
        if exclude_p[i] < exclude_p[i - 1]:
            return _check(UNSORTED_EXCLUDE)
    f.alive, f.n_rows, f.maturity, f.categories, f.max_maturity = (alive_p, n_alive, maturity_p, categories_p,
                                                                   max_maturity)
    f.allowed, f.n_allowed, f.has_allowed = allowed_p, n_allowed, has_allowed
    f.blocked, f.n_blocked, f.exclude, f.n_exclude = blocked_p, n_blocked, exclude_p, n_exclude
    lists = <NeighbourList*>malloc((s.n_lists if s.n_lists else 1) * sizeof(NeighbourList))
    if lists == NULL:
        return _check(NO_MEMORY)
    try:
        for j in range(s.n_lists):
            lists[j].rows = <const int32_t*> _vector_data(rows_held[j], cnp.NPY_INT32, &lists[j].n_rows,
                                                          buffers_held)
            lists[j].scores = <const float64_t*> _vector_data(scores_held[j], cnp.NPY_FLOAT64,
                                                              &lists[j].n_scores, buffers_held)
            if lists[j].n_scores != lists[j].n_rows:
                return _check(BAD_SHAPE)
        s.lists = lists
        # The kernel reads these without the GIL: the locals above hold every array meanwhile.
        with nogil:
            count = _assemble_candidates(&s, &f, want, total, rows_out, sources_out, scores_out, cap)
    finally:
        free(lists)
    if count == ANN_SHORT or count == POPULAR_SHORT or count == COOC_TIES:
        return count
    return _check(count)
