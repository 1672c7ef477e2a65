"""The in-process pipeline: stages, filters, cold start, feedback, live catalog, recovery."""

import numpy as np
import pytest

from recsvc.engine import Engine, FeedbackEventIn, ItemIn, RecommendQuery
from recsvc.errors import InvalidArgument

from conftest import small_config


def ids(rec):
    return [i.item_id for i in rec.items]


def test_cold_user_gets_a_full_list(engine):
    rec = engine.recommend(RecommendQuery(user_id="nobody", n=10))
    assert len(rec.items) == 10
    assert len(set(ids(rec))) == 10
    assert [i.position for i in rec.items] == list(range(10))
    assert all(0 < i.propensity <= 1 for i in rec.items)
    assert set(rec.timings_us) == {"candidates_us", "ranking_us", "exploration_us", "reranking_us", "total_us"}
    for it in rec.items:
        assert set(it.sources) <= {"popular", "fresh"}  # no embedding, no history


def test_default_n_and_large_n(engine):
    assert len(engine.recommend(RecommendQuery(user_id="u")).items) == 10
    assert len(engine.recommend(RecommendQuery(user_id="u", n=250)).items) == 250


def test_user_embedding_drives_ann(engine):
    target = engine.catalog.embeddings[42]
    rec = engine.recommend(RecommendQuery(user_id="u1", n=10, user_embedding=target.tolist(), debug=True))
    assert any("ann" in i.sources for i in rec.items)
    sims = engine.catalog.embeddings[[engine.catalog.row_of[i] for i in ids(rec)]] @ target
    assert np.median(sims) > 0.5  # the slate is about the user's taste
    assert "ranker_score" in rec.items[0].debug


@pytest.mark.parametrize("q,match", [
    (RecommendQuery(user_id=""), "user_id is required"),
    (RecommendQuery(user_id="u", n=-1), "n must be >= 0"),
    (RecommendQuery(user_id="u", n=10_000), "n must be at most"),
    (RecommendQuery(user_id="u", user_embedding=[0.1, 0.2]), "user_embedding has 2 values"),
    (RecommendQuery(user_id="u", max_maturity=-3), "max_maturity"),
])
def test_bad_requests_are_invalid_argument(engine, q, match):
    with pytest.raises(InvalidArgument, match=match):
        engine.recommend(q)


def test_filters_never_leak(engine):
    cat = engine.catalog
    allowed = cat.category_names[:2]
    for user in ("cold", "warm"):
        emb = cat.embeddings[7].tolist() if user == "warm" else None
        rec = engine.recommend(RecommendQuery(user_id=user, n=30, user_embedding=emb,
                                              allowed_categories=allowed, max_maturity=12))
        assert len(rec.items) == 30
        for it in rec.items:
            row = cat.row_of[it.item_id]
            assert it.category in allowed
            assert cat.maturity[row] <= 12
    blocked = cat.category_names[:5]
    rec = engine.recommend(RecommendQuery(user_id="b", n=50, blocked_categories=blocked))
    assert not {i.category for i in rec.items} & set(blocked)


def test_excluded_and_consumed_items_never_appear(engine, clock):
    first = engine.recommend(RecommendQuery(user_id="c", n=10))
    clicked = first.items[0].item_id
    res = engine.feedback([FeedbackEventIn("e1", "c", clicked, "click", request_id=first.request_id)])
    assert res.accepted == 1
    excluded = [i.item_id for i in first.items[1:4]]
    again = engine.recommend(RecommendQuery(user_id="c", n=50, exclude_item_ids=excluded))
    assert clicked not in ids(again)
    assert not set(excluded) & set(ids(again))


def test_history_and_cooccurrence_feed_candidates(engine, clock):
    cat = engine.catalog
    # Users who click item A then item B teach the co-occurrence table A<->B.
    a, b = cat.item_ids[10], cat.item_ids[20]
    events = []
    for u in range(20):
        events.append(FeedbackEventIn(f"a{u}", f"user{u}", a, "click", timestamp_ms=clock() - 1000))
        events.append(FeedbackEventIn(f"b{u}", f"user{u}", b, "click", timestamp_ms=clock()))
    assert engine.feedback(events).accepted == 40
    engine.feedback([FeedbackEventIn("fan-a", "fan", a, "click")])
    assert [r for r, _ in engine.state.history("fan")] == [cat.row_of[a]]
    # The candidate set of "fan" now holds B, proposed by co-occurrence; A is consumed.
    cands = engine.candidates(RecommendQuery(user_id="fan"))
    rows = list(cands.rows)
    assert cat.row_of[b] in rows and cat.row_of[a] not in rows
    assert "cooccurrence" in cands.source_names(rows.index(cat.row_of[b]))
    # The derived user embedding makes ANN run for a user who sent no embedding.
    assert any("ann" in cands.source_names(i) for i in range(len(cands)))


