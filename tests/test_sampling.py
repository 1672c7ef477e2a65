"""Beta / Thompson-sampling kernels: statistics, seeding, parity with the numpy twins,
and the validation done by their public wrappers in recsvc.exploration."""

import math

import numpy as np
import pytest
from scipy import stats

from recsvc import exploration
from recsvc._fastpath import _sampling
from recsvc._fastpath.twins import sampling as twin

IMPLS = pytest.mark.parametrize("impl", [_sampling, twin], ids=["compiled", "twin"])


def posterior_like(m, seed=0):
    """alpha/beta shaped like real bandit state: prior (1, 20) plus counts."""
    rs = np.random.default_rng(seed)
    shows = rs.integers(0, 400, m)
    clicks = rs.binomial(shows, rs.uniform(0.01, 0.2, m))
    return 1.0 + clicks, 20.0 + shows - clicks


# --------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize(
    "a, b",
    [
        (0.5, 0.5),  # both <= 1: Johnk's algorithm
        (0.2, 3.0),  # shape < 1 gamma branch
        (1.0, 1.0),  # uniform
        (1.0, 20.0),  # the service's prior
        (2.0, 5.0),
        (50.0, 500.0),
        (1e4, 3e4),  # large counts
    ],
)
def test_beta_moments_match_theory(a, b):
    n = 20_000
    draws = exploration.sample_beta_batch(np.full(n, a), np.full(n, b), np.random.default_rng(1234))
    mean, var, _, kurt = (float(x) for x in stats.beta.stats(a, b, moments="mvsk"))
    # 5 standard errors: mean ~ N(mean, var/n); var(s^2) ~ var^2 (2/(n-1) + kurt/n).
    assert abs(draws.mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(draws.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (n - 1) + kurt / n)
    assert draws.min() >= 0.0 and draws.max() <= 1.0


def test_same_seed_gives_same_draws_and_the_stream_advances():
    a, b = posterior_like(1000)
    first = exploration.sample_beta_batch(a, b, np.random.default_rng(42))
    again = exploration.sample_beta_batch(a, b, np.random.default_rng(42))
    np.testing.assert_array_equal(first, again)
    rng = np.random.default_rng(42)
    exploration.sample_beta_batch(a, b, rng)
    assert not np.array_equal(exploration.sample_beta_batch(a, b, rng), first)


def test_draws_are_bit_identical_to_numpy_generator_beta():
    rs = np.random.default_rng(3)
    a = rs.uniform(0.05, 60.0, 2000)  # mixes every branch of numpy's random_beta
    b = rs.uniform(0.05, 600.0, 2000)
    ours = exploration.sample_beta_batch(a, b, np.random.default_rng(9))
    np.testing.assert_array_equal(ours, np.random.default_rng(9).beta(a, b))
    scalar = np.random.default_rng(9)
    np.testing.assert_array_equal(ours[:200], [scalar.beta(x, y) for x, y in zip(a[:200], b[:200])])


def test_kernel_leaves_generator_where_numpy_would():
    a, b = posterior_like(300)
    ours, ref = np.random.default_rng(5), np.random.default_rng(5)
    exploration.sample_beta_batch(a, b, ours)
    ref.beta(a, b)
    assert ours.random() == ref.random()


# --------------------------------------------------------------------------
# Draw-for-draw identity with numpy on every branch of its random_beta. The
# kernels redo numpy's Marsaglia-Tsang gamma (shape > 1) with its constants
# computed once per item and call numpy for everything else; any difference in
# the arithmetic or in the random numbers consumed shows up here.


def _log_uniform(rs, lo, hi, n):
    return np.exp(rs.uniform(np.log(lo), np.log(hi), n))


def _kappa_posteriors(rs, n):
    """The served shape: alpha = kappa p + s, beta = kappa (1 - p) + f, kappa = 100."""
    p = rs.uniform(0.01, 0.5, n)
    return 100 * p + rs.integers(0, 5, n), 100 * (1 - p) + rs.integers(0, 20, n)


BETA_FAMILIES = {
    # name: (alpha, beta) for n items
    "both<=1 (Johnk)": lambda rs, n: (rs.uniform(1e-3, 1.0, n), rs.uniform(1e-3, 1.0, n)),
    "a==1 or b==1": lambda rs, n: (
        rs.choice([1.0, 0.5, 2.0, 1.0 + 2**-52, 1.0 - 2**-53], n),
        rs.choice([1.0, 0.3, 7.0, 1.0 + 2**-52], n),
    ),
    "b<1<a": lambda rs, n: (rs.uniform(1.0, 50.0, n), rs.uniform(1e-3, 1.0, n)),
    "a<1<b": lambda rs, n: (rs.uniform(1e-3, 1.0, n), rs.uniform(1.0, 50.0, n)),
    "both>1": lambda rs, n: (_log_uniform(rs, 1.0, 1e5, n), _log_uniform(rs, 1.0, 1e5, n)),
    "kappa=100 posteriors": _kappa_posteriors,
    "just above 1": lambda rs, n: (1.0 + rs.uniform(0, 1e-6, n), 1.0 + rs.uniform(0, 1e-12, n)),
    "huge": lambda rs, n: (_log_uniform(rs, 1e6, 1.7e308, n), _log_uniform(rs, 1e6, 1.7e308, n)),
    "huge vs tiny": lambda rs, n: (_log_uniform(rs, 1e100, 1.7e308, n), _log_uniform(rs, 5e-324, 1.0, n)),
    "tiny": lambda rs, n: (_log_uniform(rs, 5e-324, 1.0, n), _log_uniform(rs, 5e-324, 1.0, n)),
    "tiny below 3e-103": lambda rs, n: (_log_uniform(rs, 5e-324, 3e-103, n), _log_uniform(rs, 5e-324, 3e-103, n)),
}


@pytest.mark.parametrize("family", list(BETA_FAMILIES))
@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937, np.random.SFC64])
def test_beta_draws_match_numpy_draw_for_draw(family, bit_generator):
    a, b = (np.asarray(x, dtype=np.float64) for x in BETA_FAMILIES[family](np.random.default_rng(17), 20_000))
    ours, ref = np.random.Generator(bit_generator(4)), np.random.Generator(bit_generator(4))
    out = np.empty(a.shape[0])
    _sampling.sample_beta_batch(ours, a, b, out)
    np.testing.assert_array_equal(out, ref.beta(a, b))  # NaN (inf / inf for huge shapes) matches NaN
    assert ours.integers(2**63) == ref.integers(2**63)  # and the same amount of the stream was used


