"""Exploration policies: one behavioural contract for every policy, exact and
Monte-Carlo propensities against empirical slate frequencies, a simulated
Bernoulli bandit, the Beta-posterior update, and the policy factory."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.exploration import (
    EpsilonGreedyPolicy,
    Exploration,
    GreedyPolicy,
    ThompsonPolicy,
    UCB1Policy,
    update_evidence,
    make_policy,
    top_k_indices,
)


def candidates(n, seed=0, ties=False):
    """Ranker scores and bandit state for n candidates."""
    rs = np.random.default_rng(seed)
    scores = rs.integers(0, 5, n) if ties else rs.normal(size=n)
    shows = rs.integers(0, 300, n).astype(np.float64)
    clicks = rs.binomial(shows.astype(np.int64), rs.uniform(0.01, 0.2, n))
    return dict(
        scores=scores.astype(np.float32),
        alpha=1.0 + clicks,
        beta=20.0 + shows - clicks,
        pulls=shows,
        total_pulls=float(shows.sum()),
    )


def slate(exploration, k):
    """What the engine serves: the top k of the adjusted scores (ties: lower index)."""
    return top_k_indices(exploration.scores, k)


# --------------------------------------------------------------------------
# top_k_indices: the ordering rule every propensity assumes


def test_top_k_indices_known_values():
    s = np.array([1, 3, 3, 2, 3], dtype=np.float32)
    np.testing.assert_array_equal(top_k_indices(s, 2), [1, 2])
    np.testing.assert_array_equal(top_k_indices(s, 4), [1, 2, 4, 3])
    np.testing.assert_array_equal(top_k_indices(s, 9), [1, 2, 4, 3, 0])
    assert top_k_indices(s, 0).shape == (0,)


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=60), st.integers(0, 70))
def test_top_k_indices_is_a_truncated_stable_descending_sort(values, k):
    s = np.array(values, dtype=np.float32)
    np.testing.assert_array_equal(top_k_indices(s, k), np.argsort(-s, kind="stable")[:k])


# --------------------------------------------------------------------------
# The contract every policy meets

POLICIES = [
    GreedyPolicy(),
    ThompsonPolicy(top_m=30, n_propensity_draws=64),
    ThompsonPolicy(top_m=30, n_propensity_draws=64, temperature=None),
    UCB1Policy(c=1.0, top_m=30),
    EpsilonGreedyPolicy(epsilon=0.2, top_m=30),
    EpsilonGreedyPolicy(epsilon=1.0, top_m=5),
]


@pytest.fixture(params=POLICIES, ids=lambda p: repr(p))
def policy(request):
    return request.param


class TestPolicyContract:
    @pytest.mark.parametrize("n, k", [(100, 10), (100, 30), (100, 45), (12, 5), (7, 7), (7, 20), (1, 1)])
    def test_shapes_ranges_and_sum(self, policy, n, k):
        c = candidates(n, seed=n + k)
        ex = policy.explore(**c, k=k, rng=np.random.default_rng(0))
        assert isinstance(ex, Exploration)
        assert ex.scores.dtype == np.float32 and ex.scores.shape == (n,)
        assert ex.propensity.dtype == np.float64 and ex.propensity.shape == (n,)
        assert np.isfinite(ex.scores).all()
        assert ex.propensity.min() >= 0.0 and ex.propensity.max() <= 1.0
        assert ex.propensity.sum() == pytest.approx(min(k, n), abs=1e-9)

    def test_served_items_have_positive_propensity(self, policy):
        c = candidates(100, ties=True)
        for seed in range(10):
            ex = policy.explore(**c, k=10, rng=np.random.default_rng(seed))
            assert (ex.propensity[slate(ex, 10)] > 0).all()

    def test_same_seed_same_result(self, policy):
        c = candidates(80)
        one = policy.explore(**c, k=10, rng=np.random.default_rng(3))
        two = policy.explore(**c, k=10, rng=np.random.default_rng(3))
        np.testing.assert_array_equal(one.scores, two.scores)
        np.testing.assert_array_equal(one.propensity, two.propensity)

    def test_inputs_are_not_modified(self, policy):
        c = candidates(50)
        before = {key: np.copy(v) for key, v in c.items()}
        policy.explore(**c, k=5, rng=np.random.default_rng(0))
        for key, v in c.items():
            np.testing.assert_array_equal(v, before[key])

    def test_k_zero_and_empty_candidates(self, policy):
        ex = policy.explore(**candidates(20), k=0, rng=np.random.default_rng(0))
        assert ex.propensity.sum() == 0.0 and ex.scores.shape == (20,)
        ex = policy.explore([], [], [], [], 0.0, 5, np.random.default_rng(0))
        assert ex.scores.shape == (0,) and ex.propensity.shape == (0,)

    def test_accepts_lists_and_other_dtypes(self, policy):
        ex = policy.explore([0.3, 0.1, 0.2], [1, 2, 3], [20, 20, 20], [0, 5, 9], 14, 2, np.random.default_rng(0))
        assert ex.propensity.sum() == pytest.approx(2.0)

    @pytest.mark.parametrize(
        "change, exc, msg",
        [
            ({"scores": np.zeros(9, np.float32)}, ValueError, "alpha has length 10, expected 9"),
            ({"scores": np.zeros((2, 5))}, ValueError, r"scores must be 1-D, got shape \(2, 5\)"),
            ({"scores": np.r_[np.nan, np.zeros(9)]}, ValueError, r"scores must be finite, got scores\[0\]=nan"),
            ({"alpha": np.r_[np.ones(9), 0.0]}, ValueError, r"alpha must be positive and finite, got alpha\[9\]=0.0"),
            ({"beta": np.r_[np.ones(9), -2.0]}, ValueError, r"beta must be positive and finite, got beta\[9\]=-2.0"),
            ({"pulls": np.r_[-1.0, np.ones(9)]}, ValueError, r"pulls must be >= 0 and finite, got pulls\[0\]=-1.0"),
            ({"pulls": np.ones(11)}, ValueError, "pulls has length 11, expected 10"),
            ({"total_pulls": -1.0}, ValueError, "total_pulls must be >= 0 and finite, got -1.0"),
            ({"k": -1}, ValueError, "k must be >= 0, got -1"),
            ({"k": 1.5}, TypeError, "k must be an integer, got float"),
            ({"rng": np.random.RandomState(0)}, TypeError, "rng must be a numpy.random.Generator"),
            ({"rng": 7}, TypeError, "rng must be a numpy.random.Generator .*got int"),
        ],
    )
    def test_validation(self, policy, change, exc, msg):
        args = candidates(10) | {"k": 3, "rng": np.random.default_rng(0)} | change
        with pytest.raises(exc, match=msg):
            policy.explore(**args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    n=st.integers(1, 60),
    k=st.integers(0, 70),
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
)
def test_property_propensities_are_probabilities_summing_to_k(policy, n, k, seed, ties):
    ex = policy.explore(**candidates(n, seed=seed % 1000, ties=ties), k=k, rng=np.random.default_rng(seed))
    assert ex.propensity.min() >= 0.0 and ex.propensity.max() <= 1.0
    assert ex.propensity.sum() == pytest.approx(min(k, n), abs=1e-9)
    assert (ex.propensity[slate(ex, k)] > 0).all()


# --------------------------------------------------------------------------
# Policy-specific behaviour


def test_greedy_is_the_ranker_order():
    c = candidates(50, ties=True)
    ex = GreedyPolicy().explore(**c, k=7, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(ex.scores, c["scores"])
    expected = np.zeros(50)
    expected[np.argsort(-c["scores"], kind="stable")[:7]] = 1.0
    np.testing.assert_array_equal(ex.propensity, expected)


def empirical_slate_frequency(policy, c, k, runs, seed):
    rng = np.random.default_rng(seed)
    hits = np.zeros(c["scores"].shape[0])
    reported = np.zeros_like(hits)
    for _ in range(runs):
        ex = policy.explore(**c, k=k, rng=rng)
        hits[slate(ex, k)] += 1
        reported += ex.propensity
    return hits / runs, reported / runs


@pytest.mark.parametrize("k, top_m", [(3, 10), (4, 4), (8, 5)])
def test_epsilon_greedy_propensity_is_exact(k, top_m):
    c = candidates(30, seed=k)
    policy = EpsilonGreedyPolicy(epsilon=0.3, top_m=top_m)
    runs = 2000
    freq, reported = empirical_slate_frequency(policy, c, k, runs, seed=1)
    one = policy.explore(**c, k=k, rng=np.random.default_rng(0)).propensity
    np.testing.assert_allclose(reported, one, atol=1e-12)  # exact: the same every call
    greedy = np.argsort(-c["scores"], kind="stable")
    top, k_top = greedy[:top_m], min(k, top_m)
    expected = np.zeros(30)
    expected[greedy[:k]] = 0.7
    expected[top] += 0.3 * k_top / top_m
    expected[greedy[top_m:k]] += 0.3
    np.testing.assert_allclose(one, expected, atol=1e-12)
    assert one.sum() == pytest.approx(k)
    se = np.sqrt(one * (1 - one) / runs)
    assert (np.abs(freq - one) <= 5 * se + 1e-12).all()


def test_epsilon_greedy_extremes():
    c = candidates(40)
    zero = EpsilonGreedyPolicy(epsilon=0.0).explore(**c, k=5, rng=np.random.default_rng(0))
    greedy = GreedyPolicy().explore(**c, k=5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(zero.scores, greedy.scores)
    np.testing.assert_array_equal(zero.propensity, greedy.propensity)
    ex = EpsilonGreedyPolicy(epsilon=1.0, top_m=10).explore(**c, k=5, rng=np.random.default_rng(0))
    top = np.argsort(-c["scores"], kind="stable")[:10]
    assert set(slate(ex, 5)) <= set(top)
    np.testing.assert_allclose(ex.propensity[top], 0.5)


def test_thompson_propensities_match_empirical_slate_frequencies():
    # Averaging the per-request MC estimates (unbiased) over many requests gives a
    # precise P(i in slate); the served slates must occur at that rate.
    c = candidates(40, seed=5)
    c["alpha"], c["beta"] = c["alpha"] / 20, c["beta"] / 20  # wide posteriors: lots of exploration
    k, runs = 4, 2000
    policy = ThompsonPolicy(top_m=15, n_propensity_draws=32)
    freq, reported = empirical_slate_frequency(policy, c, k, runs, seed=2)
    assert (reported > 0.01).sum() >= 8  # the test exercises a real spread
    se = np.sqrt(reported * (1 - reported) / runs)
    assert (np.abs(freq - reported) <= 5 * se + 2e-3).all()


def test_thompson_keeps_candidates_beyond_top_m_below_in_ranker_order():
    c = candidates(60, seed=1)
    ex = ThompsonPolicy(top_m=20, n_propensity_draws=16).explore(**c, k=5, rng=np.random.default_rng(0))
    order = np.argsort(-c["scores"], kind="stable")
    top, rest = order[:20], order[20:]
    assert ex.scores[rest].max() < ex.scores[top].min()
    np.testing.assert_array_equal(np.argsort(-ex.scores[rest], kind="stable"), np.arange(40))
    assert (ex.propensity[rest] == 0).all()


def test_thompson_with_k_at_least_top_m_is_deterministic_membership():
    c = candidates(30, seed=2)
    ex = ThompsonPolicy(top_m=8, n_propensity_draws=16).explore(**c, k=10, rng=np.random.default_rng(0))
    expected = np.zeros(30)
    expected[np.argsort(-c["scores"], kind="stable")[:10]] = 1.0
    np.testing.assert_array_equal(ex.propensity, expected)


def test_thompson_temperature_lets_the_ranker_count():
    # Equal posteriors: with score weighting the ranker's favourite is served far more often.
    c = candidates(10)
    c["scores"] = np.linspace(0.0, 3.0, 10).astype(np.float32)
    c["alpha"], c["beta"] = np.full(10, 2.0), np.full(10, 30.0)
    weighted = ThompsonPolicy(top_m=10, n_propensity_draws=400).explore(**c, k=1, rng=np.random.default_rng(0))
    flat = ThompsonPolicy(top_m=10, n_propensity_draws=400, temperature=None).explore(
        **c, k=1, rng=np.random.default_rng(0)
    )
    assert weighted.propensity[9] > 0.4 and weighted.propensity[9] > 3 * weighted.propensity[0]
    assert flat.propensity.max() < 0.25  # ~uniform


def test_ucb1_prefers_the_unpulled_item_and_reduces_to_the_mean_when_c_is_zero():
    c = dict(
        scores=np.zeros(3, np.float32),
        alpha=np.array([30.0, 1.0, 60.0]),
        beta=np.array([70.0, 20.0, 140.0]),
        pulls=np.array([80.0, 0.0, 180.0]),
        total_pulls=260.0,
    )
    ex = UCB1Policy(c=1.0).explore(**c, k=1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(ex.propensity, [0.0, 1.0, 0.0])
    greedy_mean = UCB1Policy(c=0.0, temperature=None).explore(**c, k=1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(greedy_mean.propensity, [1.0, 0.0, 0.0])


# --------------------------------------------------------------------------
# A simulated Bernoulli bandit: the bandit policies find the best arm


@pytest.mark.parametrize(
    "policy",
    [ThompsonPolicy(top_m=10, n_propensity_draws=8, temperature=None), UCB1Policy(c=0.5, temperature=None)],
    ids=["thompson", "ucb1"],
)
def test_bandit_converges_to_the_best_arm(policy):
    p = np.array([0.05, 0.08, 0.1, 0.12, 0.15, 0.18, 0.2, 0.22, 0.25, 0.4])
    arms, rounds = p.shape[0], 3000
    rng, env = np.random.default_rng(7), np.random.default_rng(8)
    successes, failures, pulls = np.zeros(arms), np.zeros(arms), np.zeros(arms)
    scores = np.zeros(arms, np.float32)
    regret = np.empty(rounds)
    for t in range(rounds):
        ex = policy.explore(scores, 1.0 + successes, 1.0 + failures, pulls, pulls.sum(), 1, rng)
        arm = int(top_k_indices(ex.scores, 1)[0])
        click = float(env.random() < p[arm])
        update_evidence(successes, failures, [arm], [click], [1.0 - click], 1.0)  # the serving update rule
        pulls[arm] += 1
        regret[t] = p.max() - p[arm]
    assert pulls.argmax() == arms - 1 and pulls[-1] > 0.6 * rounds
    cumulative = np.cumsum(regret)
    # Sublinear: the last third costs much less regret than the first third.
    assert cumulative[-1] - cumulative[2 * rounds // 3] < 0.5 * cumulative[rounds // 3]
    assert cumulative[-1] < 0.25 * rounds * (p.max() - p.mean())


# --------------------------------------------------------------------------
# Beta posterior updates


def test_update_evidence_known_values():
    s, f = np.array([0.0, 4.0, 10.0]), np.array([0.0, 20.0, 40.0])
    update_evidence(s, f, [2, 0, 2], [1.0, 0.0, 2.0], [0.0, 1.0, 4.0], 0.5)
    # row 2, one event at a time: (10, 40) halved then +(1, 0) -> (6, 20); halved then +(2, 4) -> (5, 14)
    np.testing.assert_allclose(s, [0.0, 4.0, 5.0])
    np.testing.assert_allclose(f, [1.0, 20.0, 14.0])


def test_update_evidence_without_discount_is_counting():
    s, f = np.array([1.0, 2.0]), np.array([3.0, 2.0])
    update_evidence(s, f, np.array([1, 1, 0]), [1, 1, 0], [0, 2, 3], 1.0)
    np.testing.assert_allclose(s, [1.0, 4.0])
    np.testing.assert_allclose(f, [6.0, 4.0])


def test_update_evidence_takes_back_a_failure_and_never_goes_negative():
    s, f = np.array([0.0]), np.array([1.0])
    update_evidence(s, f, [0, 0], [1.0, 0.0], [-1.0, -5.0], 1.0)  # the impression became a click
    assert (s[0], f[0]) == (1.0, 0.0)


def test_update_evidence_forgets_towards_the_prior():
    s, f = np.array([100.0]), np.array([900.0])
    update_evidence(s, f, [0] * 200, [0.0] * 200, [0.0] * 200, 0.9)
    assert s[0] == pytest.approx(0.0, abs=1e-6) and f[0] == pytest.approx(0.0, abs=1e-5)


def test_online_state_discounts_with_update_evidence(tmp_path):
    """The state's bandit update is the one tested above (it once had its own copy)."""
    from recsvc.catalog import demo_catalog
    from recsvc.config import DemoCatalogConfig
    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
    from recsvc.retrieval.ann import AnnIndex

    from conftest import NOW_MS, small_config

    cfg = small_config(tmp_path, exploration={"discount": 0.5, "policy": "greedy"})
    cat = demo_catalog(DemoCatalogConfig(n_items=200, dim=8, n_categories=3, n_topics=2, seed=3))
    eng = Engine(cfg, cat, AnnIndex.build(cat.embeddings[: cat.n_rows], cat.alive_rows(), cfg.index),
                 clock=lambda: NOW_MS)
    row_s, row_f = np.zeros(cat.capacity), np.zeros(cat.capacity)
    for k in range(4):
        rec = eng.recommend(RecommendQuery(user_id="u", n=3))
        item = rec.items[0].item_id
        row = cat.row_of[item]
        eng.feedback([FeedbackEventIn(f"i{k}", "u", item, "impression", request_id=rec.request_id)])
        update_evidence(row_s, row_f, [row], [0.0], [1.0], 0.5)
        if k % 2:
            eng.feedback([FeedbackEventIn(f"c{k}", "u", item, "click", request_id=rec.request_id)])
            update_evidence(row_s, row_f, [row], [1.0], [-1.0], 0.5)
    rows = np.arange(cat.n_rows)
    got_s, got_f = eng.state.bandit_evidence(rows)
    np.testing.assert_array_equal(got_s, row_s[rows])
    np.testing.assert_array_equal(got_f, row_f[rows])
    eng.close(snapshot=False)


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        ({"rows": [3]}, ValueError, "rows must index the 3 items, got row 3"),
        ({"rows": [-1]}, ValueError, "rows must index the 3 items, got row -1"),
        ({"rows": [0.5]}, TypeError, "rows must be an integer array, got dtype float64"),
        ({"d_successes": [np.nan]}, ValueError, "d_successes must be finite"),
        ({"d_failures": [1.0, 2.0]}, ValueError, "d_failures has length 2, expected 1"),
        ({"gamma": 0.0}, ValueError, r"gamma must be in \(0, 1\], got 0.0"),
        ({"gamma": 1.5}, ValueError, r"gamma must be in \(0, 1\], got 1.5"),
        ({"successes": [1.0, 1.0, 1.0]}, ValueError, "successes must be a 1-D float64 numpy array"),
        ({"failures": np.ones(3, np.float32)}, ValueError, "failures must be a 1-D float64 numpy array"),
        ({"failures": np.ones(2)}, ValueError, r"failures has length 2, expected 3"),
    ],
)
def test_update_evidence_validation(change, exc, msg):
    args = dict(successes=np.ones(3), failures=np.ones(3), rows=[0], d_successes=[1.0], d_failures=[0.0],
                gamma=1.0) | change
    with pytest.raises(exc, match=msg):
        update_evidence(**args)


