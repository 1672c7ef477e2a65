"""The request path's glue after stage 1: what it logs for a served slate is what the candidates, their
features and the re-ranking say, on the usual slate (every item a candidate, nothing reserved) and on
slates with reserved slots (a pinned item that is not a candidate, sponsored items)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import small_config
from recsvc.engine import Engine, RecommendQuery

NOW_MS = 1_795_910_400_000


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("glue"),
                       budgets={"total_ms": 1e6, "candidates_ms": 1e6, "ranking_ms": 1e6, "reranking_ms": 1e6})
    eng = Engine.from_config(cfg, clock=lambda: NOW_MS)
    yield eng
    eng.close(snapshot=False)


def _serve(eng, q, monkeypatch):
    """(the served record, the candidates' rows, their feature matrix) of one request."""
    import recsvc.ranking

    seen = {}
    gather = recsvc.ranking.gather_features
    candidates = eng.requests.retriever.candidates

    def gather_spy(*a, **k):
        seen["X"] = gather(*a, **k)
        return seen["X"]

    def candidates_spy(*a, **k):
        seen["cands"] = candidates(*a, **k)
        return seen["cands"]

    monkeypatch.setattr(recsvc.ranking, "gather_features", gather_spy)
    monkeypatch.setattr(eng.requests.retriever, "candidates", candidates_spy)
    a = eng.experiments.assign(q.user_id, NOW_MS)
    rec, served = eng.requests.recommend(q, a.config, a.variant, a.arms, NOW_MS)
    monkeypatch.undo()
    return rec, served, seen["cands"].rows, seen["X"]


def _queries(eng):
    base = RecommendQuery(user_id="glue-user", n=10)
    cand_rows = set(eng.candidates(base).rows.tolist())
    cat = eng.catalog
    outside = next(cat.item_ids[r] for r in range(cat.n_rows)
                   if r not in cand_rows and cat.maturity[r] <= 12)  # servable, not a candidate
    inside = [cat.item_ids[r] for r in sorted(cand_rows)[:3]]
    return {
        "plain": base,
        "pinned": RecommendQuery(user_id="glue-user", n=10, rerank={"pinned": {outside: 0, inside[0]: 4}}),
        "sponsored": RecommendQuery(user_id="glue-user", n=10,
                                    rerank={"sponsored_items": [inside[1], outside], "sponsored_positions": [1, 6]}),
        "quota": RecommendQuery(user_id="glue-user", n=10, rerank={"max_per_category": 1}),
    }


@pytest.mark.parametrize("case", ["plain", "pinned", "sponsored", "quota"])
def test_served_record_logs_each_items_candidate_features_and_the_slices_p(engine, case, monkeypatch):
    q = _queries(engine)[case]
    rec, served, cand_rows, X = _serve(engine, q, monkeypatch)
    index = {r: i for i, r in enumerate(cand_rows.tolist())}
    k = len(served.rows)
    assert [engine.catalog.item_ids[r] for r in served.rows] == [it.item_id for it in rec.items]
    # features: a candidate's own row; zeros for an item that was placed, not ranked
    block = served.feature_block()
    assert block is not None and block.shape == (k, X.shape[1])
    for pos, row in enumerate(served.rows):
        want = X[index[row]] if row in index else np.zeros(X.shape[1], np.float32)
        assert block[pos].tobytes() == want.tobytes(), (case, pos)
    if case == "pinned":
        assert served.rows[0] not in index  # the pin outside the candidates is served, unranked
    # the random slice's p: the slate's organic slots over the organic pool (candidates within the maturity
    # ceiling, reserved items out)
    reserved = {engine.catalog.row_of[it.item_id] for it in rec.items if it.sponsored}
    reserved |= {engine.catalog.row_of[i] for i in q.rerank.get("pinned", {})} & set(served.rows)
    ceiling = engine.cfg.reranking.max_maturity
    pool = sum(1 for r in cand_rows.tolist() if engine.catalog.maturity[r] <= ceiling and r not in reserved)
    need = k - sum(1 for r in served.rows if r in reserved)
    assert served.random_p == min(1.0, need / pool)


def test_a_deterministic_policys_mmr_slate_builds_no_selection_plan(tmp_path, monkeypatch):
    """Greedy (or UCB) with MMR re-ranks with rerank and has no propensity rounds: no selection plan, whose
    pairwise similarities of the whole pool (p x p) would be work for nothing; the slate and its random_p
    are what they are with one."""
    import recsvc.reranking

    cfg = small_config(tmp_path, exploration={"policy": "greedy"},
                       budgets={"total_ms": 1e6, "candidates_ms": 1e6, "ranking_ms": 1e6, "reranking_ms": 1e6})
    eng = Engine.from_config(cfg, clock=lambda: NOW_MS)
    try:
        q = RecommendQuery(user_id="glue-user", n=10, rerank={"mmr_lambda": 0.3})
        a = eng.experiments.assign(q.user_id, NOW_MS)
        calls = []
        plan = recsvc.reranking.selection_plan
        monkeypatch.setattr(recsvc.reranking, "selection_plan", lambda *a, **k: calls.append(1) or plan(*a, **k))
        rec, served = eng.requests.recommend(q, a.config, a.variant, a.arms, NOW_MS)
        assert calls == []
        assert len(rec.items) == 10 and all(it.propensity == 1.0 for it in rec.items)
        cands = eng.candidates(q)
        assert served.random_p == min(1.0, 10 / len(cands))  # every candidate is in the pool, nothing reserved
    finally:
        eng.close(snapshot=False)