def test_thompson_scores_match_numpy_draw_for_draw():
    a, b = _kappa_posteriors(np.random.default_rng(3), 5_000)
    w = np.random.default_rng(4).uniform(0.0, 2.0, 5_000)
    out = np.empty(5_000)
    _sampling.thompson_scores(np.random.default_rng(6), a, b, w, out)
    np.testing.assert_array_equal(out, np.random.default_rng(6).beta(a, b) * w)


def _top_k_counts(theta, k):
    """Brute force: per row, the k best by (score descending, index ascending)."""
    top = np.argsort(-theta, axis=1, kind="stable")[:, :k]
    return np.bincount(top.ravel(), minlength=theta.shape[1])


def _propensity_case(case, m, rs):
    if case == "kappa":
        a, b = _kappa_posteriors(rs, m)
        return a, b, rs.uniform(0.2, 1.0, m)
    if case == "some ties":
        a = np.where(rs.random(m) < 0.5, 1e-200, rs.uniform(0.5, 5.0, m))
        b = np.where(rs.random(m) < 0.5, 1e-200, rs.uniform(0.5, 5.0, m))
        return a, b, rs.choice([0.0, -0.0, 1.0, 0.5], m)
    # "all ties": Beta(1e-200, 1e-200) draws are exactly 0 or 1, so every score is 0, 0.5 or 1
    return np.full(m, 1e-200), np.full(m, 1e-200), rs.choice([0.0, -0.0, 1.0, 0.5], m)


