"""The trainer: weight recovery, inverse-propensity weighting, metrics, log → examples."""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import pytest

from recsvc.ranking import FEATURE_NAMES, Ranker
from recsvc.training import examples_from_log, log_loss, roc_auc, train_ranker

F = len(FEATURE_NAMES)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def coefficients(ranker: Ranker) -> np.ndarray:
    """[coef..., intercept] of a logistic ranker."""
    W, b = ranker.layers[0]
    return np.r_[W[:, 0], b].astype(np.float64)


# --------------------------------------------------------------------------
# metrics


def brute_force_auc(y, s, w):
    num = den = 0.0
    for i, j in itertools.product(range(len(y)), repeat=2):
        if y[i] == 1 and y[j] == 0:
            den += w[i] * w[j]
            num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties_and_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    y = (rng.random(n) < 0.4).astype(float)
    s = rng.integers(0, 6, n).astype(float)  # many ties
    w = rng.uniform(0.1, 3.0, n)
    assert roc_auc(y, s) == pytest.approx(brute_force_auc(y, s, np.ones(n)), abs=1e-12)
    assert roc_auc(y, s, w) == pytest.approx(brute_force_auc(y, s, w), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert roc_auc([1, 0], [0.9, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.1, 0.9]))


def test_log_loss_known_values() -> None:
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert log_loss([1, 0], [0.9, 0.2], [3.0, 1.0]) == pytest.approx((-3 * np.log(0.9) - np.log(0.8)) / 4)
    assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped


# --------------------------------------------------------------------------
# weight recovery


def test_logistic_recovers_known_weights() -> None:
    rng = np.random.default_rng(42)
    n = 20_000
    scales = rng.uniform(0.2, 5.0, F)  # features on very different scales and offsets
    X = rng.normal(size=(n, F)) * scales + rng.normal(size=F)
    w_true = rng.normal(size=F) / scales  # each feature contributes ~N(0, 1) logits
    y = (rng.random(n) < sigmoid(X @ w_true - 0.5 - (X.mean(0) @ w_true))).astype(float)
    # logging propensities independent of everything: IPW must not hurt
    p = rng.uniform(0.1, 1.0, n)
    for ipw in (False, True):
        ranker, metrics = train_ranker(X, y, p, ipw=ipw, l2=1e-6, seed=0)
        w_hat = ranker.layers[0][0][:, 0]
        cosine = w_hat @ w_true / np.linalg.norm(w_hat) / np.linalg.norm(w_true)
        # measured: 0.9998 unweighted, 0.9996 weighted
        assert cosine > 0.99, (ipw, cosine)
        assert metrics["converged"] and metrics["iterations"] <= 15
        assert ranker.layers[0][1][0] == pytest.approx(-0.5 - X.mean(0) @ w_true, abs=0.3)
        # the held-out AUC is close to that of the true model
        assert metrics["holdout_auc"] > 0.8


