"""Offline metrics: hand-computed values, edge cases, and parity with a per-user loop twin."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc.evaluation.metrics import (
    RelevantSets,
    catalog_coverage,
    gini,
    gini_of_exposure,
    hit_rate_at_k,
    intra_list_diversity,
    item_exposure,
    map_at_k,
    mean_metric,
    mrr,
    ndcg_at_k,
    novelty,
    precision_at_k,
    recall_at_k,
    relevance_matrix,
    serendipity,
    split_by_group,
)

# Three users, K = 4:
#   user 0: list [1, 2, 3, 4], relevant {2, 4, 11}  -> hits [F, T, F, T], n_relevant 3
#   user 1: list [5, 6, -, -], relevant {5}         -> hits [T, F, F, F], n_relevant 1 (padding is a miss)
#   user 2: list [7, 8, 9, 10], relevant {}         -> no hits, n_relevant 0 (every accuracy metric NaN)
RECOMMENDED = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [7, 8, 9, 10]])
RELEVANT = [[2, 4, 11], [5], []]
L2, L5 = math.log2(3), math.log2(5)


@pytest.fixture
def hits_and_counts():
    sets = RelevantSets.from_lists(RELEVANT)
    return relevance_matrix(RECOMMENDED, sets), sets.n_relevant


def test_relevance_matrix_known_values(hits_and_counts):
    hits, n_rel = hits_and_counts
    np.testing.assert_array_equal(hits, [[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(n_rel, [3, 1, 0])


def test_relevance_matrix_counts_a_repeated_item_once():
    # [2, 2, 3] with relevant {2}: only the first 2 is a hit, so precision cannot exceed 1/3.
    hits = relevance_matrix([[2, 2, 3]], [[2]])
    np.testing.assert_array_equal(hits, [[True, False, False]])
    # ... also when the repeat is not adjacent and padding sits between, in a wider batch
    hits = relevance_matrix([[5, -1, 3, 5, -1], [3, 3, 3, -1, -1]], [[5, 3], [3]])
    np.testing.assert_array_equal(hits, [[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]])


def test_relevant_sets_drop_duplicates_and_sort():
    sets = RelevantSets.from_pairs([1, 0, 1, 1], [7, 3, 2, 7], n_users=3)
    np.testing.assert_array_equal(sets.indptr, [0, 1, 3, 3])
    np.testing.assert_array_equal(sets.indices, [3, 2, 7])


def test_ndcg_known_values(hits_and_counts):
    hits, n_rel = hits_and_counts
    # user 0: DCG = 1/log2(3) + 1/log2(5); IDCG over min(3, 4) = 3 slots = 1 + 1/log2(3) + 1/log2(4)
    # user 1: DCG = IDCG = 1
    expected0 = (1 / L2 + 1 / L5) / (1 + 1 / L2 + 0.5)
    out = ndcg_at_k(hits, n_rel)
    np.testing.assert_allclose(out[:2], [expected0, 1.0])
    assert np.isnan(out[2])
    # k = 2, user 0: DCG = 1/log2(3), IDCG over min(3, 2) = 2 slots = 1 + 1/log2(3)
    np.testing.assert_allclose(ndcg_at_k(hits, n_rel, k=2)[0], (1 / L2) / (1 + 1 / L2))


def test_map_known_values(hits_and_counts):
    hits, n_rel = hits_and_counts
    # user 0: hits at ranks 2 and 4 -> precision@2 = 1/2, precision@4 = 2/4; AP@4 = (1/2 + 1/2) / min(3, 4) = 1/3
    # user 1: hit at rank 1 -> AP = 1 / min(1, 4) = 1
    np.testing.assert_allclose(map_at_k(hits, n_rel)[:2], [1 / 3, 1.0])
    # k = 2, user 0: (1/2) / min(3, 2) = 1/4
    np.testing.assert_allclose(map_at_k(hits, n_rel, k=2)[0], 0.25)


def test_precision_recall_hit_rate_mrr_known_values(hits_and_counts):
    hits, n_rel = hits_and_counts
    # precision divides by k: user 1's padding slots are misses -> 1/4
    np.testing.assert_allclose(precision_at_k(hits, n_rel)[:2], [2 / 4, 1 / 4])
    np.testing.assert_allclose(recall_at_k(hits, n_rel)[:2], [2 / 3, 1.0])
    np.testing.assert_allclose(recall_at_k(hits, n_rel, k=1)[:2], [0.0, 1.0])
    np.testing.assert_allclose(hit_rate_at_k(hits, n_rel)[:2], [1.0, 1.0])
    np.testing.assert_allclose(hit_rate_at_k(hits, n_rel, k=1)[:2], [0.0, 1.0])
    np.testing.assert_allclose(mrr(hits, n_rel)[:2], [1 / 2, 1.0])
    for metric in (precision_at_k, recall_at_k, hit_rate_at_k, mrr):
        assert np.isnan(metric(hits, n_rel)[2])


def test_k_larger_than_the_list_counts_missing_slots_as_misses(hits_and_counts):
    hits, n_rel = hits_and_counts
    # k = 6 > K = 4: same DCG/IDCG for user 0 (min(3, 6) = 3 ideal slots), precision divides by 6.
    np.testing.assert_allclose(ndcg_at_k(hits, n_rel, k=6)[:2], ndcg_at_k(hits, n_rel)[:2])
    np.testing.assert_allclose(precision_at_k(hits, n_rel, k=6)[:2], [2 / 6, 1 / 6])
    # user 0 has 3 relevant items: with k = 6 the ideal list holds all 3, AP = (1/2 + 2/4) / 3
    np.testing.assert_allclose(map_at_k(hits, n_rel, k=6)[0], 1 / 3)


def test_mean_metric_skips_users_without_relevant_items(hits_and_counts):
    hits, n_rel = hits_and_counts
    assert mean_metric(hit_rate_at_k(hits, n_rel)) == 1.0
    assert math.isnan(mean_metric([np.nan, np.nan]))


def test_metric_rejects_more_hits_than_relevant_items():
    with pytest.raises(ValueError, match="user row 0 has 2 hits but n_relevant=1"):
        ndcg_at_k([[True, True]], [1])


def test_metric_rejects_bad_k_and_shapes():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ndcg_at_k([[True]], [1], k=0)
    with pytest.raises(ValueError, match=r"n_relevant must have shape \(1,\)"):
        ndcg_at_k([[True]], [1, 2])
    with pytest.raises(ValueError, match="hits must be a 2-D"):
        ndcg_at_k([True], [1])


def test_recommended_rejects_negative_ids_other_than_padding():
    with pytest.raises(ValueError, match="only -1 is allowed as padding"):
        relevance_matrix([[3, -2]], [[3]])


def test_relevance_matrix_rejects_row_count_mismatch():
    with pytest.raises(ValueError, match="recommended has 1 rows but relevant sets are given for 2 users"):
        relevance_matrix([[1]], [[1], [2]])


# ---- beyond accuracy --------------------------------------------------------------------------------


def test_intra_list_diversity_known_values():
    # e0 = (1, 0), e1 = (0, 1), e2 = (1, 1): cos(0,1) = 0, cos(0,2) = cos(1,2) = 1/sqrt(2)
    # list [0, 1, 2]: mean distance = (1 + 2 * (1 - 1/sqrt(2))) / 3; [0, 1, -]: 1; [0, -, -]: undefined
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = intra_list_diversity([[0, 1, 2], [0, 1, -1], [0, -1, -1]], emb, chunk_size=2)
    np.testing.assert_allclose(out[:2], [(1 + 2 * (1 - 1 / math.sqrt(2))) / 3, 1.0])
    assert np.isnan(out[2])


def test_intra_list_diversity_rejects_zero_embeddings():
    with pytest.raises(ValueError, match=r"items \[1\] have all-zero embeddings"):
        intra_list_diversity([[0, 1]], np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_catalog_coverage_known_value():
    # items 0 and 1 shown, catalogue of 4 -> 0.5
    assert catalog_coverage([[0, 1], [1, -1]], n_items=4) == 0.5
    with pytest.raises(ValueError, match="covers only ids 0..3"):
        catalog_coverage([[4]], n_items=4)


def test_novelty_known_values():
    # p = [0.5, 0.25, 1.0]: -log2 -> [1, 2, 0]; list [0, 1] -> 1.5, list [2, -] -> 0, empty list -> NaN
    out = novelty([[0, 1], [2, -1], [-1, -1]], [0.5, 0.25, 1.0])
    np.testing.assert_allclose(out[:2], [1.5, 0.0])
    assert np.isnan(out[2])


def test_novelty_rejects_counts_and_zero_probabilities():
    with pytest.raises(ValueError, match=r"item 1 has popularity p=0.0; novelty needs probabilities in \(0, 1\]"):
        novelty([[0, 1]], [0.5, 0.0])
    with pytest.raises(ValueError, match="item 0 has popularity p=12.0"):
        novelty([[0]], [12.0])


def test_serendipity_known_values(hits_and_counts):
    hits, n_rel = hits_and_counts
    # user 0: relevant hits are items 2 and 4; the popularity baseline shows 2 -> only 4 is serendipitous: 1/4
    # user 1: hit 5 is not in the baseline -> 1/4; user 2: no relevant items -> NaN (n_relevant given)
    out = serendipity(RECOMMENDED, hits, [2, 9], n_relevant=n_rel)
    np.testing.assert_allclose(out[:2], [0.25, 0.25])
    assert np.isnan(out[2])
    per_user_baseline = np.array([[9, -1], [5, -1], [-1, -1]])  # user 1's hit is expected for user 1
    np.testing.assert_allclose(serendipity(RECOMMENDED, hits, per_user_baseline), [0.5, 0.0, 0.0])


def test_gini_known_values():
    assert gini([3, 3, 3]) == 0.0  # equal
    assert gini([0, 0, 0, 7]) == pytest.approx(3 / 4)  # everything on one of n entries -> (n - 1) / n
    # sorted [1, 2, 3]: sum_i (2i - 4) x_(i) = -2 + 0 + 6 = 4; G = 4 / (3 * 6) = 2/9, in any order
    assert gini([3, 1, 2]) == pytest.approx(2 / 9)
    assert gini(np.array([0.5, 0.0, 1.5, 0.0])) == pytest.approx(0.625)  # (1 * 0.5 + 3 * 1.5) / (4 * 2)
    assert math.isnan(gini([0, 0, 0]))  # nothing to distribute
    assert math.isnan(gini([]))


def test_gini_rejects_bad_input():
    with pytest.raises(ValueError, match=r"gini needs finite non-negative values, got -1.0 at index 2"):
        gini([0, 1, -1])
    with pytest.raises(ValueError, match=r"gini needs finite non-negative values, got nan at index 0"):
        gini([float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"gini needs a 1-D vector, got shape \(2, 2\)"):
        gini([[1, 2], [3, 4]])


def test_gini_of_exposure_known_values():
    # exposure [0, 0, 2, 2]: sum_i (2i - 5) x_(i) = 1*2 + 3*2 = 8; G = 8 / (4 * 4) = 0.5
    assert gini_of_exposure([[2, 3], [3, 2]], n_items=4) == pytest.approx(0.5)
    assert gini_of_exposure([[0, 1], [2, 3]], n_items=4) == pytest.approx(0.0)
    # everything on one of n items -> (n - 1) / n
    assert gini_of_exposure([[1, -1], [1, -1]], n_items=5) == pytest.approx(4 / 5)


def test_position_weighted_exposure():
    # rank r counts 1 / log2(r + 1): [1, 1/log2(3)]
    np.testing.assert_allclose(item_exposure([[0, 1]], 3, position_weighted=True), [1.0, 1 / L2, 0.0])


def test_split_by_group_ignores_undefined_values():
    out = split_by_group([1.0, np.nan, 3.0, 5.0, np.nan], ["a", "a", "b", "b", "c"])
    assert out["a"] == 1.0 and out["b"] == 4.0 and math.isnan(out["c"])
    assert list(split_by_group([1.0, 2.0], np.array([7, 7]))) == [7]
    assert type(next(iter(split_by_group([1.0], np.array([7]))))) is int


# ---- parity with a per-user loop twin ------------------------------------------------------------------


def loop_metrics(rec_row, relevant, k):
    """Plain-Python reference for one user: (ndcg, ap, precision, recall, hit, rr)."""
    relevant = set(relevant)
    seen, hits = set(), []
    for item in list(rec_row)[:k]:
        hits.append(item >= 0 and item in relevant and item not in seen)
        seen.add(item)
    hits += [False] * (k - len(hits))
    if not relevant:
        return (math.nan,) * 6
    dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    n_hit, ap, rr = 0, 0.0, 0.0
    for r, h in enumerate(hits):
        if h:
            n_hit += 1
            ap += n_hit / (r + 1)
            rr = rr or 1 / (r + 1)
    return dcg / idcg, ap / min(len(relevant), k), n_hit / k, n_hit / len(relevant), float(n_hit > 0), rr


@st.composite
def ranked_lists(draw):
    n_users = draw(st.integers(1, 6))
    length = draw(st.integers(1, 6))
    rows = [draw(st.lists(st.integers(-1, 12), min_size=length, max_size=length)) for _ in range(n_users)]
    # padding only at the tail, like real lists
    rows = [sorted(r, key=lambda x: x < 0) for r in rows]
    relevant = [draw(st.lists(st.integers(0, 12), max_size=6)) for _ in range(n_users)]
    k = draw(st.integers(1, 8))
    return np.array(rows), relevant, k


@settings(max_examples=60, deadline=None)
@given(ranked_lists())
def test_vectorised_metrics_match_loop_twin(case):
    rec, relevant, k = case
    sets = RelevantSets.from_lists(relevant)
    hits = relevance_matrix(rec, sets)
    got = np.column_stack(
        [f(hits, sets.n_relevant, k) for f in (ndcg_at_k, map_at_k, precision_at_k, recall_at_k, hit_rate_at_k, mrr)]
    )
    want = np.array([loop_metrics(rec[u], relevant[u], k) for u in range(rec.shape[0])])
    np.testing.assert_allclose(got, want, equal_nan=True)
    defined = ~np.isnan(got)
    assert ((got[defined] >= 0) & (got[defined] <= 1 + 1e-12)).all()


def test_relevant_sets_reject_unsorted_rows():
    with pytest.raises(ValueError, match="each row's item ids must be sorted and unique"):
        RelevantSets(indptr=np.array([0, 2, 3]), indices=np.array([5, 1, 0]))
    # a decrease across a row boundary is fine
    RelevantSets(indptr=np.array([0, 2, 2, 3]), indices=np.array([1, 5, 0]))


def test_paired_bootstrap_interval():
    from recsvc.evaluation.metrics import paired_bootstrap

    b = np.linspace(0, 1, 200)
    same = paired_bootstrap(b + 0.25, b)
    assert same["mean"] == pytest.approx(0.25) and same["low"] == pytest.approx(0.25)
    assert same["high"] == pytest.approx(0.25) and same["users"] == 200
    rng = np.random.default_rng(3)
    a = rng.normal(0.1, 1.0, 4000)
    res = paired_bootstrap(a, np.zeros(4000), n_boot=500, seed=1)
    assert res["low"] < 0.1 < res["high"] and res["high"] - res["low"] == pytest.approx(2 * 1.96 / np.sqrt(4000), rel=0.2)
    a[:10] = np.nan  # users for whom the metric is undefined are dropped from both sides
    assert paired_bootstrap(a, np.zeros(4000), n_boot=50)["users"] == 3990
    with pytest.raises(ValueError, match="one value per user each"):
        paired_bootstrap([1.0, 2.0], [1.0])