@pytest.mark.parametrize("case", ["kappa", "some ties", "all ties"])
def test_propensities_are_the_exact_top_k_counts_of_numpys_draws(case):
    # Many rounds, so the threshold carried from round to round is exercised,
    # including exact ties at the k-th place (broken to the lower index);
    # small m makes every kind of boundary frequent, m > 64 needs several words of marks.
    rs = np.random.default_rng(12)
    for trial in range(200):
        m = int(rs.integers(2, 12)) if trial % 4 else int(rs.choice([50, 63, 64, 65, 130]))
        k = int(rs.integers(1, m))
        a, b, w = _propensity_case(case, m, rs)
        n_draws = 40
        got = np.empty(m)
        ours, ref = np.random.default_rng(trial), np.random.default_rng(trial)
        _sampling.thompson_topk_propensities(ours, a, b, w, k, n_draws, got)
        want = _top_k_counts(ref.beta(a, b, size=(n_draws, m)) * w, k) / n_draws
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}: m={m}, k={k}")
        assert ours.random() == ref.random()


# --------------------------------------------------------------------------
# Parity with the twins


@pytest.mark.parametrize("weighted", [False, True])
def test_thompson_scores_parity(weighted):
    a, b = posterior_like(100)
    w = np.random.default_rng(1).uniform(0, 1, 100) if weighted else None
    got, want = np.empty(100), np.empty(100)
    _sampling.thompson_scores(np.random.default_rng(8), a, b, w, got)
    twin.thompson_scores(np.random.default_rng(8), a, b, w, want)
    np.testing.assert_array_equal(got, want)


def test_sample_beta_batch_parity():
    a, b = posterior_like(500)
    got, want = np.empty(500), np.empty(500)
    _sampling.sample_beta_batch(np.random.default_rng(8), a, b, got)
    twin.sample_beta_batch(np.random.default_rng(8), a, b, want)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k", [0, 1, 5, 20, 99, 100, 150])
@pytest.mark.parametrize("weighted", [False, True])
def test_thompson_topk_propensities_parity(k, weighted):
    m = 100
    a, b = posterior_like(m, seed=k)
    w = np.exp(-np.random.default_rng(2).uniform(0, 2, m)) if weighted else None
    got, want = np.empty(m), np.empty(m)
    _sampling.thompson_topk_propensities(np.random.default_rng(11), a, b, w, k, 64, got)
    twin.thompson_topk_propensities(np.random.default_rng(11), a, b, w, k, 64, want)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == pytest.approx(min(k, m))
    assert got.min() >= 0.0 and got.max() <= 1.0


@IMPLS
def test_one_propensity_round_is_the_top_k_of_one_thompson_round(impl):
    # Ties included: zero weights make many scores exactly 0, broken to the lower index.
    m, k = 40, 12
    a, b = posterior_like(m)
    w = np.where(np.arange(m) % 3 == 0, 0.0, 1.0)
    for seed in range(20):
        scores = np.empty(m)
        impl.thompson_scores(np.random.default_rng(seed), a, b, w, scores)
        prop = np.empty(m)
        impl.thompson_topk_propensities(np.random.default_rng(seed), a, b, w, k, 1, prop)
        expected = np.zeros(m)
        expected[exploration.top_k_indices(scores, k)] = 1.0
        np.testing.assert_array_equal(prop, expected)


@IMPLS
@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_kernels_refuse_bad_parameters_instead_of_hanging(impl, bad):
    a, b = posterior_like(5)
    b[2] = bad
    msg = r"Beta parameters must be positive and finite; got alpha\[2\]=.*, beta\[2\]="
    out = np.empty(5)
    with pytest.raises(ValueError, match=msg):
        impl.sample_beta_batch(np.random.default_rng(0), a, b, out)
    with pytest.raises(ValueError, match=msg):
        impl.thompson_scores(np.random.default_rng(0), a, b, None, out)
    for k in (0, 2, 5):  # also when k makes drawing unnecessary
        with pytest.raises(ValueError, match=msg):
            impl.thompson_topk_propensities(np.random.default_rng(0), a, b, None, k, 10, out)


