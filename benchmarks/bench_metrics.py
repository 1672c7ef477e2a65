"""Offline ranking metrics: vectorised numpy vs a per-user Python loop, same inputs, same group.

Run:  pytest benchmarks/bench_metrics.py --benchmark-only
Quick mode for CI (1,000 users):  RECSVC_BENCH_QUICK=1 pytest benchmarks/bench_metrics.py --benchmark-only

Both sides start from the same raw inputs (ranked lists and relevant sets) so the vectorised side includes
building the hit matrix with ``relevance_matrix``; setup (data generation, CSR and Python sets) is in
fixtures and not timed. A third entry per group times the metric alone on a prebuilt hit matrix — the
cost of each further metric once ``hits`` is built (an evaluation usually computes several).
"""

import math
import os

import numpy as np
import pytest

from recsvc.evaluation.metrics import RelevantSets, hit_rate_at_k, map_at_k, ndcg_at_k, relevance_matrix

N_USERS = 1_000 if os.environ.get("RECSVC_BENCH_QUICK") else 10_000
K = 20
N_ITEMS = 5_000


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8  # Zipf-like, so lists and relevant sets overlap
    popularity /= popularity.sum()
    recommended = np.stack([rng.choice(N_ITEMS, K, replace=False, p=popularity) for _ in range(N_USERS)])
    recommended[rng.random(N_USERS) < 0.1, K - 5 :] = -1  # some short lists, padded
    relevant = [rng.choice(N_ITEMS, rng.integers(0, 30), replace=False, p=popularity) for _ in range(N_USERS)]
    sets = RelevantSets.from_lists(relevant)
    return {
        "recommended": recommended,
        "hits": relevance_matrix(recommended, sets),
        "sets": sets,
        "py_lists": recommended.tolist(),
        "py_sets": [set(r.tolist()) for r in relevant],
    }


# ---- per-user loop baseline ---------------------------------------------------------------------------
_DISCOUNT = [1.0 / math.log2(r + 2) for r in range(K)]


def _hits(row, rel):
    seen, out = set(), []
    for item in row:
        out.append(item >= 0 and item in rel and item not in seen)
        seen.add(item)
    return out


def loop_ndcg(lists, sets):
    out = []
    for row, rel in zip(lists, sets):
        if not rel:
            out.append(math.nan)
            continue
        dcg = sum(d for d, h in zip(_DISCOUNT, _hits(row, rel)) if h)
        out.append(dcg / sum(_DISCOUNT[: min(len(rel), K)]))
    return out


def loop_map(lists, sets):
    out = []
    for row, rel in zip(lists, sets):
        if not rel:
            out.append(math.nan)
            continue
        n_hit, ap = 0, 0.0
        for r, h in enumerate(_hits(row, rel)):
            if h:
                n_hit += 1
                ap += n_hit / (r + 1)
        out.append(ap / min(len(rel), K))
    return out


def loop_hit_rate(lists, sets):
    return [math.nan if not rel else float(any(_hits(row, rel))) for row, rel in zip(lists, sets)]


# ---- vectorised -----------------------------------------------------------------------------------------


def vectorised(metric, data):
    hits = relevance_matrix(data["recommended"], data["sets"])
    return metric(hits, data["sets"].n_relevant)


CASES = [
    pytest.param(metric, loop, id=group, marks=pytest.mark.benchmark(group=group))
    for group, metric, loop in [
        ("ndcg@20", ndcg_at_k, loop_ndcg),
        ("map@20", map_at_k, loop_map),
        ("hit_rate@20", hit_rate_at_k, loop_hit_rate),
    ]
]


@pytest.mark.parametrize("metric,loop", CASES)
def test_vectorised(benchmark, data, metric, loop):
    out = benchmark(vectorised, metric, data)
    np.testing.assert_allclose(out, loop(data["py_lists"], data["py_sets"]), equal_nan=True)


@pytest.mark.parametrize("metric,loop", CASES)
def test_python_loop(benchmark, data, metric, loop):
    benchmark(loop, data["py_lists"], data["py_sets"])


@pytest.mark.parametrize("metric,loop", CASES)
def test_vectorised_given_hits(benchmark, data, metric, loop):
    benchmark(metric, data["hits"], data["sets"].n_relevant)


#: Vectorised metric -> the per-user Python loop, per metric (same parameter id); the run fails if the
#: vectorised one is slower (benchmarks/conftest.py, "the gate").
KERNEL_TWINS = [(test_vectorised, test_python_loop)]
