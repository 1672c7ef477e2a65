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


#: Compiled benchmark -> its numpy twin in the same group; the run fails if the compiled one is slower
#: (benchmarks/conftest.py, "the gate").
KERNEL_TWINS = [
    (test_beta_compiled_kernel, test_beta_numpy_generator),
    (test_beta_public_wrapper, test_beta_numpy_generator),
    (test_propensities_compiled, test_propensities_numpy_twin),
]