def test_kernel_rejects_a_non_generator():
    out = np.empty(2)
    with pytest.raises(TypeError, match="expected a numpy.random.Generator, got PCG64"):
        _sampling.sample_beta_batch(np.random.PCG64(0), np.ones(2), np.ones(2), out)


# --------------------------------------------------------------------------
# Public wrappers: validation


def test_sample_beta_batch_accepts_lists_and_fills_out():
    out = np.empty(3)
    res = exploration.sample_beta_batch([1, 2, 3], [4.0, 5.0, 6.0], np.random.default_rng(0), out=out)
    assert res is out and res.dtype == np.float64
    np.testing.assert_array_equal(out, np.random.default_rng(0).beta([1, 2, 3], [4, 5, 6]))


def test_sample_beta_batch_empty():
    assert exploration.sample_beta_batch([], [], np.random.default_rng(0)).shape == (0,)


@pytest.mark.parametrize(
    "alpha, beta, exc, msg",
    [
        (np.ones((2, 2)), np.ones((2, 2)), ValueError, r"alpha must be 1-D, got shape \(2, 2\)"),
        (np.ones(3), np.ones(2), ValueError, r"beta has length 2, expected 3"),
        ([1.0, -0.5], [1.0, 1.0], ValueError, r"alpha must be positive and finite, got alpha\[1\]=-0.5"),
        ([1.0, 1.0], [np.nan, 1.0], ValueError, r"beta must be positive and finite, got beta\[0\]=nan"),
        ([1.0, np.inf], [1.0, 1.0], ValueError, r"alpha must be positive and finite, got alpha\[1\]=inf"),
        ([1.0, 0.0], [1.0, 1.0], ValueError, r"alpha\[1\]=0.0"),
        (["a", "b"], [1.0, 1.0], TypeError, r"alpha must be a numeric array, got dtype <U1"),
    ],
)
def test_sample_beta_batch_validation(alpha, beta, exc, msg):
    with pytest.raises(exc, match=msg):
        exploration.sample_beta_batch(alpha, beta, np.random.default_rng(0))


def test_sample_beta_batch_rejects_legacy_random_state():
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator .*got RandomState"):
        exploration.sample_beta_batch([1.0], [1.0], np.random.RandomState(0))


@pytest.mark.parametrize(
    "out, msg",
    [
        (np.empty(3, dtype=np.float32), "out must be a 1-D float64 numpy array"),
        (np.empty(4), "out has length 4, expected 3"),
        (np.empty(6)[::2], "out must be C-contiguous and writeable"),
        ([0.0, 0.0, 0.0], "out must be a 1-D float64 numpy array"),
    ],
)
def test_sample_beta_batch_out_validation(out, msg):
    with pytest.raises(ValueError, match=msg):
        exploration.sample_beta_batch(np.ones(3), np.ones(3), np.random.default_rng(0), out=out)


def test_thompson_topk_propensities_public_wrapper():
    a, b = posterior_like(50)
    p = exploration.thompson_topk_propensities(a, b, 7, np.random.default_rng(0), n_draws=200)
    assert p.shape == (50,) and p.sum() == pytest.approx(7.0)
    # posterior means order the propensities, roughly: the best mean is likelier than the worst
    mean = a / (a + b)
    assert p[np.argmax(mean)] > p[np.argmin(mean)]


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"k": -1}, ValueError, "k must be >= 0, got -1"),
        ({"k": 2.5}, TypeError, "k must be an integer, got float"),
        ({"n_draws": 0}, ValueError, "n_draws must be >= 1, got 0"),
        ({"base_scores": [1.0, -1.0, 1.0]}, ValueError, r"base_scores must be >= 0 and finite, got base_scores\[1\]=-1.0"),
        ({"base_scores": [1.0, 1.0]}, ValueError, "base_scores has length 2, expected 3"),
    ],
)
def test_thompson_topk_propensities_validation(kwargs, exc, msg):
    args = {"k": 1, "n_draws": 10} | kwargs
    with pytest.raises(exc, match=msg):
        exploration.thompson_topk_propensities(np.ones(3), np.ones(3), rng=np.random.default_rng(0), **args)


