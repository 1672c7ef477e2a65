"""LambdaRank trees: LightGBM's model exported for the compiled scorer, calibration, the served-log path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recsvc.ranking import FEATURE_NAMES, Ranker
from recsvc.training import forest_from_lightgbm, train_gbdt

lgb = pytest.importorskip("lightgbm")


def ranking_data(seed: int, groups: int = 120, size: int = 30):
    """Relevance driven by two of five features, with an interaction; groups of ``size`` rows."""
    rng = np.random.default_rng(seed)
    n = groups * size
    X = rng.normal(size=(n, 5)).astype(np.float32)
    X[:, 4] = rng.integers(0, 3, n)  # a discrete feature: thresholds between integers
    logit = 1.5 * X[:, 0] + np.where(X[:, 4] == 2, 1.0, -1.0) * X[:, 1] - 2.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return X, y, np.repeat(np.arange(groups), size)


def test_exported_trees_score_as_lightgbm_does() -> None:
    X, y, g = ranking_data(0)
    booster = lgb.train({"objective": "lambdarank", "num_leaves": 11, "max_depth": 4, "verbose": -1,
                         "num_threads": 1, "min_data_in_leaf": 5}, lgb.Dataset(X, y, group=np.bincount(g)), 25)
    forest = forest_from_lightgbm(booster)
    assert forest.depth == 4 and forest.n_trees == 25
    ranker = Ranker("gbdt", forest, feature_names=FEATURE_NAMES[:5])
    z = np.log(ranker.score_features(X).astype(np.float64)) - np.log1p(-ranker.score_features(X).astype(np.float64))
    np.testing.assert_allclose(z, booster.predict(X, raw_score=True), rtol=1e-4, atol=1e-4)
    # a feature value exactly at a threshold goes left, as in LightGBM
    node = forest.threshold[0][forest.threshold[0] < 1e30][0]
    col = forest.feature[0][forest.threshold[0] < 1e30][0]
    X2 = X[:8].copy()
    X2[:, col] = node
    np.testing.assert_allclose(np.log(ranker.score_features(X2) / (1 - ranker.score_features(X2))),
                               booster.predict(X2, raw_score=True), rtol=1e-4, atol=1e-4)


def test_categorical_splits_are_refused() -> None:
    dump = {"tree_info": [{"tree_structure": {"split_index": 0, "split_feature": 0, "threshold": "1||2",
                                              "decision_type": "==", "left_child": {"leaf_value": 1.0},
                                              "right_child": {"leaf_value": 0.0}}}]}
    with pytest.raises(ValueError, match="only numerical '<=' splits can be exported"):
        forest_from_lightgbm(dump)


def test_train_gbdt_learns_and_is_calibrated(tmp_path) -> None:
    X, y, g = ranking_data(1, groups=300)
    ranker, metrics = train_gbdt(X, y, g, feature_names=FEATURE_NAMES[:5], holdout_fraction=0.25, rounds=80,
                                 params={"min_data_in_leaf": 20})
    assert ranker.kind == "gbdt" and metrics["holdout_auc"] > 0.8 and metrics["holdout_ndcg_at_10"] > 0.5
    p = ranker.score_features(X)
    assert abs(float(p.mean()) - float(y.mean())) < 0.02  # calibrated: mean prediction = base rate
    ranker.save(tmp_path / "r.json")
    again = Ranker.load(tmp_path / "r.json")
    np.testing.assert_array_equal(again.score_features(X), p)
    # the same seed gives the same model
    twice, _ = train_gbdt(X, y, g, feature_names=FEATURE_NAMES[:5], holdout_fraction=0.25, rounds=80,
                          params={"min_data_in_leaf": 20})
    assert twice.version == ranker.version


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group=np.r_[np.zeros(10), np.ones(10), np.zeros(10)]), "group ids must be contiguous"),
        (dict(y=np.zeros(30)), "all of one class"),
        (dict(weight=-np.ones(30)), "weight must hold 30 finite, non-negative values"),
        (dict(feature_names=FEATURE_NAMES[:2]), "X has 5 columns but there are 2 feature_names"),
    ],
)
def test_train_gbdt_rejects_bad_input(kwargs, message) -> None:
    X, y, g = ranking_data(2, groups=3, size=10)
    args = dict(X=X, y=y, group=g, feature_names=FEATURE_NAMES[:5]) | kwargs
    with pytest.raises(ValueError, match=message):
        train_gbdt(**args)


def test_train_ranker_gbdt_from_the_served_log(tmp_path, clock, capsys) -> None:
    from recsvc.cli import main
    from recsvc.engine import Engine, RecommendQuery

    from conftest import small_config
    from test_train_from_log import _traffic

    cfg = small_config(tmp_path)
    engine = Engine.from_config(cfg, clock=clock)
    _traffic(engine, users=120)
    out = tmp_path / "gbdt.json"
    assert main(["train-ranker", "--state-dir", str(cfg.state.dir), "-o", str(out), "--kind", "gbdt"]) == 0
    metrics = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert metrics["kind"] == "gbdt" and metrics["ipw"] and metrics["examples"] == 120 * 8
    engine.close(snapshot=False)
    ranker = Ranker.load(out)
    assert ranker.kind == "gbdt" and ranker.feature_names == FEATURE_NAMES
    served = Engine.from_config(cfg.with_overrides({"ranking": {"model_path": str(out)}}), clock=clock)
    assert len(served.recommend(RecommendQuery(user_id="new", n=5)).items) == 5
    served.close(snapshot=False)
