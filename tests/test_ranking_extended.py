"""Extended features and gradient-boosted trees: kernel/twin parity, known values, files, the engine."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc._fastpath import _ranking as native
from recsvc._fastpath.twins import ranking as twin
from recsvc.ranking import (
    ALL_FEATURES,
    EXTENDED_FEATURES,
    FEATURE_NAMES,
    ExtendedInputs,
    Forest,
    Ranker,
    RankerFileError,
    gather_features,
)
from recsvc.retrieval.candidates import SOURCE_NAMES

from test_ranking import DAY_MS, NOW_MS, by_candidate, random_inputs

B = len(FEATURE_NAMES)
COL = {name: i for i, name in enumerate(ALL_FEATURES)}


def random_forest(seed: int, n_features: int, trees: int, depth: int) -> Forest:
    rng = np.random.default_rng(seed)
    inner = (1 << depth) - 1
    return Forest.validated(depth, rng.integers(0, n_features, (trees, inner)), rng.normal(size=(trees, inner)),
                            rng.normal(0, 0.2, (trees, inner + 1)), rng.normal(), n_features)


def extended_inputs(seed: int, n: int = 120, N: int = 300, d: int = 24, W: int = 4, M: int = 80, **over):
    rng = np.random.default_rng(seed)
    base = random_inputs(seed, N=N, d=d, n=n, sources=rng.integers(0, 1 << len(SOURCE_NAMES), n).astype(np.uint8))
    item_rows = rng.choice(N, n, replace=False).astype(np.int32)
    ext = ExtendedInputs(
        item_rows=item_rows,
        item_counts=rng.integers(0, 30, n).astype(np.float32),
        recent_weights=(0.5 ** np.arange(W)).astype(np.float32),
        recent_counts=rng.integers(0, 30, W).astype(np.float32),
        # half the neighbours are candidates, the rest are not
        neighbour_rows=np.where(rng.random(M) < 0.5, rng.choice(item_rows, M) if n else 0,
                                rng.integers(0, N, M)).astype(np.int32),
        neighbour_counts=rng.integers(0, 6, M).astype(np.float32),
        neighbour_owner=rng.integers(0, W, M).astype(np.int32),
        recent_embeddings=rng.normal(size=(3, d)).astype(np.float32),
        user_interactions=float(rng.integers(0, 300)),
        profile=rng.normal(size=d).astype(np.float32),
    )
    return replace(base, extended=replace(ext, **over))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 60), use_native=st.booleans())
def test_extended_gather_by_candidate_matches_by_row(seed: int, n: int, use_native: bool) -> None:
    inputs = extended_inputs(seed, n=n)
    np.testing.assert_array_equal(gather_features(by_candidate(inputs), 14.0, use_native=use_native),
                                  gather_features(inputs, 14.0, use_native=use_native))


# -- the forest kernel -------------------------------------------------------------------------------


def test_feature_layout() -> None:
    assert ALL_FEATURES == FEATURE_NAMES + EXTENDED_FEATURES
    assert len(set(ALL_FEATURES)) == len(ALL_FEATURES)
    assert EXTENDED_FEATURES[-1] == "log_age_days"
    assert [f for f in EXTENDED_FEATURES if f.startswith("rank_")] == [f"rank_{s}" for s in SOURCE_NAMES]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 53), trees=st.integers(0, 9), depth=st.integers(0, 6))
def test_forest_kernel_matches_twin(seed, n, trees, depth) -> None:
    F = 7
    forest = random_forest(seed, F, trees, depth)
    X = np.random.default_rng(seed + 1).normal(size=(n, F)).astype(np.float32)
    X[:, 2] = forest.threshold.reshape(-1)[:1].repeat(n) if forest.threshold.size else 0.0  # ties go left
    args = (X, forest.feature.reshape(-1), forest.threshold.reshape(-1), forest.leaf.reshape(-1), depth,
            np.float32(forest.bias))
    a, b = np.empty(n, np.float32), np.empty(n, np.float32)
    native.forest_score(*args, a)
    twin.forest_score(*args, b)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_forest_known_values() -> None:
    # one tree of depth 2: x0 <= 0.5 ? (x1 <= 0 ? 1 : 2) : 3 (the right side is a padded leaf)
    inf = np.finfo(np.float32).max
    forest = Forest.validated(2, [[0, 1, 0]], [[0.5, 0.0, inf]], [[1.0, 2.0, 3.0, 3.0]], -2.0, 2)
    ranker = Ranker("gbdt", forest, feature_names=("similarity", "log_popularity"))
    X = np.array([[0.5, 0.0], [0.4, 0.1], [0.6, -9.0], [np.float32(0.5000001), 0.0]], np.float32)
    z = np.array([-1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(ranker.score_features(X), 1 / (1 + np.exp(-z)), rtol=1e-6)
    np.testing.assert_allclose(ranker.score_features(X, use_native=False), 1 / (1 + np.exp(-z)), rtol=1e-6)


def test_forest_kernel_refuses_a_column_outside_x() -> None:
    out = np.empty(2, np.float32)
    X = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="tests a column outside X"):
        native.forest_score(X, np.array([3], np.int32), np.zeros(1, np.float32), np.zeros(2, np.float32), 1, 0.0, out)
    with pytest.raises(ValueError, match="array shapes disagree"):
        native.forest_score(X, np.array([0], np.int32), np.zeros(1, np.float32), np.zeros(3, np.float32), 1, 0.0, out)


def test_gbdt_ranker_round_trips_through_its_file(tmp_path) -> None:
    forest = random_forest(3, len(ALL_FEATURES), 12, 4)
    ranker = Ranker("gbdt", forest, feature_names=ALL_FEATURES, metrics={"ndcg": 0.1})
    path = tmp_path / "r.json"
    ranker.save(path)
    again = Ranker.load(path)
    assert again.kind == "gbdt" and again.version == ranker.version and again.uses_extended
    assert repr(again).endswith("trees=12, depth=4)")
    X = np.random.default_rng(0).normal(size=(50, len(ALL_FEATURES))).astype(np.float32)
    np.testing.assert_array_equal(again.score_gathered(X), ranker.score_gathered(X))
    assert again.layers == () and again.forest.n_trees == 12


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.update(depth=13), r"weights.depth must be an integer in \[0, 12\]"),
        (lambda w: w["trees"][0].update(feature=[0, 1]), "every tree's feature must be a list of 3 integers"),
        (lambda w: w["trees"][0].update(feature=[0, 1, 99]), "forest features must index the model's 2 features"),
        (lambda w: w["trees"][0].update(leaf=[1.0, 2.0]), "every tree's leaf must be a list of 4 numbers"),
        (lambda w: w.update(bias="x"), "forest bias must be numbers"),
    ],
)
def test_malformed_gbdt_files_name_the_problem(tmp_path, mutate, message) -> None:
    forest = Forest.validated(2, [[0, 1, 0]], [[0.5, 0.0, 1.0]], [[1.0, 2.0, 3.0, 4.0]], 0.0, 2)
    data = Ranker("gbdt", forest, feature_names=("similarity", "cooc_cosine")).to_dict()
    mutate(data["weights"])
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(RankerFileError, match=message):
        Ranker.load(tmp_path / "r.json")


# -- the extended gather -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_extended_gather_matches_twin(seed) -> None:
    inputs = extended_inputs(seed)
    X = gather_features(inputs, 14.0)
    Y = gather_features(inputs, 14.0, use_native=False)
    assert X.shape == Y.shape == (inputs.rows.shape[0], len(ALL_FEATURES))
    np.testing.assert_allclose(X, Y, rtol=1e-5, atol=1e-6)
    # the base columns are exactly the base gather's
    np.testing.assert_array_equal(X[:, :B], gather_features(replace(inputs, extended=None), 14.0))
    assert (X[:, COL["cooc_support"]] > 0).any()


def test_extended_gather_with_no_history_and_no_candidates() -> None:
    empty = dict(recent_weights=np.empty(0, np.float32), recent_counts=np.empty(0, np.float32),
                 neighbour_rows=np.empty(0, np.int32), neighbour_counts=np.empty(0, np.float32),
                 neighbour_owner=np.empty(0, np.int32), recent_embeddings=np.empty((0, 24), np.float32))
    X = gather_features(extended_inputs(1, profile=None, **empty), 14.0)
    assert not X[:, COL["cooc_cosine"]:COL["user_activity"]].any() and not X[:, COL["profile_cosine"]].any()
    inputs = extended_inputs(2, n=0, M=0, item_rows=np.empty(0, np.int32), item_counts=np.empty(0, np.float32))
    assert gather_features(inputs, 14.0).shape == (0, len(ALL_FEATURES))


def test_extended_features_known_values() -> None:
    d = 2
    emb = np.array([[1, 0], [0, 2], [3, 4], [1, 1]], np.float32)
    base = random_inputs(0, N=4, d=d, n=3)
    ext = ExtendedInputs(
        item_rows=np.array([10, 20, 30], np.int32),  # catalog rows of candidates 0, 1, 2
        item_counts=np.array([4, 0, 9], np.float32),
        recent_weights=np.array([1.0, 0.5], np.float32),
        recent_counts=np.array([16, 1], np.float32),
        neighbour_rows=np.array([10, 99, 30, 10], np.int32),
        neighbour_counts=np.array([2, 7, 3, 1], np.float32),
        neighbour_owner=np.array([0, 0, 0, 1], np.int32),
        recent_embeddings=np.array([[2, 0]], np.float32),
        user_interactions=float(np.e - 1),
        profile=np.array([0, -3], np.float32),
    )
    inputs = replace(base, user_vec=np.array([0.6, 0.8], np.float32), embeddings=emb,
                     rows=np.array([0, 1, 2], np.int32), now_ms=NOW_MS,
                     created_at_ms=np.array([NOW_MS - DAY_MS, NOW_MS + 3 * DAY_MS, NOW_MS, NOW_MS], np.int64),
                     source_scores=np.array([[0.5, 0, 0.2, 0], [0.9, 0, 0.2, 0], [0, 1, 0.3, 0]], np.float32),
                     sources=np.array([0b0101, 0b0101, 0b0110], np.uint8), extended=ext)
    for use_native in (True, False):
        X = gather_features(inputs, 14.0, use_native=use_native)
        col = lambda name: X[:, COL[name]]  # noqa: E731
        np.testing.assert_allclose(col("item_norm"), [1, 2, 5])
        np.testing.assert_allclose(col("similarity"), [0.6, 1.6, 5.0], rtol=1e-6)
        np.testing.assert_allclose(col("cosine"), [0.6, 0.8, 1.0], rtol=1e-6)
        # candidate 0 (row 10): 2 with item 0 (n = 16, w = 1), 1 with item 1 (n = 1, w = .5); n_j = 4
        np.testing.assert_allclose(col("cooc_cosine"), [2 / 8 + 0.5 * 1 / 2, 0, 3 / 12], rtol=1e-6)
        np.testing.assert_allclose(col("cooc_conditional"), [2 / 16 + 0.5, 0, 3 / 16], rtol=1e-6)
        np.testing.assert_allclose(col("cooc_reverse"), [2 / 4 + 0.5 / 4, 0, 3 / 9], rtol=1e-6)
        np.testing.assert_allclose(col("cooc_log_count"), np.log1p([2.5, 0, 3]), rtol=1e-6)
        np.testing.assert_allclose(col("cooc_max_cosine"), [0.5, 0, 0.25], rtol=1e-6)
        np.testing.assert_array_equal(col("cooc_support"), [2, 0, 1])
        np.testing.assert_allclose(col("recent_max_cosine"), [1.0, 0.0, 0.6], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(col("recent_mean_cosine"), [1.0, 0.0, 0.6], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(col("user_activity"), 1.0, rtol=1e-6)
        np.testing.assert_allclose(col("log_item_count"), np.log1p([4, 0, 9]), rtol=1e-6)
        np.testing.assert_allclose(col("profile_cosine"), [0, -1, -0.8], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(col("rank_ann"), [1, 0, 3])  # candidate 2 is not from ann: n = 3
        np.testing.assert_array_equal(col("rank_cooccurrence"), [3, 3, 0])
        np.testing.assert_array_equal(col("rank_popular"), [1, 2, 0])  # a tie keeps candidate order
        np.testing.assert_array_equal(col("rank_fresh"), [3, 3, 3])
        np.testing.assert_allclose(col("log_age_days"), [np.log1p(1), -np.log1p(3), 0], rtol=1e-6)


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(item_rows=np.zeros(120, np.int32)), "extended.item_rows must be distinct"),
        (dict(item_rows=np.arange(-1, 119, dtype=np.int32)), r"extended.item_rows must be catalog rows \(>= 0\)"),
        (dict(item_counts=np.zeros(3, np.float32)), "extended.item_counts has 3 entries but there are 120"),
        (dict(neighbour_owner=np.full(80, 9, np.int32)), "extended.neighbour_owner must index the 4 recent items"),
        (dict(recent_embeddings=np.zeros((2, 5), np.float32)), r"must have shape \(R, 24\)"),
        (dict(neighbour_counts=np.full(80, np.nan, np.float32)), "extended.neighbour_counts contains NaN"),
        (dict(profile=np.zeros(3, np.float32)), "extended.profile must be 24 finite values"),
    ],
)
def test_extended_inputs_are_validated(over, message) -> None:
    with pytest.raises(ValueError, match=message):
        gather_features(extended_inputs(0, **over), 14.0)


def test_a_ranker_with_extended_features_needs_them() -> None:
    forest = random_forest(0, 2, 3, 2)
    ranker = Ranker("gbdt", forest, feature_names=("similarity", "cooc_conditional"))
    assert ranker.uses_extended and not Ranker.default().uses_extended
    inputs = extended_inputs(4)
    with pytest.raises(ValueError, match="uses extended features"):
        ranker.score(replace(inputs, extended=None), 14.0)
    with pytest.raises(ValueError, match=f"must have the {len(ALL_FEATURES)} columns of ALL_FEATURES"):
        ranker.score_gathered(np.zeros((3, B), np.float32))
    X = gather_features(inputs, 14.0)
    np.testing.assert_array_equal(ranker.score(inputs, 14.0), ranker.score_gathered(X))
    np.testing.assert_array_equal(ranker.score_gathered(X), ranker.score_features(X[:, [0, COL["cooc_conditional"]]]))
    # a base-only model scores the wide matrix exactly as the narrow one
    default = Ranker.default()
    np.testing.assert_array_equal(default.score_gathered(X), default.score_gathered(X[:, :B]))


# -- the state's co-occurrence counts and the engine ------------------------------------------------------


def test_neighbour_counts_follow_the_feedback(engine, clock) -> None:
    from recsvc.engine import FeedbackEventIn

    cat = engine.catalog
    a, b, c = (cat.item_ids[r] for r in (10, 20, 30))
    events = [FeedbackEventIn(f"{u}-{k}", f"user{u}", item, "click", timestamp_ms=clock() - 1000 + k)
              for u in range(3) for k, item in enumerate((a, b))]
    assert engine.feedback(events).accepted == 6
    rows, counts, owner = engine.state.neighbour_counts([10, 20, 99])
    assert sorted(zip(owner.tolist(), rows.tolist(), counts.tolist())) == [(0, 20, 3.0), (1, 10, 3.0)]
    # a new co-occurrence invalidates the cached arrays of both items
    engine.feedback([FeedbackEventIn("x", "user0", c, "click")])
    rows, counts, owner = engine.state.neighbour_counts([10])
    assert dict(zip(rows.tolist(), counts.tolist())) == {20: 3.0, 30: 1.0}
    assert all(a.size == 0 for a in engine.state.neighbour_counts([]))


def test_the_engine_gathers_and_logs_extended_features_for_a_ranker_that_uses_them(tmp_path, clock) -> None:
    from conftest import small_config
    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery

    names = ("similarity", "cooc_conditional", "rank_ann", "log_age_days")
    forest = random_forest(5, len(names), 20, 3)
    path = tmp_path / "gbdt.json"
    Ranker("gbdt", forest, feature_names=names).save(path)
    eng = Engine.from_config(small_config(tmp_path, ranking={"model_path": str(path)}), clock=clock)
    try:
        cat = eng.catalog
        events = [FeedbackEventIn(f"{u}-{k}", f"user{u}", cat.item_ids[(u * 7 + k * 3) % 50], "click",
                                  timestamp_ms=clock() - 10_000 + k) for u in range(20) for k in range(5)]
        assert eng.feedback(events).accepted == 100
        rec = eng.recommend(RecommendQuery(user_id="user3", n=8))
        assert len(rec.items) == 8 and not rec.degraded
        served = eng.state.served_slate(rec.request_id)
        assert list(served.feature_names) == list(ALL_FEATURES)
        block = served.feature_block()
        assert block.shape == (8, len(ALL_FEATURES)) and (block[:, COL["user_activity"]] > 0).all()
        # the default ranker still logs the base layout only
        eng.requests.rankers._rankers.clear()
        eng.requests.rankers._rankers[str(path)] = Ranker.default()
        rec = eng.recommend(RecommendQuery(user_id="user3", n=8))
        assert list(eng.state.served_slate(rec.request_id).feature_names) == list(FEATURE_NAMES)
    finally:
        eng.close(snapshot=False)