def test_thompson_topk_propensities_refuses_out_aliasing_an_input():
    a = np.ones(4)
    with pytest.raises(ValueError, match="out must not share memory"):
        exploration.thompson_topk_propensities(a, np.ones(4), 2, np.random.default_rng(0), out=a)


@pytest.mark.parametrize("weighted", [False, True])
def test_thompson_score_draws_are_generator_beta_rounds(weighted):
    """D rounds in one call: Generator.beta over the tiled parameters, weighted, cast, with each round's min."""
    from recsvc._fastpath import _sampling

    rng = np.random.default_rng(3)
    m, d = 37, 9
    alpha = np.concatenate([rng.uniform(0.2, 1.0, 10), rng.uniform(1.0, 200.0, m - 10)])  # every branch
    beta = np.concatenate([rng.uniform(0.2, 1.0, 5), rng.uniform(1.0, 200.0, m - 5)])
    w = rng.uniform(0.1, 1.0, m) if weighted else None
    out, row_min = np.empty((d, m), np.float32), np.empty(d)
    _sampling.thompson_score_draws(np.random.default_rng(8), alpha, beta, w, out, row_min)
    ts = np.random.default_rng(8).beta(np.tile(alpha, d), np.tile(beta, d)).reshape(d, m)
    if weighted:
        ts *= w
    np.testing.assert_array_equal(out, ts.astype(np.float32))
    np.testing.assert_array_equal(row_min, ts.min(axis=1))
    with pytest.raises(ValueError, match="positive and finite"):
        _sampling.thompson_score_draws(np.random.default_rng(8), np.r_[alpha[:-1], np.nan], beta, w, out, row_min)


# --------------------------------------------------------------------------
# The request's Thompson round in one call (thompson_explore)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def thompson_rounds(draw):
    """Ranker scores (often tied, sometimes outside [0, 1] so the clip bites), evidence and a top M."""
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    rs = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["probabilities", "ties", "wide", "all equal"]))
    if kind == "probabilities":
        scores = rs.random(n)
    elif kind == "ties":
        scores = rs.choice([0.0, -0.0, 1e-5, 0.25, 0.5, 1.0], n)
    elif kind == "wide":
        scores = rs.normal(0.0, 3.0, n)
    else:
        scores = np.full(n, 0.3)
    succ = rs.integers(0, 6, n) * draw(st.sampled_from([1.0, 0.37]))
    fail = rs.integers(0, 40, n) * draw(st.sampled_from([1.0, 0.91]))
    return (scores.astype(np.float32), succ.astype(np.float64), fail.astype(np.float64),
            draw(st.sampled_from([0.5, 1.0, 10.0, 100.0])), draw(st.integers(1, n)), seed)


def _explore_round(impl, gen, scores, succ, fail, kappa, m):
    n = scores.shape[0]
    out = {name: np.empty(n) for name in ("alpha", "beta", "pulls", "base")}
    out["top"], out["theta"], out["adjusted"] = np.empty(m, np.intp), np.empty(m), np.empty(n, np.float32)
    out["order"], out["rest_order"] = np.empty(n, np.intp), np.empty(n - max(0, min(m, n)), np.intp)
    impl.thompson_explore(gen, scores, succ, fail, kappa, out["alpha"], out["beta"], out["pulls"], out["top"],
                          out["theta"], out["adjusted"], out["base"], out["order"], out["rest_order"])
    return out


@settings(max_examples=200, deadline=None)
@given(case=thompson_rounds())
def test_thompson_explore_parity(case):
    scores, succ, fail, kappa, m, seed = case
    ours, ref = np.random.default_rng(seed), np.random.default_rng(seed)
    got = _explore_round(_sampling, ours, scores, succ, fail, kappa, m)
    want = _explore_round(twin, ref, scores, succ, fail, kappa, m)
    for name in got:  # bit for bit (views, so -0.0 and NaN patterns count too)
        assert got[name].tobytes() == want[name].tobytes(), name
    assert ours.integers(2**63) == ref.integers(2**63)  # the same amount of the stream used


