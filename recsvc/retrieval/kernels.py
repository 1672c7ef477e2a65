"""The candidate-generation kernels, validated: the request filter, the
co-occurrence aggregation, the merge of the sources, and all of these after
the graph search in one call (:func:`assemble_candidates`).

Each function checks and prepares its arguments (dtypes, contiguity, lengths,
output sizes, ranges), raising ValueError that names the offending argument,
then runs the compiled kernel (``recsvc._fastpath._retrieval``) without the GIL.
Signatures and return values are those of the compiled module, so
``from recsvc.retrieval import kernels as _retrieval`` replaces
``from recsvc._fastpath import _retrieval`` with no other change (except for
:func:`assemble_candidates`, which takes the shares as one sequence, and the
caller's ranked co-occurrence rows as ``cooc_rows`` or None).

Filter arguments, shared by :func:`eligible_mask` and :func:`aggregate_neighbours`:

    alive:        bool or uint8[N]  live catalog rows (a view of the bool column costs nothing)
    maturity:     int32[>= N]       maturity rating per row
    categories:   int32[>= N]       category code per row
    max_maturity: int               rows rated above it are not eligible
    allowed:      bool or uint8[C]  allowed category codes, used when ``has_allowed``
    has_allowed:  bool              False: every category is allowed
    blocked:      bool or uint8[C]  blocked category codes; empty for none
    exclude:      int32[E]          rows never served, sorted ascending

A row outside ``[0, N)`` is not eligible (the catalog grew after ``alive`` was
read: read ``alive`` first, the other columns are then at least as long); a
category code beyond a mask is neither allowed nor blocked. Arrays already in
the listed dtype and C order are used as they are, never copied: the catalog
columns are large and these calls are on the request path. Outputs are the
caller's arrays, written in place.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from recsvc._fastpath import _retrieval as _native
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "recsvc._fastpath._retrieval is not compiled; run "
        "`python setup.py build_ext --inplace` (or `pip install -e .`)"
    ) from exc

__all__ = ["ANN_SHORT", "COOC_TIES", "MAX_SOURCES", "POPULAR_SHORT", "aggregate_neighbours", "assemble_candidates",
           "eligible_mask", "merge_sources", "sorted_distinct"]

#: Sources :func:`merge_sources` can tell apart (its bitmask is a uint8).
MAX_SOURCES = 8

#: :func:`assemble_candidates`' answers that ask for more input: fetch twice as many ANN neighbours,
#: score the whole top-popular list, or rank the co-occurrence rows with numpy; then call it again.
ANN_SHORT = _native.ANN_SHORT_STATUS
POPULAR_SHORT = _native.POPULAR_SHORT_STATUS
COOC_TIES = _native.COOC_TIES_STATUS
#: Sources :func:`assemble_candidates` merges: ann, cooccurrence, popular, fresh (``SOURCE_NAMES``).
ASSEMBLED_SOURCES = 4

_I8 = np.dtype(np.int8)
_I64 = np.dtype(np.int64)
_U64 = np.dtype(np.uint64)
_I32 = np.dtype(np.int32)
_U8 = np.dtype(np.uint8)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_BOOL = np.dtype(np.bool_)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_ndarray = np.ndarray
_asc = np.ascontiguousarray
_NO_ROWS = np.empty(0, np.int32)
_NO_SCORES = np.empty(0, np.float32)


def eligible_mask(
    rows: Any,
    alive: Any,
    maturity: Any,
    categories: Any,
    max_maturity: int,
    allowed: Any,
    has_allowed: bool,
    blocked: Any,
    exclude: Any,
    out: np.ndarray,
) -> int:
    """``out[i]`` = whether ``rows[i]`` may be served; returns how many may.

    rows: int32[n], any values (outside the catalog: not eligible); out: uint8
    (or bool)[>= n]. The filter arguments are described in the module docstring.
    """
    rows = _int32(rows, "rows")
    flt = _filter(alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude)
    return _native.eligible_mask(rows, *flt, _output(out, _U8, "out", rows.shape[0]))


def aggregate_neighbours(
    neighbour_rows: Sequence[Any],
    neighbour_scores: Sequence[Any],
    weights: Any,
    alive: Any,
    maturity: Any,
    categories: Any,
    max_maturity: int,
    allowed: Any,
    has_allowed: bool,
    blocked: Any,
    exclude: Any,
    out_rows: np.ndarray,
    out_scores: np.ndarray,
) -> int:
    """Sum ``weights[j] * neighbour_scores[j]`` per distinct eligible neighbour row.

    neighbour_rows:   list of int32[n_j]    each recent item's neighbour rows
    neighbour_scores: list of float64[n_j]  their scores, one array per rows array
    weights:          float64[>= J]         one weight per list
    out_rows:         int32[>= sum n_j]     distinct eligible rows, first seen first
    out_scores:       float32[>= sum n_j]   their weighted sums

    Returns how many rows were written. The filter arguments are described in
    the module docstring.
    """
    n_lists = len(neighbour_rows)
    if len(neighbour_scores) != n_lists:
        raise ValueError(
            f"one score array per neighbour array: got {n_lists} neighbour arrays "
            f"and {len(neighbour_scores)} score arrays"
        )
    weights = _float64(weights, "weights")
    if weights.shape[0] < n_lists:
        raise ValueError(
            f"one weight per neighbour array: got {n_lists} neighbour arrays and {weights.shape[0]} weights"
        )
    rows_list, scores_list = list(map(_asc, neighbour_rows)), list(map(_asc, neighbour_scores))
    n_total = 0
    for j in range(n_lists):
        r, s = rows_list[j], scores_list[j]
        if r.dtype is not _I32 or r.ndim != 1:
            rows_list[j] = r = _int32(neighbour_rows[j], f"neighbour_rows[{j}]")
        if s.dtype is not _F64 or s.ndim != 1:
            scores_list[j] = s = _float64(neighbour_scores[j], f"neighbour_scores[{j}]")
        k = len(r)
        if len(s) != k:
            raise ValueError(f"neighbour_rows[{j}] has {k} entries but neighbour_scores[{j}] has {len(s)}")
        n_total += k
    flt = _filter(alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude)
    out_rows = _output(out_rows, _I32, "out_rows", n_total)
    out_scores = _output(out_scores, _F32, "out_scores", n_total)
    return _native.aggregate_neighbours(rows_list, scores_list, weights, *flt, out_rows, out_scores)


def merge_sources(
    rows: Any,
    src: Any,
    scores: Any,
    out_rows: np.ndarray,
    out_sources: np.ndarray,
    out_scores: np.ndarray,
) -> int:
    """De-duplicate the concatenated sources, first seen first.

    rows:        int32[n]          catalog rows (>= 0), the sources in priority order, each best first
    src:         int8[n]           the source of each entry, in [0, S)
    scores:      float32[n]        the score of each entry
    out_rows:    int32[>= n]       distinct rows
    out_sources: uint8[>= n]       bitmask of the sources that proposed each row
    out_scores:  float32[>= n, S]  S <= 8, must come in zeroed; gets each source's score
                                   (its largest, should it propose a row twice)

    Returns the number of distinct rows.
    """
    rows = _int32(rows, "rows")
    scores = _float32(scores, "scores")
    n = rows.shape[0]
    if not (type(out_scores) is _ndarray and out_scores.dtype is _F32 and out_scores.ndim == 2
            and out_scores.flags.carray):  # fmt: skip
        raise ValueError("out_scores must be a writable, C-contiguous float32 numpy array of shape (rows, sources)")
    n_src = out_scores.shape[1]
    if n_src > MAX_SOURCES:
        raise ValueError(
            f"out_scores has {n_src} columns (one per source); at most {MAX_SOURCES} sources fit the bitmask"
        )
    src = _sources(src, n_src)
    if src.shape[0] != n or scores.shape[0] != n:
        raise ValueError(f"rows, src and scores differ in length: {n}, {src.shape[0]} and {scores.shape[0]}")
    if out_scores.shape[0] < n:
        raise ValueError(f"out_scores has room for {out_scores.shape[0]} rows; it needs room for {n}")
    out_rows = _output(out_rows, _I32, "out_rows", n)
    out_sources = _output(out_sources, _U8, "out_sources", n)
    try:
        return _native.merge_sources(rows, src, scores, out_rows, out_sources, out_scores)
    except IndexError:  # the kernel refused a source index before writing anything
        bad = src[(src < 0) | (src >= n_src)]
        raise ValueError(
            f"src must be in [0, {n_src}) (out_scores has one column per source), got {bad[:5].tolist()}"
        ) from None


def assemble_candidates(
    ann_labels: Any,
    ann_values: Any,
    ann_exact: bool,
    ann_want: int,
    ann_k: int,
    neighbour_rows: Sequence[Any],
    neighbour_scores: Sequence[Any],
    neighbour_weights: Any,
    cooc_want: int,
    cooc_rows: Any,
    cooc_scores: Any,
    popular: Any,
    popular_scores: Any,
    popular_want: int,
    fresh_rows: Any,
    fresh_neg_created: Any,
    now_ms: int,
    fresh_window_ms: int,
    fresh_window_days: float,
    fresh_want: int,
    want: Sequence[int],
    total: int,
    alive: Any,
    maturity: Any,
    categories: Any,
    max_maturity: int,
    allowed: Any,
    has_allowed: bool,
    blocked: Any,
    exclude: Any,
    out_rows: np.ndarray,
    out_sources: np.ndarray,
    out_scores: np.ndarray,
) -> int:
    """A request's candidates from its sources' raw inputs, in one call: what ``Retriever``'s ANN, popular
    and fresh sources and its merge do after the graph search (``recsvc.retrieval.sources``).

    ann_labels:        uint64[a]    the graph search's labels, best first (``knn_query``'s row)
    ann_values:        float32[a]   its distances (score = 1 - distance, in float32), or with ``ann_exact``
                                    the scores themselves (an exact scan)
    ann_want, ann_k:   int          the ANN share and the fetch asked for (0: never ask for more)
    neighbour_rows, neighbour_scores, neighbour_weights: the recent items' neighbour lists, int32 and
                                    float64 1-D arrays (another dtype is refused: this call does not convert
                                    them one by one as ``aggregate_neighbours`` does), and a weight per list
    cooc_want:         int          the co-occurrence share: its best ``2 * cooc_want`` rows are ranked
    cooc_rows:         int32[c]     or None; else the co-occurrence source's rows, eligible and ranked (best
    cooc_scores:       float32[c]   first), used instead of the lists
    popular:           int32[p]     the top-popular list
    popular_scores:    float32[q]   scores of its first q rows (``state.log_popularity``)
    popular_want:      int >= 1     the popular source's share
    fresh_rows:        int32[f]     the fresh index, newest first
    fresh_neg_created: int64[f]     their negated creation times, ascending
    now_ms, fresh_window_ms (``int(window_days * DAY_MS)``), fresh_window_days, fresh_want (>= 1)
    want:              4 ints       each source's share in the merge (ann, cooccurrence, popular, fresh)
    total:             int          candidates wanted
    out_rows:          int32[>= m]  m = max(total, sum(want)): the candidates, first seen first
    out_sources:       uint8[>= m]  bitmask of the sources that proposed each
    out_scores:        float32[>= m, 4], zeroed: each source's score

    Returns the number of candidates, or :data:`ANN_SHORT` (too few of the ANN answer are eligible: fetch
    ``2 * ann_k`` and call again), :data:`POPULAR_SHORT` (the filters reach past the scored prefix of the
    top-popular list: score all of it and call again) or :data:`COOC_TIES` (more than ``2 * cooc_want``
    co-occurrence rows with a tie among the best or at the cut, which numpy's ``argpartition`` resolves its
    own way: rank them as ``Retriever.cooccurrence_source`` does and pass them as ``cooc_rows``). The filter
    arguments are described in the module docstring.
    """
    if len(want) != ASSEMBLED_SOURCES:
        raise ValueError(f"want must hold one share per source ({ASSEMBLED_SOURCES}), got {len(want)}")
    ranked = cooc_rows is not None
    rows_list, scores_list = list(neighbour_rows), list(neighbour_scores)
    weights = _float64(neighbour_weights, "neighbour_weights")
    if not ranked:
        if len(scores_list) != len(rows_list) or weights.shape[0] < len(rows_list):
            raise ValueError(f"one score array and one weight per neighbour array: got {len(rows_list)} neighbour "
                             f"arrays, {len(scores_list)} score arrays and {weights.shape[0]} weights")
        cooc_rows, cooc_scores = _NO_ROWS, _NO_SCORES
    flt = _filter(alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude)
    return _native.assemble_candidates(
        _uint64(ann_labels, "ann_labels"), _float32(ann_values, "ann_values"), bool(ann_exact),
        int(ann_want), int(ann_k), rows_list, scores_list, weights, int(cooc_want), ranked,
        _int32(cooc_rows, "cooc_rows"), _float32(cooc_scores, "cooc_scores"),
        _int32(popular, "popular"), _float32(popular_scores, "popular_scores"), int(popular_want),
        _int32(fresh_rows, "fresh_rows"), _int64(fresh_neg_created, "fresh_neg_created"), int(now_ms),
        int(fresh_window_ms), float(fresh_window_days), int(fresh_want), *map(int, want), int(total), *flt,
        out_rows, out_sources, out_scores)


# --------------------------------------------------------------------------
# Preparation. Each helper returns an array already in the kernel's dtype and
# C order as it is (checked without copying); anything else goes the slow way.


def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` (sorted, each value once, same dtype) by a sort: numpy 2.4's unique goes through a
    hash table that costs ~0.6 µs a value (57 µs for a 1000-row list, 0.66 s for a million rows, against 7 µs
    and 4 ms here), and even a few values pay its fixed overhead. Used for the filters' ``exclude`` rows and
    the state's top-popular list."""
    out = np.sort(values)
    if out.size > 1:
        keep = np.empty(out.size, bool)
        keep[0] = True
        np.not_equal(out[1:], out[:-1], out=keep[1:])
        out = out[keep]
    return out


