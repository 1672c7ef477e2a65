"""Features and the ranker: gather correctness, kernel/twin parity, model files, context parsing."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc._fastpath import _ranking as native
from recsvc._fastpath.twins import ranking as twin
from recsvc.ranking import (
    BASE_FEATURES,
    CONTEXT_FEATURES,
    FEATURE_NAMES,
    FORMAT_VERSION,
    FeatureInputs,
    Ranker,
    RankerFileError,
    context_features,
    gather_features,
)
from recsvc.retrieval.candidates import SOURCE_NAMES

S = len(SOURCE_NAMES)
F = len(FEATURE_NAMES)
DAY_MS = 86_400_000
NOW_MS = 1_750_000_000_000


def random_inputs(seed: int, N: int = 300, d: int = 24, n: int = 120, C: int = 7, **overrides) -> FeatureInputs:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    user = rng.normal(size=d).astype(np.float32)
    user /= np.linalg.norm(user)
    categories = rng.integers(-1, C + 2, N).astype(np.int32)  # includes -1 and out-of-range
    scores = rng.random((n, S)).astype(np.float32) * (rng.random((n, S)) < 0.5)
    alpha = rng.uniform(0.5, 5, N)
    beta = rng.uniform(5, 50, N)
    alpha[:3] = 0.0  # alpha + beta == 0 for a few rows -> bandit_mean 0
    beta[:3] = 0.0
    inputs = FeatureInputs(
        user_vec=user,
        embeddings=emb,
        rows=rng.choice(np.r_[0:N], n, replace=True).astype(np.int32),
        log_popularity=np.log1p(rng.gamma(1.5, 3.0, N)).astype(np.float32),
        created_at_ms=(NOW_MS - rng.integers(-2 * DAY_MS, 90 * DAY_MS, N)).astype(np.int64),
        now_ms=NOW_MS,
        categories=categories,
        category_affinity=rng.dirichlet(np.ones(C)).astype(np.float32),
        bandit_alpha=alpha,
        bandit_beta=beta,
        source_scores=scores,
        context={"device": "tablet", "hour": "21:15"},
        sources=None,
    )
    return replace(inputs, **overrides)


def mlp_ranker(seed: int, hidden: tuple[int, ...]) -> Ranker:
    rng = np.random.default_rng(seed)
    sizes = (F, *hidden, 1)
    layers = [
        (rng.normal(0, 1 / math.sqrt(a), (a, b)).astype(np.float32), rng.normal(0, 0.1, b).astype(np.float32))
        for a, b in zip(sizes[:-1], sizes[1:])
    ]
    return Ranker("mlp", layers)


def logistic_ranker(seed: int) -> Ranker:
    rng = np.random.default_rng(seed)
    return Ranker("logistic", [(rng.normal(size=(F, 1)), [0.3])])


# --------------------------------------------------------------------------
# feature names


def test_feature_names_layout() -> None:
    assert FEATURE_NAMES[: len(BASE_FEATURES)] == BASE_FEATURES
    assert FEATURE_NAMES[5 : 5 + S] == tuple(f"score_{s}" for s in SOURCE_NAMES)
    assert FEATURE_NAMES[5 + S : 5 + 2 * S] == tuple(f"from_{s}" for s in SOURCE_NAMES)
    assert FEATURE_NAMES[5 + 2 * S :] == CONTEXT_FEATURES
    assert len(set(FEATURE_NAMES)) == F
    assert "score_cooccurrence" in FEATURE_NAMES


# --------------------------------------------------------------------------
# gather: a hand-computed case


def tiny_inputs() -> FeatureInputs:
    return FeatureInputs(
        user_vec=np.array([0.6, 0.8], np.float32),
        embeddings=np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32),
        rows=np.array([2, 0], np.int32),
        log_popularity=np.array([0.5, 1.0, 2.0], np.float32),
        created_at_ms=np.array([NOW_MS - 7 * DAY_MS, NOW_MS, NOW_MS + DAY_MS], np.int64),
        now_ms=NOW_MS,
        categories=np.array([1, 0, 5], np.int32),  # row 2: category outside the affinity vector
        category_affinity=np.array([0.25, 0.75], np.float32),
        bandit_alpha=np.array([1.0, 2.0, 3.0]),
        bandit_beta=np.array([3.0, 2.0, 1.0]),
        source_scores=np.array([[0.9, 0.0, 0.0, 0.4], [0.0, 0.3, 0.0, 0.0]], np.float32),
        context={"device": "Desktop ", "hour": "6"},
    )


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "twin"])
def test_gather_hand_computed(use_native: bool) -> None:
    X = gather_features(tiny_inputs(), freshness_half_life_days=7.0, use_native=use_native)
    expected = np.zeros((2, F), np.float32)
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    # candidate 0 = row 2: identical to the user, created in the future, unknown category
    expected[0, col["similarity"]] = 1.0
    expected[0, col["log_popularity"]] = 2.0
    expected[0, col["freshness"]] = 1.0  # negative age clamps to 0
    expected[0, col["category_affinity"]] = 0.0
    expected[0, col["bandit_mean"]] = 0.75
    expected[0, col["score_ann"]] = 0.9
    expected[0, col["score_fresh"]] = 0.4
    expected[0, col["from_ann"]] = 1.0
    expected[0, col["from_fresh"]] = 1.0
    # candidate 1 = row 0: a week old = one half-life
    expected[1, col["similarity"]] = 0.6
    expected[1, col["log_popularity"]] = 0.5
    expected[1, col["freshness"]] = 0.5
    expected[1, col["category_affinity"]] = 0.75
    expected[1, col["bandit_mean"]] = 0.25
    expected[1, col["score_cooccurrence"]] = 0.3
    expected[1, col["from_cooccurrence"]] = 1.0
    for r in range(2):
        expected[r, col["device_desktop"]] = 1.0
        expected[r, col["hour_sin"]] = 1.0  # 6 o'clock = a quarter turn
        expected[r, col["hour_cos"]] = 0.0
    np.testing.assert_allclose(X, expected, atol=1e-6)


def test_gather_uses_the_sources_bitmask_when_given() -> None:
    # bit 2 ('popular') set although its score is 0; 'ann' scored but its bit is not set
    inputs = replace(tiny_inputs(), sources=np.array([0b0100, 0b0010], np.uint8))
    X = gather_features(inputs, 7.0)
    flags = X[:, 5 + S : 5 + 2 * S]
    np.testing.assert_array_equal(flags, [[0, 0, 1, 0], [0, 1, 0, 0]])


def test_gather_of_no_candidates() -> None:
    inputs = replace(tiny_inputs(), rows=np.empty(0, np.int32), source_scores=np.empty((0, S), np.float32))
    assert gather_features(inputs, 7.0).shape == (0, F)
    assert Ranker.default().score(inputs, 7.0).shape == (0,)


# --------------------------------------------------------------------------
# parity: kernels against their numpy twins


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_mask", [False, True])
def test_gather_parity(seed: int, with_mask: bool) -> None:
    inputs = random_inputs(seed, d=[1, 7, 24, 64][seed])
    if with_mask:
        rng = np.random.default_rng(seed)
        inputs = replace(inputs, sources=rng.integers(0, 16, len(inputs.rows)).astype(np.uint8))
    a = gather_features(inputs, 14.0, use_native=True)
    b = gather_features(inputs, 14.0, use_native=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def by_candidate(inputs: FeatureInputs) -> FeatureInputs:
    """The same inputs with popularity and bandit evidence read for the candidates, in candidate order."""
    rows = inputs.rows
    return replace(inputs, log_popularity=inputs.log_popularity[rows], bandit_alpha=inputs.bandit_alpha[rows],
                   bandit_beta=inputs.bandit_beta[rows], by_candidate=True)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 60), d=st.sampled_from([1, 7, 24, 64]),
       use_native=st.booleans(), with_mask=st.booleans())
def test_gather_by_candidate_matches_by_row(seed: int, n: int, d: int, use_native: bool, with_mask: bool) -> None:
    # the request path passes its per-candidate reads in candidate order and the catalog's columns as they are
    inputs = random_inputs(seed, d=d, n=n)
    if with_mask:
        inputs = replace(inputs, sources=np.random.default_rng(seed).integers(0, 16, n).astype(np.uint8))
    np.testing.assert_array_equal(gather_features(by_candidate(inputs), 14.0, use_native=use_native),
                                  gather_features(inputs, 14.0, use_native=use_native))


@pytest.mark.parametrize("name", ["log_popularity", "bandit_alpha", "bandit_beta"])
def test_gather_by_candidate_wants_one_entry_per_candidate(name: str) -> None:
    inputs = by_candidate(random_inputs(0))
    with pytest.raises(ValueError, match=f"{name} has 300 entries but there are 120 candidates"):
        gather_features(replace(inputs, **{name: getattr(random_inputs(0), name)}), 14.0)


@pytest.mark.parametrize(
    "make",
    [lambda s: logistic_ranker(s), lambda s: mlp_ranker(s, (32,)), lambda s: mlp_ranker(s, (32, 32)), lambda s: mlp_ranker(s, (13, 5))],
    ids=["logistic", "mlp32", "mlp32x32", "mlp13x5"],
)
@pytest.mark.parametrize("seed", range(3))
def test_model_parity(make, seed: int) -> None:
    ranker = make(seed)
    X = np.random.default_rng(100 + seed).normal(size=(257, F)).astype(np.float32)
    a = ranker.score_features(X, use_native=True)
    b = ranker.score_features(X, use_native=False)
    assert a.dtype == np.float32 and a.shape == (257,)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_reports_bad_shapes() -> None:
    X = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        native.logistic_score(X, np.zeros(5, np.float32), 0.0, np.empty(3, np.float32))
    with pytest.raises(ValueError, match="shapes disagree"):
        twin.logistic_score(X, np.zeros(5, np.float32), 0.0, np.empty(3, np.float32))


def test_sigmoid_saturates_without_nan() -> None:
    ranker = Ranker("logistic", [(np.full((F, 1), 1.0), [0.0])])
    X = np.zeros((3, F), np.float32)
    X[0, 0], X[1, 0] = 1e4, -1e4
    for use_native in (True, False):
        s = ranker.score_features(X, use_native=use_native)
        np.testing.assert_allclose(s, [1.0, 0.0, 0.5], atol=1e-7)


# --------------------------------------------------------------------------
# behaviour shared by every ranker implementation


class RankerBehaviour:
    """Run against every kind of ranker (one subclass each)."""

    def make(self) -> Ranker:
        raise NotImplementedError

    def test_scores_are_probabilities(self) -> None:
        s = self.make().score(random_inputs(1), 14.0)
        assert s.dtype == np.float32 and s.shape == (120,)
        assert np.all((s > 0) & (s < 1))

    def test_score_is_gather_then_score_features(self) -> None:
        ranker, inputs = self.make(), random_inputs(2)
        X = gather_features(inputs, 14.0)
        np.testing.assert_array_equal(ranker.score(inputs, 14.0), ranker.score_features(X))
        np.testing.assert_array_equal(ranker.score(inputs, 14.0), ranker.score_gathered(X))

    def test_native_matches_twin(self) -> None:
        ranker, inputs = self.make(), random_inputs(3)
        np.testing.assert_allclose(
            ranker.score(inputs, 14.0), ranker.score(inputs, 14.0, use_native=False), rtol=1e-5, atol=1e-6
        )

    def test_save_load_round_trip(self, tmp_path) -> None:
        ranker = self.make()
        path = tmp_path / "sub" / "ranker.json"
        ranker.save(path)
        again = Ranker.load(path)
        assert (again.kind, again.version, again.feature_names) == (ranker.kind, ranker.version, ranker.feature_names)
        assert again.metrics == ranker.metrics and again.trained_at == ranker.trained_at
        for (W1, b1), (W2, b2) in zip(ranker.layers, again.layers, strict=True):
            np.testing.assert_array_equal(W1, W2)
            np.testing.assert_array_equal(b1, b2)
        inputs = random_inputs(4)
        np.testing.assert_array_equal(ranker.score(inputs, 14.0), again.score(inputs, 14.0))
        assert path.stat().st_mode & 0o777 == 0o644  # readable by the service, not mkstemp's 0600
        # saving again gives the same bytes
        ranker2 = tmp_path / "again.json"
        again.save(ranker2)
        assert ranker2.read_text() == path.read_text()

    def test_weights_are_read_only(self) -> None:
        W, _ = self.make().layers[0]
        with pytest.raises(ValueError):
            W[0, 0] = 1.0


class TestLogisticRanker(RankerBehaviour):
    def make(self) -> Ranker:
        return logistic_ranker(0)


class TestMLPRanker(RankerBehaviour):
    def make(self) -> Ranker:
        return mlp_ranker(0, (32,))


class TestTwoLayerMLPRanker(RankerBehaviour):
    def make(self) -> Ranker:
        return mlp_ranker(1, (32, 16))


class TestDefaultRanker(RankerBehaviour):
    def make(self) -> Ranker:
        return Ranker.default()


# --------------------------------------------------------------------------
# the default weights


def test_default_ranker_loads_with_the_expected_priorities() -> None:
    ranker = Ranker.default()
    assert ranker.kind == "logistic" and ranker.feature_names == FEATURE_NAMES
    assert ranker.version == "default-1"
    coef = dict(zip(FEATURE_NAMES, ranker.layers[0][0][:, 0]))
    assert coef["similarity"] == max(coef.values())
    # typical contribution = weight * typical range of the feature
    contribution = {
        "similarity": coef["similarity"] * 0.8,
        "score_cooccurrence": coef["score_cooccurrence"] * 1.0,
        "log_popularity": coef["log_popularity"] * 7.0,
        "category_affinity": coef["category_affinity"] * 0.4,
        "freshness": coef["freshness"] * 1.0,
        "bandit_mean": coef["bandit_mean"] * 0.2,
    }
    assert list(contribution) == sorted(contribution, key=contribution.get, reverse=True)


def test_default_ranker_file_is_what_the_generator_writes(tmp_path) -> None:
    from recsvc.training import write_default_ranker

    shipped = Ranker.default().to_dict()
    regenerated = json.loads(write_default_ranker(tmp_path / "d.json").read_text())
    assert regenerated == shipped


def test_default_ranker_prefers_similar_items() -> None:
    inputs = tiny_inputs()  # candidate 0 is identical to the user, candidate 1 less similar
    s = Ranker.default().score(inputs, 14.0)
    assert s[0] > s[1]


# --------------------------------------------------------------------------
# model files: versions, mismatches, errors


def write(tmp_path, data) -> str:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_file_with_a_subset_of_features_in_another_order_is_mapped_by_name(tmp_path) -> None:
    names = ["freshness", "similarity", "score_cooccurrence"]
    data = Ranker.default().to_dict()
    data["feature_names"] = names
    data["weights"] = {"coef": [0.5, 4.0, 1.5], "intercept": -1.0}
    ranker = Ranker.load(write(tmp_path, data))
    assert ranker.feature_names == tuple(names)
    full = np.zeros((F, 1))
    for name, w in zip(names, [0.5, 4.0, 1.5]):
        full[FEATURE_NAMES.index(name)] = w
    reference = Ranker("logistic", [(full, [-1.0])])
    inputs = random_inputs(5)
    np.testing.assert_array_equal(ranker.score(inputs, 14.0), reference.score(inputs, 14.0))


def test_file_with_an_unknown_feature_is_rejected_by_name(tmp_path) -> None:
    data = Ranker.default().to_dict()
    data["feature_names"] = data["feature_names"][:-1] + ["weather_rainy"]
    with pytest.raises(RankerFileError, match=r"does not compute: \['weather_rainy'\]"):
        Ranker.load(write(tmp_path, data))


def test_ranker_with_unknown_features_scores_features_but_not_requests() -> None:
    ranker = Ranker("logistic", [(np.ones((2, 1)), [0.0])], feature_names=["similarity", "mystery"])
    assert ranker.score_features(np.zeros((3, 2))).shape == (3,)
    with pytest.raises(ValueError, match=r"does not compute: \['mystery'\]"):
        ranker.score(random_inputs(0), 14.0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
        (lambda d: d.update(kind="forest"), "kind must be one of \\['logistic', 'mlp', 'gbdt'\\]"),
        (lambda d: d.pop("weights"), "missing key 'weights'"),
        (lambda d: d["weights"].update(coef=[1.0, 2.0]), r"weights.coef must have shape \(19,\)"),
        (lambda d: d["weights"].update(intercept="x"), "weights.intercept must be numbers"),
        (lambda d: d.update(feature_names="similarity"), "feature_names must be a list of strings"),
        (lambda d: d["feature_names"].append("similarity"), r"feature_names repeats \['similarity'\]"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, mutate, message) -> None:
    data = Ranker.default().to_dict()
    mutate(data)
    with pytest.raises(RankerFileError, match=message):
        Ranker.load(write(tmp_path, data))


def test_duplicate_feature_names_are_rejected(tmp_path) -> None:
    data = Ranker.default().to_dict()
    data["feature_names"][1] = "similarity"
    with pytest.raises(RankerFileError, match=r"repeats \['similarity'\]"):
        Ranker.load(write(tmp_path, data))


def test_mlp_file_with_inconsistent_layers(tmp_path) -> None:
    data = mlp_ranker(0, (4,)).to_dict()
    data["weights"]["output"]["weight"] = [1.0, 2.0, 3.0]  # hidden layer has 4 units
    with pytest.raises(RankerFileError, match=r"layer 1 weight must have shape \(4, outputs\)"):
        Ranker.load(write(tmp_path, data))


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(RankerFileError, match="ranker weights file not found"):
        Ranker.load(tmp_path / "nope.json")
    with pytest.raises(RankerFileError, match="not valid JSON"):
        Ranker.load(write(tmp_path, "{"))
    with pytest.raises(RankerFileError, match="expected a JSON object"):
        Ranker.load(write(tmp_path, "[1, 2]"))


def test_file_format_fields(tmp_path) -> None:
    data = mlp_ranker(0, (8,)).to_dict()
    assert data["format_version"] == FORMAT_VERSION
    assert set(data) == {"format_version", "kind", "version", "feature_names", "weights", "trained_at", "metrics", "description"}
    assert len(data["weights"]["hidden"][0]["weight"]) == F and len(data["weights"]["hidden"][0]["weight"][0]) == 8
    assert len(data["weights"]["output"]["weight"]) == 8


def test_version_is_a_content_hash_when_not_given() -> None:
    a, b, c = logistic_ranker(0), logistic_ranker(0), logistic_ranker(1)
    assert a.version == b.version != c.version
    assert a.version.startswith("logistic-")


# --------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rows": np.array([0, 300], np.int32)}, r"rows must be catalog rows in \[0, 300\); got \[300\]"),
        ({"rows": np.array([0.5, 1.0])}, "rows must hold integers"),
        ({"source_scores": np.zeros((120, 3), np.float32)}, r"source_scores must have shape \(n, 4\)"),
        ({"user_vec": np.zeros(5, np.float32)}, "user_vec has 5 dims but embeddings have 24"),
        ({"user_vec": np.full(24, np.nan, np.float32)}, "user_vec contains NaN"),
        ({"log_popularity": np.zeros(10, np.float32)}, "log_popularity has 10 entries but the catalog has 300 rows"),
        ({"now_ms": "soon"}, "now_ms must be an integer"),
    ],
)
def test_gather_rejects_bad_inputs(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        gather_features(random_inputs(0, **overrides), 14.0)


@pytest.mark.parametrize("half_life", [0.0, -1.0, float("nan"), float("inf")])
def test_gather_rejects_bad_half_life(half_life) -> None:
    with pytest.raises(ValueError, match="freshness_half_life_days must be positive"):
        gather_features(random_inputs(0), half_life)


# --------------------------------------------------------------------------
# context parsing


@pytest.mark.parametrize(
    "context, device, hour",
    [
        ({"device": "mobile", "hour": "0"}, "mobile", 0.0),
        ({"device": " TV ", "hour": "13:30"}, "tv", 13.5),
        ({"device": "phone", "hour": "23.99"}, None, 23.99),
        ({"hour": 7}, None, 7.0),
        ({"device": "tablet", "hour": "24"}, "tablet", None),
        ({"hour": "-1"}, None, None),
        ({"hour": "nan"}, None, None),
        ({"hour": "inf"}, None, None),
        ({"hour": "12:60"}, None, None),
        ({"hour": "noon"}, None, None),
        ({"hour": True}, None, None),
        ({"hour": "1" * 400}, None, None),
        ({"device": 3, "hour": None}, None, None),
        ({}, None, None),
    ],
)
def test_context_features(context, device, hour) -> None:
    v = context_features(context)
    assert v.dtype == np.float32 and v.shape == (len(CONTEXT_FEATURES),)
    one_hot = v[: len(CONTEXT_FEATURES) - 2]
    if device is None:
        assert not one_hot.any()
    else:
        assert one_hot.sum() == 1 and CONTEXT_FEATURES[int(np.argmax(one_hot))] == f"device_{device}"
    if hour is None:
        assert v[-2] == 0 and v[-1] == 0
    else:
        angle = 2 * math.pi * hour / 24
        np.testing.assert_allclose(v[-2:], [math.sin(angle), math.cos(angle)], atol=1e-6)


@pytest.mark.parametrize("context", [None, "device=mobile", 42, ["device"]])
def test_context_that_is_not_a_mapping_gives_zeros(context) -> None:
    assert not context_features(context).any()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none())))
def test_context_parsing_never_fails(context) -> None:
    v = context_features(context)
    assert np.isfinite(v).all()
    assert v[: len(CONTEXT_FEATURES) - 2].sum() <= 1
    assert v[-2] ** 2 + v[-1] ** 2 == pytest.approx(1.0, abs=1e-5) or (v[-2] == 0 and v[-1] == 0)


def test_unknown_context_values_reach_the_matrix_as_zeros() -> None:
    inputs = replace(tiny_inputs(), context={"device": "toaster", "hour": "late"})
    X = gather_features(inputs, 7.0)
    assert not X[:, 5 + 2 * S :].any()
