"""Ranking (1000 candidates) and re-ranking (1000 -> 20) benchmarks.

Each group holds the compiled path, the same public call on the numpy twins
(``use_native=False``), and a textbook per-candidate Python loop, so every
report shows both ratios::

    pytest benchmarks/bench_ranking.py --benchmark-only
    RECSVC_BENCH_QUICK=1 pytest benchmarks/bench_ranking.py --benchmark-only   # CI: loops run once

Targets (2-core machine): gather + score of 1000 candidates <= 0.5 ms; re-ranking
1000 -> 20 with MMR at d = 64 <= 0.5 ms. The learned ranker's group
(``ranking-gbdt-extended-1000``) gathers every extended feature (co-occurrence with
20 recent items of 200 neighbours each, similarity to the 5 most recent) and scores
LambdaRank trees of the size ``recsvc.training.GBDT_PARAMS`` / ``GBDT_ROUNDS`` give.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from recsvc.config import RerankingConfig
from dataclasses import replace

from recsvc.ranking import ALL_FEATURES, DEVICE_VOCABULARY, ExtendedInputs, FeatureInputs, Forest, Ranker, freshness
from recsvc.reranking import rerank
from recsvc.retrieval.candidates import SOURCE_NAMES

QUICK = os.environ.get("RECSVC_BENCH_QUICK", "") not in ("", "0")
LOOP_ROUNDS = 1 if QUICK else 5
N_ITEMS, DIM, N_CANDIDATES, N_CATEGORIES, K = 100_000, 64, 1000, 24, 20
NOW_MS = 1_750_000_000_000
DAY_MS = 86_400_000
HALF_LIFE = 14.0


def loop(benchmark, fn, *args):
    """The slow Python baselines: a few fixed rounds instead of calibration."""
    return benchmark.pedantic(fn, args=args, rounds=LOOP_ROUNDS, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(2026)
    emb = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return dict(
        embeddings=emb,
        log_popularity=np.log1p(rng.gamma(0.5, 20.0, N_ITEMS)).astype(np.float32),
        created_at_ms=(NOW_MS - rng.integers(0, 365 * DAY_MS, N_ITEMS)).astype(np.int64),
        categories=rng.integers(0, N_CATEGORIES, N_ITEMS).astype(np.int32),
        maturity=rng.choice(np.array([0, 7, 13, 18, 21], np.int32), N_ITEMS),
        popularity_percentile=rng.random(N_ITEMS).astype(np.float32),
        bandit_alpha=1.0 + rng.poisson(2.0, N_ITEMS).astype(np.float64),
        bandit_beta=20.0 + rng.poisson(40.0, N_ITEMS).astype(np.float64),
    )


@pytest.fixture(scope="module")
def inputs(catalog) -> FeatureInputs:
    rng = np.random.default_rng(7)
    n, S = N_CANDIDATES, len(SOURCE_NAMES)
    user = catalog["embeddings"][rng.integers(N_ITEMS)] + 0.5 * rng.normal(size=DIM).astype(np.float32)
    user /= np.linalg.norm(user)
    mask = rng.integers(1, 1 << S, n).astype(np.uint8)
    scores = rng.random((n, S)).astype(np.float32) * ((mask[:, None] >> np.arange(S)) & 1)
    return FeatureInputs(
        user_vec=user.astype(np.float32),
        embeddings=catalog["embeddings"],
        rows=rng.choice(N_ITEMS, n, replace=False).astype(np.int32),
        log_popularity=catalog["log_popularity"],
        created_at_ms=catalog["created_at_ms"],
        now_ms=NOW_MS,
        categories=catalog["categories"],
        category_affinity=rng.dirichlet(np.ones(N_CATEGORIES)).astype(np.float32),
        bandit_alpha=catalog["bandit_alpha"],
        bandit_beta=catalog["bandit_beta"],
        source_scores=scores,
        context={"device": "mobile", "hour": "20:30"},
        sources=mask,
    )


@pytest.fixture(scope="module")
def inputs_by_candidate(inputs) -> FeatureInputs:
    """The same request in the request path's layout: popularity and bandit evidence read for the candidates
    (in candidate order), the catalog's columns read at the candidates' rows."""
    rows = inputs.rows
    return replace(inputs, log_popularity=inputs.log_popularity[rows], bandit_alpha=inputs.bandit_alpha[rows],
                   bandit_beta=inputs.bandit_beta[rows], by_candidate=True)


@pytest.fixture(scope="module")
def logistic() -> Ranker:
    return Ranker.default()


@pytest.fixture(scope="module")
def mlp() -> Ranker:
    rng = np.random.default_rng(3)
    F = len(Ranker.default().feature_names)
    sizes = (F, 32, 32, 1)
    layers = [(rng.normal(0, 1 / math.sqrt(a), (a, b)), rng.normal(0, 0.1, b)) for a, b in zip(sizes[:-1], sizes[1:])]
    return Ranker("mlp", layers)


@pytest.fixture(scope="module")
def extended_inputs(inputs) -> FeatureInputs:
    """The same request with what the extended features need: 20 recent items, 200 neighbours each."""
    rng = np.random.default_rng(11)
    n, W, per = N_CANDIDATES, 20, 200
    nb = np.where(rng.random(W * per) < 0.3, rng.choice(inputs.rows, W * per), rng.integers(0, N_ITEMS, W * per))
    return replace(inputs, extended=ExtendedInputs(
        item_rows=inputs.rows,
        item_counts=rng.gamma(0.5, 40.0, n).astype(np.float32),
        recent_weights=(0.5 ** (np.arange(W) / 10)).astype(np.float32),
        recent_counts=rng.gamma(0.5, 40.0, W).astype(np.float32),
        neighbour_rows=nb.astype(np.int32),
        neighbour_counts=rng.integers(1, 20, W * per).astype(np.float32),
        neighbour_owner=np.repeat(np.arange(W), per).astype(np.int32),
        recent_embeddings=inputs.embeddings[rng.integers(0, N_ITEMS, 5)],
        user_interactions=57.0,
        profile=inputs.embeddings[rng.integers(0, N_ITEMS, 20)].sum(axis=0),
    ))


@pytest.fixture(scope="module")
def gbdt() -> Ranker:
    """Trees of the trained size: GBDT_ROUNDS trees, complete to depth 5 (max_depth), over ALL_FEATURES."""
    from recsvc.training import GBDT_PARAMS, GBDT_ROUNDS

    rng = np.random.default_rng(5)
    depth, F = GBDT_PARAMS["max_depth"], len(ALL_FEATURES)
    inner = (1 << depth) - 1
    forest = Forest.validated(depth, rng.integers(0, F, (GBDT_ROUNDS, inner)), rng.normal(size=(GBDT_ROUNDS, inner)),
                              rng.normal(0, 0.1, (GBDT_ROUNDS, inner + 1)), -3.0, F)
    return Ranker("gbdt", forest, feature_names=ALL_FEATURES)


@pytest.fixture(scope="module")
def ranked(inputs, logistic):
    scores = logistic.score(inputs, HALF_LIFE)
    order = np.argsort(-scores, kind="stable")
    return inputs.rows[order].copy(), scores[order].copy()


@pytest.fixture(scope="module")
def rerank_kwargs(catalog) -> dict:
    return dict(
        embeddings=catalog["embeddings"],
        categories=catalog["categories"],
        maturity=catalog["maturity"],
        created_at_ms=catalog["created_at_ms"],
        now_ms=NOW_MS,
        popularity_percentile=catalog["popularity_percentile"],
        row_of=lambda item_id: None,
        eligible=lambda row: True,
        max_maturity=18,
        freshness_half_life_days=HALF_LIFE,
    )


QUOTAS = RerankingConfig(max_per_category=3)
MMR = RerankingConfig(max_per_category=3, mmr_lambda=0.3, freshness_boost=0.05, long_tail_boost=0.05)


# --------------------------------------------------------------------------
# textbook per-candidate loops


def loop_features(inp: FeatureInputs, half_life: float) -> list[list[float]]:
    ctx = [0.0] * (len(DEVICE_VOCABULARY) + 2)
    device = inp.context.get("device", "")
    if device in DEVICE_VOCABULARY:
        ctx[DEVICE_VOCABULARY.index(device)] = 1.0
    hh, mm = inp.context["hour"].split(":")
    angle = 2 * math.pi * (int(hh) + int(mm) / 60) / 24
    ctx[-2:] = [math.sin(angle), math.cos(angle)]
    rows = []
    for i, row in enumerate(inp.rows.tolist()):
        emb = inp.embeddings[row]
        sim = float(sum(float(u) * float(e) for u, e in zip(inp.user_vec, emb)))
        age_days = max(0, inp.now_ms - int(inp.created_at_ms[row])) / DAY_MS
        fresh = math.exp(-math.log(2) * age_days / half_life)
        c = int(inp.categories[row])
        aff = float(inp.category_affinity[c]) if 0 <= c < len(inp.category_affinity) else 0.0
        a, b = float(inp.bandit_alpha[row]), float(inp.bandit_beta[row])
        scores = [float(s) for s in inp.source_scores[i]]
        flags = [float(int(inp.sources[i]) >> s & 1) for s in range(len(SOURCE_NAMES))]
        rows.append([sim, float(inp.log_popularity[row]), fresh, aff, a / (a + b), *scores, *flags, *ctx])
    return rows


def loop_logistic(ranker: Ranker, inp: FeatureInputs) -> list[float]:
    w = ranker.layers[0][0][:, 0].tolist()
    b = float(ranker.layers[0][1][0])
    out = []
    for x in loop_features(inp, HALF_LIFE):
        z = b + sum(wi * xi for wi, xi in zip(w, x))
        out.append(1 / (1 + math.exp(-z)))
    return out


def loop_mlp(ranker: Ranker, inp: FeatureInputs) -> list[float]:
    layers = ranker.layers
    out = []
    for x in loop_features(inp, HALF_LIFE):
        h = np.asarray(x, np.float32)
        for W, b in layers[:-1]:
            h = np.maximum(h @ W + b, 0)
        z = float(h @ layers[-1][0][:, 0] + layers[-1][1][0])
        out.append(1 / (1 + math.exp(-z)))
    return out


def loop_rerank(rows, scores, k, rules, catalog) -> list[int]:
    ceiling = min(rules.max_maturity, 18)
    fresh = freshness(catalog["created_at_ms"][rows], NOW_MS, HALF_LIFE)
    pool = []
    for i, row in enumerate(rows.tolist()):
        if catalog["maturity"][row] > ceiling:
            continue
        s = float(scores[i]) + rules.freshness_boost * float(fresh[i])
        s += rules.long_tail_boost * (1.0 - float(catalog["popularity_percentile"][row]))
        pool.append((s, row))
    pool.sort(key=lambda t: -t[0])
    counts: dict[int, int] = {}
    chosen: list[int] = []
    emb = catalog["embeddings"]
    while len(chosen) < k:
        best, best_val = None, -math.inf
        for s, row in pool:
            if row in chosen or counts.get(int(catalog["categories"][row]), 0) >= rules.max_per_category:
                continue
            if rules.mmr_lambda > 0:
                sim = max((float(np.dot(emb[row], emb[c])) for c in chosen), default=0.0)
                val = (1 - rules.mmr_lambda) * s - rules.mmr_lambda * sim
            else:
                val = s
            if val > best_val:
                best, best_val = row, val
            if rules.mmr_lambda == 0:
                break  # pool is sorted: the first available is the best
        if best is None:
            break
        chosen.append(best)
        c = int(catalog["categories"][best])
        counts[c] = counts.get(c, 0) + 1
    return chosen


# --------------------------------------------------------------------------
# ranking: gather + model over 1000 candidates


#: the catalog's arrays by row, or the request path's layout (popularity and evidence by candidate)
LAYOUTS = ["by_row", "by_candidate"]


@pytest.mark.benchmark(group="ranking-logistic-1000")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_logistic_compiled(benchmark, logistic, inputs, inputs_by_candidate, layout):
    inp = inputs_by_candidate if layout == "by_candidate" else inputs
    benchmark(logistic.score, inp, HALF_LIFE)


@pytest.mark.benchmark(group="ranking-logistic-1000")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_logistic_numpy_twin(benchmark, logistic, inputs, inputs_by_candidate, layout):
    inp = inputs_by_candidate if layout == "by_candidate" else inputs
    benchmark(lambda: logistic.score(inp, HALF_LIFE, use_native=False))


@pytest.mark.benchmark(group="ranking-logistic-1000")
def test_rank_logistic_python_loop(benchmark, logistic, inputs):
    got = loop(benchmark, loop_logistic, logistic, inputs)
    np.testing.assert_allclose(got, logistic.score(inputs, HALF_LIFE), rtol=1e-4, atol=1e-6)


@pytest.mark.benchmark(group="ranking-mlp32x32-1000")
def test_rank_mlp_compiled(benchmark, mlp, inputs):
    benchmark(mlp.score, inputs, HALF_LIFE)


@pytest.mark.benchmark(group="ranking-mlp32x32-1000")
def test_rank_mlp_numpy_twin(benchmark, mlp, inputs):
    benchmark(lambda: mlp.score(inputs, HALF_LIFE, use_native=False))


@pytest.mark.benchmark(group="ranking-mlp32x32-1000")
def test_rank_mlp_python_loop(benchmark, mlp, inputs):
    got = loop(benchmark, loop_mlp, mlp, inputs)
    np.testing.assert_allclose(got, mlp.score(inputs, HALF_LIFE), rtol=1e-4, atol=1e-6)


@pytest.mark.benchmark(group="ranking-gbdt-extended-1000")
def test_rank_gbdt_extended_compiled(benchmark, gbdt, extended_inputs):
    benchmark(gbdt.score, extended_inputs, HALF_LIFE)


@pytest.mark.benchmark(group="ranking-gbdt-extended-1000")
def test_rank_gbdt_extended_numpy_twin(benchmark, gbdt, extended_inputs):
    got = benchmark(lambda: gbdt.score(extended_inputs, HALF_LIFE, use_native=False))
    np.testing.assert_allclose(got, gbdt.score(extended_inputs, HALF_LIFE), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# re-ranking: 1000 -> 20


@pytest.mark.benchmark(group="rerank-quotas-1000to20")
def test_rerank_quotas_compiled(benchmark, ranked, catalog, rerank_kwargs):
    rows, scores = ranked
    benchmark(lambda: rerank(rows, scores, K, QUOTAS, **rerank_kwargs))


@pytest.mark.benchmark(group="rerank-quotas-1000to20")
def test_rerank_quotas_numpy_twin(benchmark, ranked, catalog, rerank_kwargs):
    rows, scores = ranked
    benchmark(lambda: rerank(rows, scores, K, QUOTAS, **rerank_kwargs, use_native=False))


@pytest.mark.benchmark(group="rerank-quotas-1000to20")
def test_rerank_quotas_python_loop(benchmark, ranked, catalog, rerank_kwargs):
    rows, scores = ranked
    got = loop(benchmark, loop_rerank, rows, scores, K, QUOTAS, catalog)
    assert got == rerank(rows, scores, K, QUOTAS, **rerank_kwargs).rows.tolist()


@pytest.mark.benchmark(group="rerank-mmr-d64-1000to20")
def test_rerank_mmr_compiled(benchmark, ranked, catalog, rerank_kwargs):
    rows, scores = ranked
    benchmark(lambda: rerank(rows, scores, K, MMR, **rerank_kwargs))


@pytest.mark.benchmark(group="rerank-mmr-d64-1000to20")
def test_rerank_mmr_numpy_twin(benchmark, ranked, catalog, rerank_kwargs):
    rows, scores = ranked
    benchmark(lambda: rerank(rows, scores, K, MMR, **rerank_kwargs, use_native=False))


@pytest.mark.benchmark(group="rerank-mmr-d64-1000to20")
def test_rerank_mmr_python_loop(benchmark, ranked, catalog, rerank_kwargs):
    rows, scores = ranked
    got = loop(benchmark, loop_rerank, rows, scores, K, MMR, catalog)
    assert got == rerank(rows, scores, K, MMR, **rerank_kwargs).rows.tolist()


#: Compiled benchmark -> its numpy twin in the same group; the run fails if the compiled one is slower
#: (benchmarks/conftest.py, "the gate").
KERNEL_TWINS = [
    (test_rank_logistic_compiled, test_rank_logistic_numpy_twin),
    (test_rank_mlp_compiled, test_rank_mlp_numpy_twin),
    (test_rank_gbdt_extended_compiled, test_rank_gbdt_extended_numpy_twin),
    (test_rerank_quotas_compiled, test_rerank_quotas_numpy_twin),
    (test_rerank_mmr_compiled, test_rerank_mmr_numpy_twin),
]