def _filter(
    alive: Any,
    maturity: Any,
    categories: Any,
    max_maturity: Any,
    allowed: Any,
    has_allowed: Any,
    blocked: Any,
    exclude: Any,
) -> tuple:
    """The filter arguments as the compiled kernels take them."""
    alive = _mask(alive, "alive")
    maturity = _int32(maturity, "maturity")
    categories = _int32(categories, "categories")
    n_rows = alive.shape[0]
    if maturity.shape[0] < n_rows or categories.shape[0] < n_rows:
        raise ValueError(
            f"maturity and categories must cover every row of alive: alive has {n_rows} rows, "
            f"maturity {maturity.shape[0]} and categories {categories.shape[0]} "
            "(read alive first: a growing catalog replaces it last)"
        )
    try:
        max_maturity = operator.index(max_maturity)
    except TypeError:
        raise ValueError(f"max_maturity must be an integer, got {max_maturity!r}") from None
    # Maturities are int32: clamping the threshold changes no comparison.
    if max_maturity > _INT32_MAX:
        max_maturity = _INT32_MAX
    elif max_maturity < _INT32_MIN:
        max_maturity = _INT32_MIN
    # ``exclude`` must also be sorted: the kernel checks that (one pass in C).
    return (
        alive, maturity, categories, max_maturity,
        _mask(allowed, "allowed"), bool(has_allowed), _mask(blocked, "blocked"), _int32(exclude, "exclude"),
    )  # fmt: skip