def test_feedback_validation_idempotency_and_attribution(engine, clock):
    rec = engine.recommend(RecommendQuery(user_id="f", n=5))
    item = rec.items[0].item_id
    other = next(i for i in engine.catalog.item_ids if i not in ids(rec))
    res = engine.feedback([
        FeedbackEventIn("ok1", "f", item, "impression", request_id=rec.request_id),
        FeedbackEventIn("ok2", "f", item, "click", request_id=rec.request_id),
        FeedbackEventIn("ok1", "f", item, "impression", request_id=rec.request_id),  # dup in batch
        FeedbackEventIn("", "f", item, "click"),
        FeedbackEventIn("bad-type", "f", item, "like"),
        FeedbackEventIn("bad-item", "f", "no-such-item", "click"),
        FeedbackEventIn("bad-req", "f", item, "click", request_id="nope"),
        FeedbackEventIn("not-served", "f", other, "click", request_id=rec.request_id),
        FeedbackEventIn("wrong-user", "g", item, "click", request_id=rec.request_id),
        FeedbackEventIn("old", "f", item, "click", timestamp_ms=clock() - 90 * 86_400_000),
        FeedbackEventIn("organic", "f", other, "click"),
    ])
    assert res.accepted == 3 and res.duplicates == 1
    reasons = {r.event_id: r.reason for r in res.rejected}
    assert "idempotency" in reasons[""]
    assert "unknown event type" in reasons["bad-type"]
    assert "unknown item_id" in reasons["bad-item"]
    assert "unknown or has expired" in reasons["bad-req"]
    assert "was not served" in reasons["not-served"]
    assert "another user" in reasons["wrong-user"]
    assert "outside the accepted range" in reasons["old"]
    # retried batch: all duplicates
    again = engine.feedback([FeedbackEventIn("ok2", "f", item, "click", request_id=rec.request_id)])
    assert (again.accepted, again.duplicates) == (0, 1)
    # bandit: one impression turned into a success; organic click does not touch the bandit
    row = engine.catalog.row_of[item]
    successes, failures = engine.state.bandit_evidence(np.array([row, engine.catalog.row_of[other]]))
    assert (successes.tolist(), failures.tolist()) == ([1.0, 0.0], [0.0, 0.0])


def test_upserted_item_is_served_and_deleted_never_again(engine):
    rng = np.random.default_rng(3)
    v = rng.standard_normal(engine.catalog.dim).astype(np.float32)
    inserted, updated = engine.upsert_items([ItemIn("brand-new", v.tolist(), "cat-new", 0, 0)])
    assert (inserted, updated) == (1, 0)
    rec = engine.recommend(RecommendQuery(user_id="x", n=10, user_embedding=v.tolist()))
    assert "brand-new" in ids(rec)
    deleted, missing = engine.delete_items(["brand-new", "ghost"])
    assert deleted == 1 and missing == ["ghost"]
    for _ in range(3):
        rec = engine.recommend(RecommendQuery(user_id="x", n=50, user_embedding=v.tolist()))
        assert "brand-new" not in ids(rec)
    with pytest.raises(InvalidArgument, match="embedding has 3 values"):
        engine.upsert_items([ItemIn("bad", [1.0, 2.0, 3.0])])