def test_trained_ranker_scores_raw_features() -> None:
    """Standardisation is folded into the saved weights: scoring raw X gives the fit's probabilities."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 3)) * [1.0, 100.0, 0.01] + [0.0, 500.0, 1.0]
    y = (rng.random(3000) < sigmoid(X[:, 0] + 0.01 * (X[:, 1] - 500) + 50 * (X[:, 2] - 1))).astype(float)
    names = ["similarity", "log_popularity", "freshness"]
    ranker, metrics = train_ranker(X, y, None, l2=0.0, feature_names=names, holdout_fraction=0.0)
    np.testing.assert_allclose(coefficients(ranker), [1.0, 0.01, 50.0, -5.0 - 50.0], rtol=0.2, atol=0.1)
    assert metrics["train_log_loss"] == pytest.approx(log_loss(y, ranker.score_features(X)), rel=1e-6)


def test_mlp_learns_an_interaction_the_logistic_cannot() -> None:
    rng = np.random.default_rng(5)
    n = 6000
    X = rng.normal(size=(n, 4))
    y = (rng.random(n) < sigmoid(3.0 * X[:, 0] * X[:, 1] - 0.5)).astype(float)  # XOR-like
    names = FEATURE_NAMES[:4]
    _, lin = train_ranker(X, y, None, kind="logistic", feature_names=names, seed=1)
    mlp, m = train_ranker(X, y, None, kind="mlp", hidden=(32,), epochs=25, feature_names=names, seed=1)
    assert lin["holdout_auc"] < 0.6
    assert m["holdout_auc"] > 0.8
    assert mlp.kind == "mlp" and mlp.hidden_sizes == (32,)
    # and the two-layer variant trains and round-trips
    mlp2, m2 = train_ranker(X, y, None, kind="mlp", hidden=(16, 8), epochs=25, feature_names=names, seed=1)
    assert m2["holdout_auc"] > 0.75
    assert Ranker.from_dict(mlp2.to_dict()).score_features(X[:5]).tolist() == mlp2.score_features(X[:5]).tolist()


# --------------------------------------------------------------------------
# inverse propensity weighting


def fit_logistic_full(X, y):
    ranker, _ = train_ranker(X, y, None, ipw=False, l2=0.0, feature_names=FEATURE_NAMES[:3], holdout_fraction=0.0)
    return coefficients(ranker)


def test_ipw_removes_the_bias_of_a_skewed_logging_policy() -> None:
    """The logging policy saw something the features do not (u, e.g. a signal of
    intent); u also drives clicks. Among the impressions it chose, u is high
    (clicks look likelier than they are) and u is anti-correlated with x0 (the
    policy also favoured high x0), so the unweighted fit is biased in the
    intercept and in x0's weight, however much data it gets. The target is the
    logistic fit over *every* candidate (what showing all of them would give);
    weighting each impression by 1 / propensity recovers it.
    """
    w_true, b_true = np.array([1.0, -0.5, 0.5]), -1.0

    def population(rng, n):
        X, u = rng.normal(size=(n, 3)), rng.normal(size=n)
        y = (rng.random(n) < sigmoid(X @ w_true + b_true + 1.5 * u)).astype(float)
        return X, u, y

    X_all, _, y_all = population(np.random.default_rng(1000), 200_000)
    target = fit_logistic_full(X_all, y_all)  # every candidate observed

    naive_err, ipw_err, naive_slope_err, ipw_slope_err = [], [], [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        X, u, y = population(rng, 40_000)
        propensity = np.clip(sigmoid(2.0 * u + 1.0 * X[:, 0] - 0.5), 0.05, 0.95)
        shown = rng.random(X.shape[0]) < propensity
        kw = dict(l2=0.0, feature_names=FEATURE_NAMES[:3], holdout_fraction=0.0, seed=seed)
        naive = coefficients(train_ranker(X[shown], y[shown], propensity[shown], ipw=False, **kw)[0])
        ipw = coefficients(train_ranker(X[shown], y[shown], propensity[shown], ipw=True, **kw)[0])
        naive_err.append(np.linalg.norm(naive - target))
        ipw_err.append(np.linalg.norm(ipw - target))
        naive_slope_err.append(np.linalg.norm(naive[:3] - target[:3]))
        ipw_slope_err.append(np.linalg.norm(ipw[:3] - target[:3]))
    # Measured: naive error ~0.75 on every seed (bias, not noise), IPW ~0.05.
    assert min(naive_err) > 0.5
    assert max(ipw_err) < 0.25 * min(naive_err)
    assert np.mean(ipw_slope_err) < 0.6 * np.mean(naive_slope_err)


def test_ipw_weights_are_clipped_and_reported() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 2))
    y = (rng.random(2000) < 0.3).astype(float)
    p = np.full(2000, 0.5)
    p[:10] = 1e-6  # would dominate unclipped
    names = FEATURE_NAMES[:2]
    _, clipped = train_ranker(X, y, p, ipw=True, min_propensity=0.1, feature_names=names)
    _, wild = train_ranker(X, y, p, ipw=True, min_propensity=1e-6, feature_names=names)
    assert clipped["effective_sample_size"] > 1000 > wild["effective_sample_size"]
    assert "holdout_auc_ipw" in clipped and "holdout_log_loss_ipw" in clipped


# --------------------------------------------------------------------------
# the trained file


def test_trained_ranker_file_carries_metrics_and_time(tmp_path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, F)).astype(np.float32)
    y = (rng.random(500) < sigmoid(X[:, 0])).astype(float)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    ranker, metrics = train_ranker(X, y, np.full(500, 0.5), trained_at=when)
    assert ranker.trained_at == "2026-01-02T03:04:05Z"
    assert metrics["n_train"] == 400 and metrics["n_holdout"] == 100
    ranker.save(tmp_path / "r.json")
    again = Ranker.load(tmp_path / "r.json")
    assert again.metrics == metrics and again.trained_at == ranker.trained_at and again.version == ranker.version


def test_training_is_deterministic_given_the_seed() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(800, 3))
    y = (rng.random(800) < sigmoid(X[:, 0] - X[:, 1])).astype(float)
    names = FEATURE_NAMES[:3]
    a, _ = train_ranker(X, y, None, kind="mlp", epochs=3, seed=9, feature_names=names)
    b, _ = train_ranker(X, y, None, kind="mlp", epochs=3, seed=9, feature_names=names)
    assert a.version == b.version


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(X=np.zeros((4, 2)), y=[0, 1, 0, 1]), "X has 2 columns but there are 19 feature_names"),
        (dict(X=np.zeros((4, F)), y=[0, 1, 0, 2]), r"labels must be in \[0, 1\]; label\[3\] = 2.0"),
        (dict(X=np.zeros((4, F)), y=[0, 1, 0, 1], propensity=[0.5, 0.0, 0.5, 0.5]), r"propensity\[1\] = 0.0"),
        (dict(X=np.zeros((4, F)), y=[1, 1, 1, 1]), "training labels are all 1"),
        (dict(X=np.zeros((4, F)), y=[0, 1, 0, 1], kind="tree"), "kind must be 'logistic' or 'mlp'"),
        (dict(X=np.zeros((4, F)), y=[0, 1, 0, 1], kind="mlp", hidden=(8, 8, 8)), "one or two positive layer sizes"),
        (dict(X=np.full((4, F), np.nan), y=[0, 1, 0, 1]), "X contains NaN"),
    ],
)
def test_train_ranker_rejects_bad_input(kwargs, message) -> None:
    kwargs.setdefault("propensity", None)
    with pytest.raises(ValueError, match=message):
        train_ranker(kwargs.pop("X"), kwargs.pop("y"), kwargs.pop("propensity"), **kwargs)


# --------------------------------------------------------------------------
# examples from the log


def test_examples_from_log_maps_columns_by_name() -> None:
    logged_names = list(reversed(FEATURE_NAMES)) + ["extra"]
    logged = np.arange(3 * (F + 1), dtype=np.float32).reshape(3, F + 1)
    ex = examples_from_log(logged, [1, 0, 1], [0.5, 0.2, 1.0], feature_names=logged_names)
    assert ex.feature_names == FEATURE_NAMES and len(ex) == 3
    np.testing.assert_array_equal(ex.X[:, 0], logged[:, logged_names.index("similarity")])
    np.testing.assert_array_equal(ex.X[:, -1], logged[:, logged_names.index(FEATURE_NAMES[-1])])
    assert ex.y.tolist() == [1, 0, 1] and ex.propensity.tolist() == [0.5, 0.2, 1.0]


def test_examples_from_log_with_rows_into_an_item_table() -> None:
    table = np.arange(5 * F, dtype=np.float32).reshape(5, F)
    ex = examples_from_log(table, [True, False], [0.3, 0.4], rows=[4, 1])
    np.testing.assert_array_equal(ex.X, table[[4, 1]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: examples_from_log(np.zeros((2, 2)), [0, 1], [1, 1], feature_names=["similarity", "freshness"]), r"the log lacks features \['log_popularity'"),
        (lambda: examples_from_log(np.zeros((2, F)), [0, 1], [1, 1.5]), r"propensities must be in \(0, 1\]; propensity\[1\] = 1.5"),
        (lambda: examples_from_log(np.zeros((2, F)), [0], [1, 1]), "labels has 1 entries but there are 2 examples"),
        (lambda: examples_from_log(np.zeros((2, F)), [0, 1], [1, 1], rows=[0, 2]), "rows must index the feature table's 2 rows"),
        (lambda: examples_from_log(np.full((2, F), np.inf), [0, 1], [1, 1]), r"NaN or infinity \(first at example 0\)"),
    ],
)
def test_examples_from_log_errors(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()
