"""Exploration benchmarks: compiled kernels next to their numpy baselines.

    pytest benchmarks/bench_exploration.py --benchmark-only
    pytest benchmarks/bench_exploration.py --benchmark-disable   # quick mode (CI): each body once

Groups (each report shows the ratio within a group):
  beta-1000               1000 Beta draws: compiled kernel, its validating public wrapper,
                          numpy ``Generator.beta`` on the same arrays, a per-item Python loop.
  thompson-propensities   the served defaults (M = top_m = 50 candidates, k=20, propensity_draws =
                          128 rounds): compiled vs numpy twin, the compiled kernel on kappa=100
                          posteriors (alpha = 100 p + s, beta = 100 (1 - p) + f), and the compiled
                          kernel at M=100 with 256 rounds.
  policy-explore          ``policy.explore`` for n=1000 ranked candidates, k=20, each policy.
  thompson-round-1000     the request's exploration round with its Beta prior (``explore_with_prior``, the
                          served Thompson policy, n=1000): one compiled call beside the numpy steps (its twin).
  slate-inclusion-*       the final slate's propensity rounds re-ranked (quota 3, or MMR 0.3), 1000 pool
                          items, 32 rounds: the compiled kernel beside its Python twin.

Inputs look like real bandit state: alpha = 1 + clicks, beta = 20 + non-clicks.
"""

import numpy as np
import pytest

from recsvc import exploration
from recsvc._fastpath import _sampling
from recsvc._fastpath.twins import sampling as twin

from recsvc.config import Config

# The served configuration: Thompson over the ranker's top M with this many
# Monte-Carlo rounds for the propensities of a 20-item slate.
_E = Config().exploration
M, K, DRAWS = _E.top_m, 20, _E.propensity_draws


def posterior_like(n, seed=0):
    rs = np.random.default_rng(seed)
    shows = rs.integers(0, 400, n)
    clicks = rs.binomial(shows, rs.uniform(0.01, 0.2, n))
    return (1.0 + clicks).astype(np.float64), (20.0 + shows - clicks).astype(np.float64), shows.astype(np.float64)


@pytest.fixture(scope="module")
def state_1000():
    return posterior_like(1000)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# --------------------------------------------------------------------------
# beta-1000


@pytest.mark.benchmark(group="beta-1000")
def test_beta_compiled_kernel(benchmark, state_1000, rng):
    a, b, _ = state_1000
    out = np.empty_like(a)
    benchmark(_sampling.sample_beta_batch, rng, a, b, out)


@pytest.mark.benchmark(group="beta-1000")
def test_beta_public_wrapper(benchmark, state_1000, rng):
    a, b, _ = state_1000
    out = np.empty_like(a)
    benchmark(exploration.sample_beta_batch, a, b, rng, out)


@pytest.mark.benchmark(group="beta-1000")
def test_beta_numpy_generator(benchmark, state_1000, rng):
    a, b, _ = state_1000
    benchmark(rng.beta, a, b)


@pytest.mark.benchmark(group="beta-1000")
def test_beta_python_loop(benchmark, state_1000, rng):
    a, b, _ = state_1000
    pairs = list(zip(a.tolist(), b.tolist()))
    draw = rng.beta

    def loop():
        return [draw(x, y) for x, y in pairs]

    benchmark(loop)


# --------------------------------------------------------------------------
# thompson-propensities


@pytest.fixture(scope="module")
def slate_state():
    a, b, _ = posterior_like(M, seed=1)
    weights = np.exp(-np.random.default_rng(2).uniform(0.0, 2.0, M))
    return a, b, weights


@pytest.mark.benchmark(group="thompson-propensities")
def test_propensities_compiled(benchmark, slate_state, rng):
    a, b, w = slate_state
    out = np.empty(M)
    benchmark(_sampling.thompson_topk_propensities, rng, a, b, w, K, DRAWS, out)


@pytest.mark.benchmark(group="thompson-propensities")
def test_propensities_numpy_twin(benchmark, slate_state, rng):
    a, b, w = slate_state
    out = np.empty(M)
    benchmark(twin.thompson_topk_propensities, rng, a, b, w, K, DRAWS, out)


@pytest.mark.benchmark(group="thompson-propensities")
def test_propensities_compiled_kappa_prior(benchmark, rng):
    """Posteriors of a kappa=100 prior around p in (0.01, 0.5): both shapes well above 1."""
    rs = np.random.default_rng(4)
    p = rs.uniform(0.01, 0.5, M)
    a, b = 100.0 * p + rs.integers(0, 5, M), 100.0 * (1.0 - p) + rs.integers(0, 20, M)
    w = np.exp(-np.random.default_rng(2).uniform(0.0, 2.0, M))
    out = np.empty(M)
    benchmark(_sampling.thompson_topk_propensities, rng, a, b, w, K, DRAWS, out)


@pytest.mark.benchmark(group="thompson-propensities")
def test_propensities_compiled_m100_256_draws(benchmark, rng):
    """The more accurate setting (M=100, 256 rounds), for comparison."""
    a, b, _ = posterior_like(100, seed=1)
    w = np.exp(-np.random.default_rng(2).uniform(0.0, 2.0, 100))
    out = np.empty(100)
    benchmark(_sampling.thompson_topk_propensities, rng, a, b, w, K, 256, out)


# --------------------------------------------------------------------------
# policy-explore