def test_state_and_catalog_survive_restart(tmp_path, clock):
    cfg = small_config(tmp_path, exploration={"policy": "greedy"})
    eng = Engine.from_config(cfg, clock=clock)
    v = np.ones(eng.catalog.dim, np.float32)
    eng.upsert_items([ItemIn("kept", v.tolist(), "c")])
    eng.delete_items([eng.catalog.item_ids[0]])
    rec = eng.recommend(RecommendQuery(user_id="r", n=5))
    item = rec.items[0].item_id
    eng.feedback([FeedbackEventIn("r1", "r", item, "click", request_id=rec.request_id)])
    row = eng.catalog.row_of[item]
    before = (eng.state.bandit_evidence([row])[0][0], eng.state.decayed_popularity(clock())[row])
    eng.close(snapshot=False)  # no snapshot: everything comes back from the log
    back = Engine.from_config(cfg, clock=clock)
    assert "kept" in back.catalog.row_of and eng.catalog.item_ids[0] not in back.catalog.row_of
    assert (back.state.bandit_evidence([row])[0][0], back.state.decayed_popularity(clock())[row]) == before
    assert back.feedback([FeedbackEventIn("r1", "r", item, "click", request_id=rec.request_id)]).duplicates == 1
    back.close(snapshot=True)  # now from a snapshot (+ an empty log)
    third = Engine.from_config(cfg, clock=clock)
    assert "kept" in third.catalog.row_of and third.state.bandit_evidence([row])[0][0] == before[0]
    assert third.recommend(RecommendQuery(user_id="r", n=5, user_embedding=v.tolist())).items[0].item_id == "kept"
    third.close(snapshot=False)


def test_short_deadline_degrades_instead_of_failing(engine):
    rec = engine.recommend(RecommendQuery(user_id="d", n=10, budget_ms=0.001))
    assert rec.degraded and len(rec.items) == 10


def test_demo_catalog_is_cached_not_rebuilt(tmp_path, clock, monkeypatch):
    from recsvc.retrieval import ann as ann_mod

    cfg = small_config(tmp_path)
    Engine.from_config(cfg, clock=clock).close(snapshot=False)
    built = []
    monkeypatch.setattr(ann_mod.AnnIndex, "build", classmethod(lambda *a, **k: built.append(1)))
    Engine.from_config(cfg, clock=clock).close(snapshot=False)
    assert built == []


def test_warm_up_logs_nothing(engine):
    lsn = engine.store.lsn
    engine.warm_up()
    assert engine.store.lsn == lsn and not engine.state.served_slates()


def test_concurrent_recommend_feedback_and_snapshots(tmp_path, clock):
    """Requests keep flowing while feedback is ingested and snapshots are written."""
    import threading
    import time

    cfg = small_config(tmp_path, state={"snapshot_every_events": 50})
    eng = Engine.from_config(cfg, clock=clock)
    errors, served = [], []

    def requester(k):
        try:
            for j in range(40):
                rec = eng.recommend(RecommendQuery(user_id=f"c{k}-{j % 5}", n=5))
                served.append((f"c{k}-{j % 5}", rec))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def feeder():
        try:
            j = 0
            while j < 200 and (any(t.is_alive() for t in threads[:3]) or j < 20):
                batch = [FeedbackEventIn(f"f{j}-{rec.request_id}", user, rec.items[0].item_id, "click",
                                         request_id=rec.request_id) for user, rec in list(served[-5:])]
                if not batch:
                    time.sleep(0.001)
                    continue
                j += 1
                assert eng.feedback(batch).accepted == len(batch)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=requester, args=(k,)) for k in range(3)] + [threading.Thread(target=feeder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert eng.store.latest_snapshot()[0] > 0, "no snapshot was written during the run"
    eng.close(snapshot=False)


def test_per_request_rerank_rules(engine):
    cat = engine.catalog
    pin = cat.item_ids[123]
    rec = engine.recommend(RecommendQuery(user_id="r", n=12, rerank={"max_per_category": 1, "pinned": {pin: 2}}))
    assert rec.items[2].item_id == pin
    cats = [i.category for i in rec.items]
    assert len(set(cats)) == len(cats)  # quota of one per category
    sponsored = cat.item_ids[77]
    rec = engine.recommend(RecommendQuery(user_id="r", n=5, rerank={"sponsored_items": [sponsored],
                                                                    "sponsored_positions": [0]}))
    assert rec.items[0].item_id == sponsored and rec.items[0].sponsored
    with pytest.raises(InvalidArgument, match="rerank.mmr_lambda"):
        engine.recommend(RecommendQuery(user_id="r", rerank={"mmr_lambda": 3.0}))
    with pytest.raises(InvalidArgument, match="unknown rule"):
        engine.recommend(RecommendQuery(user_id="r", rerank={"shuffle": True}))