def _int32(x: Any, name: str) -> np.ndarray:
    """A C-contiguous int32 vector; other integer dtypes are converted if every value fits."""
    if type(x) is _ndarray and x.dtype is _I32 and x.ndim == 1:
        return _asc(x)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype != _I32:
        if a.size == 0:
            return np.empty(0, _I32)
        if a.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
        if lo < _INT32_MIN or hi > _INT32_MAX:
            raise ValueError(f"{name} must fit int32, got values in [{lo}, {hi}]")
    return np.ascontiguousarray(a, dtype=_I32)


def _uint64(x: Any, name: str) -> np.ndarray:
    """A C-contiguous uint64 vector (hnswlib's labels); other non-negative integers are converted."""
    return _integers(x, _U64, name)


def _int64(x: Any, name: str) -> np.ndarray:
    return _integers(x, _I64, name)


def _integers(x: Any, dtype: np.dtype, name: str) -> np.ndarray:
    """A C-contiguous 1-D vector of ``dtype`` (int64 or uint64) from any integers (>= 0 for uint64)."""
    if type(x) is _ndarray and x.dtype is dtype and x.ndim == 1:
        return _asc(x)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype != dtype:
        if a.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        if dtype.kind == "u" and int(a.min()) < 0:
            raise ValueError(f"{name} must be catalog rows (>= 0), got {int(a.min())}")
    return np.ascontiguousarray(a, dtype=dtype)