# --------------------------------------------------------------------------
# Factory and parameter validation


@pytest.mark.parametrize(
    "name, params, cls",
    [
        ("greedy", {}, GreedyPolicy),
        ("thompson", {"top_m": 50, "n_propensity_draws": 128, "discount": 0.99}, ThompsonPolicy),
        ("ucb1", {"c": 2.0}, UCB1Policy),
        ("epsilon_greedy", {"epsilon": 0.1, "top_m": 20}, EpsilonGreedyPolicy),
    ],
)
def test_make_policy(name, params, cls):
    policy = make_policy(name, **params)
    assert type(policy) is cls and policy.name == name
    for key, value in params.items():
        assert getattr(policy, key) == value


def test_make_policy_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown exploration policy 'thomson'; valid choices: epsilon_greedy, greedy, thompson, ucb1"):
        make_policy("thomson")


def test_make_policy_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"policy 'ucb1' got unknown parameter\(s\) \['epsilon'\]; it accepts: c, top_m, temperature"):
        make_policy("ucb1", epsilon=0.1)


@pytest.mark.parametrize(
    "name, params, msg",
    [
        ("epsilon_greedy", {"epsilon": 1.5}, r"epsilon must be in \[0, 1\], got 1.5"),
        ("epsilon_greedy", {"top_m": 0}, "top_m must be >= 1, got 0"),
        ("thompson", {"n_propensity_draws": 0}, "n_propensity_draws must be >= 1, got 0"),
        ("thompson", {"discount": 0.0}, r"discount must be in \(0, 1\], got 0.0"),
        ("thompson", {"temperature": 0.0}, r"temperature must be positive and finite \(or None\), got 0.0"),
        ("ucb1", {"c": -1.0}, "c must be >= 0 and finite, got -1.0"),
        ("ucb1", {"c": math.nan}, "c must be >= 0 and finite, got nan"),
    ],
)
def test_policy_parameter_validation(name, params, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy(name, **params)