@pytest.mark.benchmark(group="policy-explore")
@pytest.mark.parametrize("name", ["greedy", "epsilon_greedy", "ucb1", "thompson"])
def test_policy_explore(benchmark, name, state_1000, rng):
    a, b, pulls = state_1000
    scores = np.random.default_rng(3).normal(size=a.shape[0]).astype(np.float32)
    params = {"thompson": {"top_m": M, "n_propensity_draws": DRAWS, "temperature": None},
              "epsilon_greedy": {"epsilon": _E.epsilon, "top_m": M},
              "ucb1": {"c": _E.ucb_c, "top_m": M, "temperature": None}}.get(name, {})
    policy = exploration.make_policy(name, **params)
    benchmark(policy.explore, scores, a, b, pulls, float(pulls.sum()), K, rng)


# --------------------------------------------------------------------------
# final-slate inclusion counts (the re-ranked Monte-Carlo rounds of the served slate's propensities)

INCLUSION_DRAWS = 32  # the twin walks the whole pool in Python per round: fewer rounds keep it affordable


@pytest.fixture(scope="module", params=["quota", "mmr"])
def inclusion_inputs(request):
    """A request like the served default: ~1000 pool items over 24 categories, 60% in the user's own one (the
    quota walk must go deep), Thompson's top M = 50 drawn per round, a 20-item slate; quota 3, or MMR 0.3."""
    from recsvc.reranking import SelectionPlan

    rs = np.random.default_rng(7)
    p, C = 1000, 24
    cats = np.where(rs.random(p) < 0.6, 3, rs.integers(0, C, p)).astype(np.int32)
    lam = 0.3 if request.param == "mmr" else 0.0
    sim = np.zeros((0, 0), np.float32)
    if lam:
        emb = rs.normal(size=(p, 32)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        sim = emb @ emb.T
    plan = SelectionPlan(np.ones(p, bool), {}, K, np.zeros(p, np.float32), cats, np.zeros(C, np.int32), 3, lam,
                         sim, np.full(p, -np.inf, np.float32))
    top_pool = np.arange(M, dtype=np.int32)  # the ranker's top M, drawn; the rest keep their order
    top_scores = rs.beta(5.0, 95.0, (INCLUSION_DRAWS, M)).astype(np.float32)
    base = np.r_[np.zeros(M), -1.0 - np.sort(rs.random(p - M))[::-1]]
    return request.param, (top_scores, top_pool, top_pool, base, top_scores.min(axis=1).astype(np.float64), plan)


@pytest.mark.benchmark(group="slate-inclusion")
def test_inclusion_compiled(benchmark, inclusion_inputs):
    from recsvc.reranking import slate_inclusion_counts

    name, args = inclusion_inputs
    benchmark.group = f"slate-inclusion-{name}"
    hits = benchmark(slate_inclusion_counts, *args)
    assert hits.sum() == INCLUSION_DRAWS * K


@pytest.mark.benchmark(group="slate-inclusion")
def test_inclusion_numpy_twin(benchmark, inclusion_inputs):
    from recsvc.reranking import slate_inclusion_counts

    name, args = inclusion_inputs
    benchmark.group = f"slate-inclusion-{name}"
    hits = benchmark.pedantic(slate_inclusion_counts, args, {"use_native": False}, rounds=3, iterations=1)
    assert hits.sum() == INCLUSION_DRAWS * K


# --------------------------------------------------------------------------
# thompson-round: the request's exploration round with its Beta prior (explore_with_prior), n = 1000


@pytest.fixture(scope="module")
def round_inputs():
    rs = np.random.default_rng(5)
    n = 1000
    scores = rs.beta(2.0, 30.0, n).astype(np.float32)  # the ranker's click probabilities
    shows = rs.integers(0, 40, n)
    clicks = rs.binomial(shows, 0.05)
    return scores, clicks.astype(np.float64), (shows - clicks).astype(np.float64)


@pytest.mark.benchmark(group="thompson-round-1000")
def test_thompson_round_compiled(benchmark, round_inputs, rng):
    """``explore_with_prior`` for the served Thompson policy: one compiled call (prior, top M, the draws)."""
    policy = exploration.ThompsonPolicy(top_m=M, n_propensity_draws=DRAWS, temperature=None)
    scores, succ, fail = round_inputs
    benchmark(exploration.explore_with_prior, policy, scores, succ, fail, _E.prior_strength, 0.0, K, rng)


@pytest.mark.benchmark(group="thompson-round-1000")
def test_thompson_round_numpy_twin(benchmark, round_inputs, rng):
    """The same round by the numpy steps the kernel replaces (its twin)."""
    policy = exploration.ThompsonPolicy(top_m=M, n_propensity_draws=DRAWS, temperature=None)
    scores, succ, fail = round_inputs
    benchmark(exploration.explore_with_prior, policy, scores, succ, fail, _E.prior_strength, 0.0, K, rng,
              use_native=False)


#: Compiled benchmark -> its numpy twin in the same group; the run fails if the compiled one is slower
#: (benchmarks/conftest.py, "the gate").
KERNEL_TWINS = [
    (test_beta_compiled_kernel, test_beta_numpy_generator),
    (test_beta_public_wrapper, test_beta_numpy_generator),
    (test_propensities_compiled, test_propensities_numpy_twin),
    (test_inclusion_compiled, test_inclusion_numpy_twin),
    (test_thompson_round_compiled, test_thompson_round_numpy_twin),
]