@settings(max_examples=100, deadline=None)
@given(case=thompson_rounds())
def test_explore_with_prior_is_the_policy_round_on_the_numpy_prior(case):
    # what the request path did before the kernel: the prior in numpy, then ThompsonPolicy.explore
    scores, succ, fail, kappa, m, seed = case
    policy = exploration.ThompsonPolicy(top_m=m, temperature=None)
    ours, ref = np.random.default_rng(seed), np.random.default_rng(seed)
    explored, alpha, beta, pulls = exploration.explore_with_prior(policy, scores, succ, fail, kappa, 7.0, 3, ours)
    p = np.clip(scores.astype(np.float64), 1e-4, 1.0 - 1e-4)
    a, b = kappa * p + succ, kappa * (1.0 - p) + fail
    want = policy.explore(scores, a, b, succ + fail, 7.0, 3, ref, with_propensity=False)
    assert explored.scores.tobytes() == want.scores.tobytes()
    np.testing.assert_array_equal(explored.layout.order, np.argsort(-want.scores, kind="stable"))
    assert alpha.tobytes() == a.tobytes() and beta.tobytes() == b.tobytes()
    assert pulls.tobytes() == (succ + fail).tobytes()
    # the draws for the final slate's propensities reuse the round's top M: the same draws as without it
    d_ours = policy.draw_scores(scores, alpha, beta, pulls, 7.0, 3, ours, 5, served=explored)
    d_ref = policy.draw_scores(scores, a, b, succ + fail, 7.0, 3, ref, 5)
    assert d_ours.dense().tobytes() == d_ref.dense().tobytes()
    assert ours.random() == ref.random()


def test_explore_with_prior_takes_the_numpy_steps_for_other_policies_and_dtypes():
    scores = np.linspace(0.9, 0.1, 30)
    succ, fail = np.zeros(30), np.ones(30)
    for policy, s in [(exploration.GreedyPolicy(), scores.astype(np.float32)),
                      (exploration.ThompsonPolicy(top_m=10, temperature=1.0), scores.astype(np.float32)),
                      (exploration.ThompsonPolicy(top_m=10, temperature=None), scores)]:  # float64 scores
        explored, alpha, beta, _ = exploration.explore_with_prior(policy, s, succ, fail, 10.0, 0.0, 5,
                                                                  np.random.default_rng(1))
        assert explored.layout is None
        p = np.clip(s.astype(np.float64), 1e-4, 1.0 - 1e-4)
        np.testing.assert_array_equal(alpha, 10.0 * p + succ)
        want = policy.explore(s, alpha, beta, succ + fail, 0.0, 5, np.random.default_rng(1), with_propensity=False)
        np.testing.assert_array_equal(explored.scores, want.scores)


@pytest.mark.parametrize("impl", [_sampling, twin], ids=["compiled", "twin"])
@pytest.mark.parametrize("bad, msg", [
    ({"score": np.nan}, "scores must be finite"),
    ({"score": np.inf}, "scores must be finite"),
    ({"succ": -50.0}, r"Beta parameters must be positive and finite; got alpha\[3\]"),
    ({"fail": np.inf}, r"Beta parameters must be positive and finite; got alpha\[3\]=.*, beta\[3\]=inf"),
])
def test_thompson_explore_refuses_bad_inputs_and_draws_nothing(impl, bad, msg):
    scores, succ, fail = np.full(6, 0.5, np.float32), np.zeros(6), np.zeros(6)
    scores[3] = bad.get("score", 0.5)
    succ[3], fail[3] = bad.get("succ", 0.0), bad.get("fail", 0.0)
    gen = np.random.default_rng(0)
    with pytest.raises(ValueError, match=msg):
        _explore_round(impl, gen, scores, succ, fail, 10.0, 3)
    assert gen.random() == np.random.default_rng(0).random()


def test_thompson_explore_rejects_disagreeing_shapes():
    with pytest.raises(ValueError, match="thompson_explore: the arrays disagree in shape"):
        _explore_round(_sampling, np.random.default_rng(0), np.zeros(4, np.float32), np.zeros(4), np.zeros(4),
                       1.0, 5)
