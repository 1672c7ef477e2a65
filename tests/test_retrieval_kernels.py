"""Candidate-generation kernels: ``recsvc.retrieval.kernels`` (validated) over ``_retrieval.pyx`` (compiled).

Known values, parity with the numpy twins, the validation errors, and the
compiled wrappers against the behaviour they had before the status-returning
rewrite (a plain-Python model of it, and outputs recorded from that build).
"""

from __future__ import annotations

import hashlib
import platform

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc._fastpath import _retrieval as compiled
from recsvc._fastpath.twins import retrieval as twin
from recsvc.retrieval import kernels

N_ROWS = 60

# Where the compiler cannot fuse ``acc + w * s`` into one FMA (x86-64's baseline
# has none), aggregated scores are reproducible bit for bit; elsewhere to rounding.
EXACT_FLOATS = platform.machine().lower() in ("x86_64", "amd64")


@st.composite
def filters(draw):
    """A catalog of N_ROWS rows and a request filter over it, as the kernels take them."""
    alive = np.array(draw(st.lists(st.booleans(), min_size=N_ROWS, max_size=N_ROWS)), np.uint8)
    maturity = np.array(draw(st.lists(st.sampled_from([0, 13, 18]), min_size=N_ROWS, max_size=N_ROWS)), np.int32)
    # codes up to 7 while the masks may be shorter: a category the request never saw
    categories = np.array(draw(st.lists(st.integers(0, 7), min_size=N_ROWS, max_size=N_ROWS)), np.int32)
    has_allowed = draw(st.booleans())
    allowed = np.array(draw(st.lists(st.booleans(), max_size=6)), np.uint8) if has_allowed else np.empty(0, np.uint8)
    blocked = np.array(draw(st.lists(st.booleans(), max_size=6)), np.uint8)
    exclude = np.unique(np.array(draw(st.lists(st.integers(0, N_ROWS + 5), max_size=12)), np.int32))
    max_maturity = draw(st.sampled_from([0, 13, 18]))
    return (alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude)


def everyone(n: int = 10) -> tuple:
    """A filter that lets every row of an n-row catalog through."""
    return (np.ones(n, np.uint8), np.zeros(n, np.int32), np.zeros(n, np.int32), 0,
            np.empty(0, np.uint8), False, np.empty(0, np.uint8), np.empty(0, np.int32))


rows_strategy = st.lists(st.integers(0, N_ROWS + 9), max_size=80).map(lambda r: np.array(r, np.int32))

neighbour_lists = st.lists(
    st.lists(st.tuples(st.integers(0, N_ROWS - 1), st.floats(0, 5, width=32)), max_size=15, unique_by=lambda t: t[0]),
    max_size=8,
)

merge_entries = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.floats(-1, 1, width=32)), max_size=120)


def _neighbour_arrays(lists, data):
    rows = [np.array([r for r, _ in lst], np.int32) for lst in lists]
    scores = [np.array([s for _, s in lst], np.float64) for lst in lists]
    weights = np.array(data.draw(st.lists(st.floats(0.01, 1), min_size=len(lists), max_size=len(lists))), np.float64)
    return rows, scores, weights


def _merge_arrays(entries):
    rows = np.array([r for r, _, _ in entries], np.int32)
    src = np.array([s for _, s, _ in entries], np.int8)
    scores = np.array([v for _, _, v in entries], np.float32)
    return rows, src, scores


def _merge_outputs(n: int, n_src: int = 4) -> tuple:
    return np.empty(n, np.int32), np.empty(n, np.uint8), np.zeros((n, n_src), np.float32)


# --------------------------------------------------------------------------
# Parity with the numpy twins, through the validated entry points


@settings(max_examples=150, deadline=None)
@given(flt=filters(), rows=rows_strategy)
def test_eligible_mask_parity(flt, rows) -> None:
    got, want = np.empty(rows.size, np.uint8), np.empty(rows.size, np.uint8)
    n = kernels.eligible_mask(rows, *flt, got)
    assert n == twin.eligible_mask(rows, *flt, want)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=150, deadline=None)
