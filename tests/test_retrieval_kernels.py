"""Candidate-generation kernels (_retrieval.pyx): known values and parity with the numpy twins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc._fastpath import _retrieval
from recsvc._fastpath.twins import retrieval as twin

N_ROWS = 60


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


rows_strategy = st.lists(st.integers(0, N_ROWS + 9), max_size=80).map(lambda r: np.array(r, np.int32))


@settings(max_examples=150, deadline=None)
@given(flt=filters(), rows=rows_strategy)
def test_eligible_mask_parity(flt, rows) -> None:
    got, want = np.empty(rows.size, np.uint8), np.empty(rows.size, np.uint8)
    n = _retrieval.eligible_mask(rows, *flt, got)
    assert n == twin.eligible_mask(rows, *flt, want)
    np.testing.assert_array_equal(got, want)


def test_eligible_mask_known_values() -> None:
    alive = np.array([1, 1, 1, 0, 1, 1], np.uint8)
    maturity = np.array([0, 18, 0, 0, 0, 0], np.int32)
    categories = np.array([0, 0, 1, 0, 2, 5], np.int32)  # 5: created after the request's masks
    allowed = np.array([1, 1, 1], np.uint8)
    blocked = np.array([0, 1], np.uint8)
    exclude = np.array([4], np.int32)
    rows = np.arange(8, dtype=np.int32)  # 6 and 7: beyond the catalog
    out = np.empty(8, np.uint8)
    n = _retrieval.eligible_mask(rows, alive, maturity, categories, 13, allowed, True, blocked, exclude, out)
    # 0 ok; 1 too mature; 2 blocked category; 3 dead; 4 excluded; 5 not among the allowed; 6, 7 unknown
    assert out.tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and n == 1
    n = _retrieval.eligible_mask(rows, alive, maturity, categories, 13, np.empty(0, np.uint8), False, blocked,
                                 exclude, out)
    assert out.tolist() == [1, 0, 0, 0, 0, 1, 0, 0] and n == 2  # no allow-list: 5 passes, never blocked


neighbour_lists = st.lists(
    st.lists(st.tuples(st.integers(0, N_ROWS - 1), st.floats(0, 5, width=32)), max_size=15, unique_by=lambda t: t[0]),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(flt=filters(), lists=neighbour_lists, data=st.data())
def test_aggregate_neighbours_parity(flt, lists, data) -> None:
    rows = [np.array([r for r, _ in lst], np.int32) for lst in lists]
    scores = [np.array([s for _, s in lst], np.float64) for lst in lists]
    weights = np.array(data.draw(st.lists(st.floats(0.01, 1), min_size=len(lists), max_size=len(lists))), np.float64)
    size = sum(r.size for r in rows)
    got_r, got_s = np.empty(size, np.int32), np.empty(size, np.float32)
    want_r, want_s = np.empty(size, np.int32), np.empty(size, np.float32)
    n = _retrieval.aggregate_neighbours(rows, scores, weights, *flt, got_r, got_s)
    assert n == twin.aggregate_neighbours(rows, scores, weights, *flt, want_r, want_s)
    np.testing.assert_array_equal(got_r[:n], want_r[:n])  # same rows, first-seen order
    np.testing.assert_allclose(got_s[:n], want_s[:n], rtol=1e-5, atol=1e-6)


def test_aggregate_neighbours_sums_weighted_scores_of_eligible_rows() -> None:
    everyone = (np.ones(10, np.uint8), np.zeros(10, np.int32), np.zeros(10, np.int32), 0,
                np.empty(0, np.uint8), False, np.empty(0, np.uint8), np.array([7], np.int32))
    rows = [np.array([3, 7, 5], np.int32), np.array([5, 2], np.int32)]
    scores = [np.array([1.0, 9.0, 2.0]), np.array([4.0, 1.0])]
    out_r, out_s = np.empty(5, np.int32), np.empty(5, np.float32)
    n = _retrieval.aggregate_neighbours(rows, scores, np.array([1.0, 0.5]), *everyone, out_r, out_s)
    assert out_r[:n].tolist() == [3, 5, 2]  # 7 excluded
    assert out_s[:n].tolist() == pytest.approx([1.0, 2.0 + 0.5 * 4.0, 0.5])


def test_aggregate_neighbours_checks_its_buffers() -> None:
    everyone = (np.ones(10, np.uint8), np.zeros(10, np.int32), np.zeros(10, np.int32), 0,
                np.empty(0, np.uint8), False, np.empty(0, np.uint8), np.empty(0, np.int32))
    rows, scores = [np.array([1, 2], np.int32)], [np.array([1.0, 1.0])]
    with pytest.raises(ValueError, match="room for 2"):
        _retrieval.aggregate_neighbours(rows, scores, np.ones(1), *everyone, np.empty(1, np.int32),
                                        np.empty(1, np.float32))
    with pytest.raises(ValueError, match="one weight"):
        _retrieval.aggregate_neighbours(rows, scores, np.ones(0), *everyone, np.empty(2, np.int32),
                                        np.empty(2, np.float32))


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.floats(-1, 1, width=32)), max_size=120))
def test_merge_sources_parity(entries) -> None:
    rows = np.array([r for r, _, _ in entries], np.int32)
    src = np.array([s for _, s, _ in entries], np.int8)
    scores = np.array([v for _, _, v in entries], np.float32)
    outs = [(np.empty(rows.size, np.int32), np.empty(rows.size, np.uint8), np.zeros((rows.size, 4), np.float32))
            for _ in range(2)]
    n = _retrieval.merge_sources(rows, src, scores, *outs[0])
    assert n == twin.merge_sources(rows, src, scores, *outs[1]) == np.unique(rows).size
    for got, want in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(got[:n], want[:n])


def test_merge_sources_known_values() -> None:
    rows = np.array([9, 4, 4, 9, 2, 4], np.int32)
    src = np.array([0, 0, 1, 2, 3, 1], np.int8)
    scores = np.array([-0.2, 0.9, 0.1, 0.5, 0.7, 0.3], np.float32)
    out_r, out_src, out_s = np.empty(6, np.int32), np.empty(6, np.uint8), np.zeros((6, 4), np.float32)
    n = _retrieval.merge_sources(rows, src, scores, out_r, out_src, out_s)
    assert out_r[:n].tolist() == [9, 4, 2]  # first seen first
    assert out_src[:n].tolist() == [0b0101, 0b0011, 0b1000]
    # a negative score is kept as it is; a source proposing a row twice keeps its best
    np.testing.assert_allclose(out_s[:n], [[-0.2, 0, 0.5, 0], [0.9, 0.3, 0, 0], [0, 0, 0, 0.7]])


def test_strided_rows_that_share_their_low_bits_are_kept_apart() -> None:
    # multiples of a power of two: a hash of the low bits would put them all in one slot
    rows = (np.arange(3000, dtype=np.int32) * 4096) % (2 ** 31 - 1)
    src = (np.arange(3000) % 4).astype(np.int8)
    both = np.concatenate([rows, rows[::-1]])
    out_r, out_src, out_s = np.empty(6000, np.int32), np.empty(6000, np.uint8), np.zeros((6000, 4), np.float32)
    n = _retrieval.merge_sources(both, np.concatenate([src, src[::-1]]), np.ones(6000, np.float32),
                                 out_r, out_src, out_s)
    assert n == 3000 and out_r[:n].tolist() == rows.tolist()


def test_eligible_mask_checks_its_buffer() -> None:
    everyone = (np.ones(10, np.uint8), np.zeros(10, np.int32), np.zeros(10, np.int32), 0,
                np.empty(0, np.uint8), False, np.empty(0, np.uint8), np.empty(0, np.int32))
    with pytest.raises(ValueError, match="room for 3"):
        _retrieval.eligible_mask(np.arange(3, dtype=np.int32), *everyone, np.empty(2, np.uint8))
    with pytest.raises(ValueError, match="cover every row"):
        _retrieval.eligible_mask(np.arange(3, dtype=np.int32), np.ones(10, np.uint8), np.zeros(5, np.int32),
                                 *everyone[2:], np.empty(3, np.uint8))


def test_merge_sources_checks_its_buffers() -> None:
    rows, src, scores = np.arange(3, dtype=np.int32), np.zeros(3, np.int8), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="room for 3"):
        _retrieval.merge_sources(rows, src, scores, np.empty(2, np.int32), np.empty(3, np.uint8),
                                 np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="differ in length"):
        _retrieval.merge_sources(rows, src[:2], scores, np.empty(3, np.int32), np.empty(3, np.uint8),
                                 np.zeros((3, 4), np.float32))
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"src must be in \[0, 4\)"):
            _retrieval.merge_sources(rows, np.array([0, bad, 1], np.int8), scores, np.empty(3, np.int32),
                                     np.empty(3, np.uint8), np.zeros((3, 4), np.float32))