def _float64(x: Any, name: str) -> np.ndarray:
    if type(x) is _ndarray and x.dtype is _F64 and x.ndim == 1:
        return _asc(x)
    return _real(x, _F64, name)


def _float32(x: Any, name: str) -> np.ndarray:
    if type(x) is _ndarray and x.dtype is _F32 and x.ndim == 1:
        return _asc(x)
    return _real(x, _F32, name)


def _real(x: Any, dtype: np.dtype, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _mask(x: Any, name: str) -> np.ndarray:
    """A C-contiguous uint8 vector, nonzero = set: bool and uint8 as they are, other integers as ``!= 0``."""
    if type(x) is _ndarray and x.dtype is _U8 and x.ndim == 1:
        return _asc(x)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype == _U8:
        return np.ascontiguousarray(a)
    if a.dtype == _BOOL:
        return np.ascontiguousarray(a).view(_U8)
    if a.size == 0:
        return np.empty(0, _U8)
    if a.dtype.kind in "iu":
        return (a != 0).view(_U8)
    raise ValueError(f"{name} must be a boolean mask (bool or uint8), got dtype {a.dtype}")


def _sources(x: Any, n_src: int) -> np.ndarray:
    """``src`` as C-contiguous int8. The kernel checks int8 values against ``n_src``
    in its first pass (a numpy reduction here would cost more than the merge)."""
    if type(x) is _ndarray and x.dtype is _I8 and x.ndim == 1:
        return _asc(x)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"src must be 1-D, got shape {a.shape}")
    if a.dtype != _I8:
        if a.size == 0:
            return np.empty(0, _I8)
        if a.dtype.kind not in "iu":
            raise ValueError(f"src must hold source indices (integers), got dtype {a.dtype}")
        if int(a.min()) < 0 or int(a.max()) >= n_src:  # before the cast, which could wrap
            bad = a[(a < 0) | (a >= n_src)]
            raise ValueError(
                f"src must be in [0, {n_src}) (out_scores has one column per source), got {bad[:5].tolist()}"
            )
    return np.ascontiguousarray(a, dtype=_I8)


def _output(x: Any, dtype: np.dtype, name: str, need: int) -> np.ndarray:
    """A caller's output vector, checked, never copied: the kernel writes into it."""
    if type(x) is _ndarray and x.ndim == 1 and x.flags.carray:  # carray: C-contiguous, aligned, writable
        if x.dtype is not dtype:
            if dtype is _U8 and x.dtype == _BOOL:
                x = x.view(_U8)  # a boolean mask: the kernel writes 0 and 1
            elif x.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")
        if x.shape[0] < need:
            raise ValueError(f"{name} has room for {x.shape[0]} rows; it needs room for {need}")
        return x
    raise ValueError(f"{name} must be a writable, C-contiguous, 1-D {dtype} numpy array (the kernel writes into it)")