@given(flt=filters(), lists=neighbour_lists, data=st.data())
def test_aggregate_neighbours_parity(flt, lists, data) -> None:
    rows, scores, weights = _neighbour_arrays(lists, data)
    size = sum(r.size for r in rows)
    got_r, got_s = np.empty(size, np.int32), np.empty(size, np.float32)
    want_r, want_s = np.empty(size, np.int32), np.empty(size, np.float32)
    n = kernels.aggregate_neighbours(rows, scores, weights, *flt, got_r, got_s)
    assert n == twin.aggregate_neighbours(rows, scores, weights, *flt, want_r, want_s)
    np.testing.assert_array_equal(got_r[:n], want_r[:n])  # same rows, first-seen order
    np.testing.assert_allclose(got_s[:n], want_s[:n], rtol=1e-5, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(entries=merge_entries)
def test_merge_sources_parity(entries) -> None:
    rows, src, scores = _merge_arrays(entries)
    outs = [_merge_outputs(rows.size) for _ in range(2)]
    n = kernels.merge_sources(rows, src, scores, *outs[0])
    assert n == twin.merge_sources(rows, src, scores, *outs[1]) == np.unique(rows).size
    for got, want in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(got[:n], want[:n])


# --------------------------------------------------------------------------
# Known values


def test_eligible_mask_known_values() -> None:
    alive = np.array([1, 1, 1, 0, 1, 1], np.uint8)
    maturity = np.array([0, 18, 0, 0, 0, 0], np.int32)
    categories = np.array([0, 0, 1, 0, 2, 5], np.int32)  # 5: created after the request's masks
    allowed = np.array([1, 1, 1], np.uint8)
    blocked = np.array([0, 1], np.uint8)
    exclude = np.array([4], np.int32)
    rows = np.arange(8, dtype=np.int32)  # 6 and 7: beyond the catalog
    out = np.empty(8, np.uint8)
    n = kernels.eligible_mask(rows, alive, maturity, categories, 13, allowed, True, blocked, exclude, out)
    # 0 ok; 1 too mature; 2 blocked category; 3 dead; 4 excluded; 5 not among the allowed; 6, 7 unknown
    assert out.tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and n == 1
    n = kernels.eligible_mask(rows, alive, maturity, categories, 13, np.empty(0, np.uint8), False, blocked,
                              exclude, out)
    assert out.tolist() == [1, 0, 0, 0, 0, 1, 0, 0] and n == 2  # no allow-list: 5 passes, never blocked


def test_aggregate_neighbours_sums_weighted_scores_of_eligible_rows() -> None:
    flt = (*everyone()[:7], np.array([7], np.int32))
    rows = [np.array([3, 7, 5], np.int32), np.array([5, 2], np.int32)]
    scores = [np.array([1.0, 9.0, 2.0]), np.array([4.0, 1.0])]
    out_r, out_s = np.empty(5, np.int32), np.empty(5, np.float32)
    n = kernels.aggregate_neighbours(rows, scores, np.array([1.0, 0.5]), *flt, out_r, out_s)
    assert out_r[:n].tolist() == [3, 5, 2]  # 7 excluded
    assert out_s[:n].tolist() == pytest.approx([1.0, 2.0 + 0.5 * 4.0, 0.5])


def test_merge_sources_known_values() -> None:
    rows = np.array([9, 4, 4, 9, 2, 4], np.int32)
    src = np.array([0, 0, 1, 2, 3, 1], np.int8)
    scores = np.array([-0.2, 0.9, 0.1, 0.5, 0.7, 0.3], np.float32)
    out_r, out_src, out_s = _merge_outputs(6)
    n = kernels.merge_sources(rows, src, scores, out_r, out_src, out_s)
    assert out_r[:n].tolist() == [9, 4, 2]  # first seen first
    assert out_src[:n].tolist() == [0b0101, 0b0011, 0b1000]
    # a negative score is kept as it is; a source proposing a row twice keeps its best
    np.testing.assert_allclose(out_s[:n], [[-0.2, 0, 0.5, 0], [0.9, 0.3, 0, 0], [0, 0, 0, 0.7]])


def test_strided_rows_that_share_their_low_bits_are_kept_apart() -> None:
    # multiples of a power of two: a hash of the low bits would put them all in one slot
    rows = (np.arange(3000, dtype=np.int32) * 4096) % (2 ** 31 - 1)
    src = (np.arange(3000) % 4).astype(np.int8)
    both = np.concatenate([rows, rows[::-1]])
    out_r, out_src, out_s = _merge_outputs(6000)
    n = kernels.merge_sources(both, np.concatenate([src, src[::-1]]), np.ones(6000, np.float32),
                              out_r, out_src, out_s)
    assert n == 3000 and out_r[:n].tolist() == rows.tolist()


def test_empty_inputs() -> None:
    assert kernels.eligible_mask(np.empty(0, np.int32), *everyone(), np.empty(0, np.uint8)) == 0
    assert kernels.aggregate_neighbours([], [], np.empty(0), *everyone(), np.empty(0, np.int32),
                                        np.empty(0, np.float32)) == 0
    assert kernels.aggregate_neighbours([np.empty(0, np.int32)], [np.empty(0)], np.ones(1), *everyone(),
                                        np.empty(0, np.int32), np.empty(0, np.float32)) == 0
    assert kernels.merge_sources(np.empty(0, np.int32), np.empty(0, np.int8), np.empty(0, np.float32),
                                 *_merge_outputs(0)) == 0


# --------------------------------------------------------------------------
# Preparation: what the entry points accept besides the kernels' own dtypes


def test_entry_points_coerce_dtypes_and_layouts() -> None:
    alive = np.array([1, 1, 0, 1, 1, 1], np.uint8)
    maturity = np.array([0, 18, 0, 0, 0, 0], np.int32)
    categories = np.array([0, 0, 1, 0, 2, 1], np.int32)
    allowed, blocked, exclude = np.array([1, 1, 1], np.uint8), np.array([0, 1], np.uint8), np.array([4], np.int32)
    rows = np.arange(8, dtype=np.int32)
    want = np.empty(8, np.uint8)
    n = kernels.eligible_mask(rows, alive, maturity, categories, 13, allowed, True, blocked, exclude, want)
    # bool masks, int64 columns, Python lists, a strided view, a bool output, an oversized max_maturity
    got = np.empty(8, bool)
    assert kernels.eligible_mask(
        np.repeat(np.arange(8), 2)[::2], alive.astype(bool), maturity.astype(np.int64), categories.tolist(), 2 ** 40,
        [True, True, True], 1, blocked.astype(bool), [4], got,
    ) == n + 1  # row 1 is now mature enough
    assert want.tolist() == [1, 0, 0, 1, 0, 0, 0, 0] and got.view(np.uint8).tolist() == [1, 1, 0, 1, 0, 0, 0, 0]

    lists, scores = [np.array([3, 5, 5, 1], np.int32)], [np.array([1.0, 2.0, 3.0, 4.0])]
    out_r, out_s = np.empty(4, np.int32), np.empty(4, np.float32)
    k = kernels.aggregate_neighbours(lists, scores, np.ones(1), *everyone(), out_r, out_s)
    got_r, got_s = np.empty(4, np.int32), np.empty(4, np.float32)
    assert kernels.aggregate_neighbours(
        [np.array([3, 9, 5, 9, 5, 9, 1, 9], np.int64)[::2]], [[1, 2, 3, 4]], [1], *everyone(), got_r, got_s
    ) == k == 3
    assert got_r[:k].tolist() == out_r[:k].tolist() and got_s[:k].tolist() == out_s[:k].tolist()

    rows, src, sc = np.array([4, 2, 4], np.int32), np.array([0, 1, 1], np.int8), np.array([.5, .25, .75], np.float32)
    want_m = _merge_outputs(3, 2)
    k = kernels.merge_sources(rows, src, sc, *want_m)
    got_m = _merge_outputs(3, 2)
    assert kernels.merge_sources(rows.tolist(), src.astype(np.int64), sc.astype(np.float64), *got_m) == k == 2
    for a, b in zip(got_m, want_m):
        np.testing.assert_array_equal(a[:k], b[:k])


# --------------------------------------------------------------------------
# Validation errors, through the entry points


def test_eligible_mask_rejects_bad_arguments() -> None:
    rows, out = np.arange(3, dtype=np.int32), np.empty(3, np.uint8)
    with pytest.raises(ValueError, match=r"^out has room for 2 rows; it needs room for 3$"):
        kernels.eligible_mask(rows, *everyone(), np.empty(2, np.uint8))
    with pytest.raises(ValueError, match=r"maturity and categories must cover every row of alive: "
                                         r"alive has 10 rows, maturity 5 and categories 10"):
        kernels.eligible_mask(rows, np.ones(10, np.uint8), np.zeros(5, np.int32), *everyone()[2:], out)
    with pytest.raises(ValueError, match=r"^rows must hold integers, got dtype float64$"):
        kernels.eligible_mask(rows.astype(np.float64), *everyone(), out)
    with pytest.raises(ValueError, match=r"^rows must be 1-D, got shape \(1, 3\)$"):
        kernels.eligible_mask(rows[None, :], *everyone(), out)
    with pytest.raises(ValueError, match=r"^rows must fit int32, got values in \[0, 4294967296\]$"):
        kernels.eligible_mask(np.array([0, 1, 2 ** 32]), *everyone(), out)
    with pytest.raises(ValueError, match=r"^max_maturity must be an integer, got 13.5$"):
        kernels.eligible_mask(rows, *everyone()[:3], 13.5, *everyone()[4:], out)
    with pytest.raises(ValueError, match=r"^blocked must be a boolean mask \(bool or uint8\), got dtype float64$"):
        kernels.eligible_mask(rows, *everyone()[:6], np.array([0.0, 1.0]), everyone()[7], out)
    with pytest.raises(ValueError, match=r"^out must have dtype uint8, got int32$"):
        kernels.eligible_mask(rows, *everyone(), np.empty(3, np.int32))
    read_only = np.empty(3, np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out must be a writable, C-contiguous, 1-D uint8 numpy array"):
        kernels.eligible_mask(rows, *everyone(), read_only)
    with pytest.raises(ValueError, match=r"^out must be a writable, C-contiguous, 1-D uint8 numpy array"):
        kernels.eligible_mask(rows, *everyone(), np.empty(6, np.uint8)[::2])
    # the kernel's own check, raised once it holds the GIL again
    with pytest.raises(ValueError, match=r"exclude must be sorted ascending"):
        kernels.eligible_mask(rows, *everyone()[:7], np.array([5, 2], np.int32), out)


def test_aggregate_neighbours_rejects_bad_arguments() -> None:
    rows, scores = [np.array([1, 2], np.int32)], [np.array([1.0, 1.0])]
    out_r, out_s = np.empty(2, np.int32), np.empty(2, np.float32)
    with pytest.raises(ValueError, match=r"^out_rows has room for 1 rows; it needs room for 2$"):
        kernels.aggregate_neighbours(rows, scores, np.ones(1), *everyone(), np.empty(1, np.int32), out_s)
    with pytest.raises(ValueError, match=r"^out_scores has room for 1 rows; it needs room for 2$"):
        kernels.aggregate_neighbours(rows, scores, np.ones(1), *everyone(), out_r, np.empty(1, np.float32))
    with pytest.raises(ValueError, match=r"^one weight per neighbour array: got 1 neighbour arrays and 0 weights$"):
        kernels.aggregate_neighbours(rows, scores, np.ones(0), *everyone(), out_r, out_s)
    with pytest.raises(ValueError, match=r"^one score array per neighbour array: got 1 neighbour arrays and 2 "):
        kernels.aggregate_neighbours(rows, scores * 2, np.ones(2), *everyone(), out_r, out_s)
    with pytest.raises(ValueError, match=r"^neighbour_rows\[1\] has 2 entries but neighbour_scores\[1\] has 1$"):
        kernels.aggregate_neighbours(rows * 2, [scores[0], np.ones(1)], np.ones(2), *everyone(),
                                     np.empty(4, np.int32), np.empty(4, np.float32))
    with pytest.raises(ValueError, match=r"^neighbour_rows\[0\] must hold integers, got dtype float64$"):
        kernels.aggregate_neighbours([np.array([1.0, 2.0])], scores, np.ones(1), *everyone(), out_r, out_s)
    with pytest.raises(ValueError, match=r"^neighbour_scores\[0\] must hold real numbers, got dtype <U1$"):
        kernels.aggregate_neighbours(rows, [np.array(["a", "b"])], np.ones(1), *everyone(), out_r, out_s)
    with pytest.raises(ValueError, match=r"^out_scores must have dtype float32, got float64$"):
        kernels.aggregate_neighbours(rows, scores, np.ones(1), *everyone(), out_r, np.empty(2))


def test_merge_sources_rejects_bad_arguments() -> None:
    rows, src, scores = np.arange(3, dtype=np.int32), np.zeros(3, np.int8), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"^out_rows has room for 2 rows; it needs room for 3$"):
        kernels.merge_sources(rows, src, scores, np.empty(2, np.int32), *_merge_outputs(3)[1:])
    with pytest.raises(ValueError, match=r"^out_scores has room for 2 rows; it needs room for 3$"):
        kernels.merge_sources(rows, src, scores, *_merge_outputs(3)[:2], np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^rows, src and scores differ in length: 3, 2 and 3$"):
        kernels.merge_sources(rows, src[:2], scores, *_merge_outputs(3))
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=rf"^src must be in \[0, 4\) \(out_scores has one column per source\), "
                                             rf"got \[{bad}\]$"):
            kernels.merge_sources(rows, np.array([0, bad, 1], np.int8), scores, *_merge_outputs(3))
    with pytest.raises(ValueError, match=r"^src must be in \[0, 4\) .*, got \[300\]$"):
        kernels.merge_sources(rows, np.array([0, 300, 1]), scores, *_merge_outputs(3))
    with pytest.raises(ValueError, match=r"^out_scores has 9 columns \(one per source\); at most 8 sources fit"):
        kernels.merge_sources(rows, src, scores, *_merge_outputs(3, 9))
    with pytest.raises(ValueError, match=r"^out_scores must be a writable, C-contiguous float32 numpy array"):
        kernels.merge_sources(rows, src, scores, *_merge_outputs(3)[:2], np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"^src must hold source indices \(integers\), got dtype float64$"):
        kernels.merge_sources(rows, src.astype(np.float64), scores, *_merge_outputs(3))
    # the kernel's own check (-1 marks an empty slot of its hash table)
    with pytest.raises(ValueError, match=r"rows must be catalog rows \(>= 0\)"):
        kernels.merge_sources(np.array([0, -1, -1], np.int32), src, scores, *_merge_outputs(3))


# --------------------------------------------------------------------------
# The compiled wrappers: the old behaviour on consistent inputs, a status otherwise


def _model_eligible(flt, row: int) -> bool:
    alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude = flt
    if not 0 <= row < alive.size or not alive[row] or maturity[row] > max_maturity:
        return False
    c = int(categories[row])
    if has_allowed and not (0 <= c < allowed.size and allowed[c]):
        return False
    if 0 <= c < blocked.size and blocked[c]:
        return False
    return row not in exclude.tolist()


def _model_aggregate(lists, scores, weights, flt):
    """The kernel one row at a time: float32 sums updated in double, first seen first."""
    where: dict[int, int | None] = {}
    out_rows: list[int] = []
    out_scores: list[np.float32] = []
    for rows, vals, w in zip(lists, scores, weights.tolist()):
        for row, s in zip(rows.tolist(), vals.tolist()):
            if row not in where:
                where[row] = len(out_rows) if _model_eligible(flt, row) else None
                if where[row] is not None:
                    out_rows.append(row)
                    out_scores.append(np.float32(w * s))
            elif where[row] is not None:
                at = where[row]
                out_scores[at] = np.float32(float(out_scores[at]) + w * s)
    return out_rows, np.array(out_scores, np.float32)


def _model_merge(rows, src, scores, n_src: int):
    """The kernel one entry at a time: a source's first score stays unless a later one is larger."""
    where: dict[int, int] = {}
    out_rows: list[int] = []
    out_sources: list[int] = []
    out_scores: list[list[float]] = []
    for row, s, v in zip(rows.tolist(), src.tolist(), scores.tolist()):
        if row not in where:
            where[row] = len(out_rows)
            out_rows.append(row)
            out_sources.append(1 << s)
            out_scores.append([0.0] * n_src)
            out_scores[-1][s] = v
        else:
            at = where[row]
            if out_sources[at] >> s & 1:
                if v > out_scores[at][s]:
                    out_scores[at][s] = v
            else:
                out_sources[at] |= 1 << s
                out_scores[at][s] = v
    return out_rows, out_sources, np.array(out_scores, np.float32).reshape(-1, n_src)


# rows may repeat within a list (a row's later scores add to its sum), and fall outside the catalog
repeating_lists = st.lists(
    st.lists(st.tuples(st.integers(-2, N_ROWS + 3), st.floats(0, 5, width=32)), max_size=15), max_size=8
)


@settings(max_examples=100, deadline=None)
@given(flt=filters(), rows=rows_strategy)
def test_compiled_eligible_mask_behaves_as_before(flt, rows) -> None:
    out = np.full(rows.size + 2, 9, np.uint8)
    n = compiled.eligible_mask(rows, *flt, out)
    want = [int(_model_eligible(flt, r)) for r in rows.tolist()]
    assert n == sum(want) and out.tolist() == want + [9, 9]  # nothing written beyond n


@settings(max_examples=100, deadline=None)
@given(flt=filters(), lists=repeating_lists, data=st.data())
def test_compiled_aggregate_neighbours_behaves_as_before(flt, lists, data) -> None:
    rows, scores, weights = _neighbour_arrays(lists, data)
    size = sum(r.size for r in rows)
    out_r, out_s = np.full(size + 1, -7, np.int32), np.full(size + 1, -7, np.float32)
    n = compiled.aggregate_neighbours(rows, scores, weights, *flt, out_r, out_s)
    want_r, want_s = _model_aggregate(rows, scores, weights, flt)
    assert out_r[:n].tolist() == want_r
    assert (out_r[n:] == -7).all() and (out_s[n:] == -7).all()
    if EXACT_FLOATS:
        assert out_s[:n].tobytes() == want_s.tobytes()
    else:  # pragma: no cover
        np.testing.assert_allclose(out_s[:n], want_s, rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(entries=merge_entries)
def test_compiled_merge_sources_behaves_as_before(entries) -> None:
    rows, src, scores = _merge_arrays(entries)
    out_r, out_src, out_s = _merge_outputs(rows.size)
    n = compiled.merge_sources(rows, src, scores, out_r, out_src, out_s)
    want_r, want_src, want_s = _model_merge(rows, src, scores, 4)
    assert out_r[:n].tolist() == want_r and out_src[:n].tolist() == want_src
    assert out_s[:n].tobytes() == want_s.tobytes() and not out_s[n:].any()


def _hash(n: int, salt: int, modulus: int) -> np.ndarray:
    """Deterministic pseudo-random integers in [0, modulus) without a random generator (splitmix64)."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    return ((x ^ (x >> np.uint64(32))) % np.uint64(modulus)).astype(np.int64)


def _recorded_inputs(N: int = 50_000, C: int = 40):
    alive = (_hash(N, 1, 10) < 8).astype(np.uint8)
    maturity = np.array([0, 13, 18], np.int32)[_hash(N, 2, 3)]
    categories = (_hash(N, 3, C + 4) - 1).astype(np.int32)  # -1 .. C+2: some beyond the masks
    allowed = (_hash(C - 5, 4, 4) != 0).astype(np.uint8)
    blocked = (_hash(C - 10, 5, 8) == 0).astype(np.uint8)
    exclude = np.unique(_hash(300, 6, N + 50)).astype(np.int32)
    flt = (alive, maturity, categories, 13, allowed, True, blocked, exclude)
    rows = (_hash(4000, 7, N + 100) - 20).astype(np.int32)
    lists = [(_hash(40 + 10 * j, 100 + j, N // 20) * (1 + j % 3)).astype(np.int32) for j in range(20)]
    scores = [_hash(a.size, 200 + j, 10_007).astype(np.float64) / 997.0 for j, a in enumerate(lists)]
    weights = 1.0 / (1.0 + np.arange(20, dtype=np.float64)) ** 0.7
    m_rows = np.concatenate([_hash(3000, 8, 2500) * 4096 % (2 ** 31 - 1), _hash(1000, 9, 500)]).astype(np.int32)
    m_src = _hash(m_rows.size, 10, 5).astype(np.int8)
    m_scores = ((_hash(m_rows.size, 11, 20_001).astype(np.float64) - 10_000) / 3_333.0).astype(np.float32)
    return flt, rows, lists, scores, weights, m_rows, m_src, m_scores


def _digest(n: int, *arrays: np.ndarray) -> str:
    return hashlib.sha256(np.int64(n).tobytes() + b"".join(a.tobytes() for a in arrays)).hexdigest()[:16]


@pytest.mark.skipif(not EXACT_FLOATS, reason="recorded on x86-64, where no FMA is fused")
@pytest.mark.parametrize("impl", [compiled, kernels], ids=["compiled", "kernels"])
def test_outputs_recorded_before_the_status_rewrite(impl) -> None:
    # Digests of the outputs of the kernels as they were when their wrappers
    # still raised (commit 000b3ae), on 4000 rows, 20 lists of neighbours
    # (2700 entries) and 4000 merged entries with strided rows.
    flt, rows, lists, scores, weights, m_rows, m_src, m_scores = _recorded_inputs()
    out = np.zeros(rows.size, np.uint8)
    assert _digest(impl.eligible_mask(rows, *flt, out), out) == "1b01b738c76ba911"
    size = sum(a.size for a in lists)
    out_r, out_s = np.zeros(size, np.int32), np.zeros(size, np.float32)
    n = impl.aggregate_neighbours(lists, scores, weights, *flt, out_r, out_s)
    assert _digest(n, out_r, out_s) == "ed19bc4069ea3dff"
    outs = (np.zeros(m_rows.size, np.int32), np.zeros(m_rows.size, np.uint8), np.zeros((m_rows.size, 5), np.float32))
    assert _digest(impl.merge_sources(m_rows, m_src, m_scores, *outs), *outs) == "1bd0f3d71b8ee81c"


def test_compiled_wrappers_report_inconsistent_inputs_as_errors() -> None:
    rows, out = np.arange(3, dtype=np.int32), np.empty(3, np.uint8)
    shape = r"retrieval kernel: array lengths disagree.*\(call it through recsvc.retrieval.kernels\)"
    with pytest.raises(ValueError, match=shape):
        compiled.eligible_mask(rows, *everyone(), np.empty(2, np.uint8))
    with pytest.raises(ValueError, match=shape):
        compiled.eligible_mask(rows, np.ones(10, np.uint8), np.zeros(5, np.int32), *everyone()[2:], out)
    with pytest.raises(ValueError, match=r"retrieval kernel: exclude must be sorted ascending"):
        compiled.eligible_mask(rows, *everyone()[:7], np.array([5, 2], np.int32), out)

    lists, scores = [np.array([1, 2], np.int32)], [np.array([1.0, 1.0])]
    out_r, out_s = np.empty(2, np.int32), np.empty(2, np.float32)
    for bad in (
        (lists, scores, np.ones(1), *everyone(), np.empty(1, np.int32), out_s),  # no room
        (lists, scores, np.ones(0), *everyone(), out_r, out_s),  # no weight
        (lists, scores * 2, np.ones(2), *everyone(), out_r, out_s),  # two score arrays
        (lists, [np.ones(1)], np.ones(1), *everyone(), out_r, out_s),  # lengths differ
    ):
        with pytest.raises(ValueError, match=shape):
            compiled.aggregate_neighbours(*bad)

    src, m_scores = np.zeros(3, np.int8), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=shape):
        compiled.merge_sources(rows, src, m_scores, np.empty(2, np.int32), *_merge_outputs(3)[1:])
    with pytest.raises(ValueError, match=shape):
        compiled.merge_sources(rows, src, m_scores, *_merge_outputs(3, 9))
    outs = _merge_outputs(3)
    outs[1][:] = 0
    with pytest.raises(IndexError, match=r"retrieval kernel: a source index is outside \[0, n_sources\)"):
        compiled.merge_sources(rows, np.array([0, 4, 1], np.int8), m_scores, *outs)
    assert outs[1].tolist() == [0, 0, 0] and not outs[2].any()  # refused before writing anything
    with pytest.raises(ValueError, match=r"retrieval kernel: merge_sources rows must be catalog rows \(>= 0\)"):
        compiled.merge_sources(np.array([3, -1, -1], np.int32), src, m_scores, *_merge_outputs(3))


def test_aggregate_neighbours_reads_any_buffer_as_it_reads_plain_arrays() -> None:
    """The kernel reads an int32 / float64 C-contiguous ndarray's data pointer directly; other buffers (an
    array.array, a strided view) are read through a contiguous copy and give the same sums; a list of another
    dtype or byte order is refused, not misread."""
    import array

    rs = np.random.default_rng(3)
    rows = [rs.integers(0, 50, 12).astype(np.int32) for _ in range(4)]
    scores = [rs.random(12) for _ in range(4)]
    weights = np.array([1.0, 0.5, 0.25, 0.125])
    alive, mat, cats = np.ones(50, np.uint8), np.zeros(50, np.int32), np.zeros(50, np.int32)
    flt = (alive, mat, cats, 10, np.empty(0, np.uint8), False, np.empty(0, np.uint8), np.empty(0, np.int32))

    def run(r, s):
        out_r, out_s = np.empty(48, np.int32), np.empty(48, np.float32)
        n = compiled.aggregate_neighbours(r, s, weights, *flt, out_r, out_s)
        return out_r[:n].tolist(), out_s[:n].tolist()

    want = run(rows, scores)
    assert run([array.array("i", r.tolist()) for r in rows], [array.array("d", s.tolist()) for s in scores]) == want
    mixed_rows = [rows[0], array.array("i", rows[1].tolist()), rows[2], rows[3]]
    strided = np.repeat(scores[2], 2)[::2]
    assert run(mixed_rows, [scores[0], scores[1], strided, scores[3]]) == want
    for bad in (rows[0].astype(">i4"), rows[0].astype(np.int64), rows[0].reshape(3, 4)):
        with pytest.raises(ValueError, match="Buffer dtype mismatch: a neighbour list must be 1-D int32"):
            run([bad] + rows[1:], scores)


@given(st.lists(st.integers(-5, 40), max_size=60), st.sampled_from([np.int32, np.int64]))
def test_sorted_distinct_is_np_unique(values, dtype):
    a = np.asarray(values, dtype)
    out = kernels.sorted_distinct(a)
    np.testing.assert_array_equal(out, np.unique(a))
    assert out.dtype == a.dtype
    np.testing.assert_array_equal(a, np.asarray(values, dtype))  # the input is not sorted in place
