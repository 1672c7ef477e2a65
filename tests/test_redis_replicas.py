"""Replicas that learn as one through a real Redis: shared log, attribution, dedupe, faults, restarts."""

import threading
import time
import uuid

import numpy as np
import pytest

from recsvc.engine import Engine, FeedbackEventIn, ItemIn, RecommendQuery
from recsvc.errors import Unavailable

from conftest import small_config

pytest.importorskip("redis")


@pytest.fixture
def cfg(tmp_path, redis_server):
    return small_config(tmp_path, state={"backend": "redis", "redis_url": redis_server.url,
                                         "redis_prefix": f"t{uuid.uuid4().hex[:8]}", "max_staleness_ms": 300},
                        exploration={"policy": "greedy"})


@pytest.fixture
def replicas(cfg, clock):
    engines = [Engine.from_config(cfg, clock=clock) for _ in range(2)]
    yield engines
    for e in engines:
        e.close(snapshot=False)


def eventually(check, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("the other replica did not converge within the staleness bound")
        time.sleep(0.005)


def test_clicks_at_one_replica_teach_the_other(replicas):
    a, b = replicas
    rec = a.recommend(RecommendQuery(user_id="u1", n=5))
    item = rec.items[0].item_id
    row = np.array([a.catalog.row_of[item]])
    res = a.feedback([FeedbackEventIn("i1", "u1", item, "impression", request_id=rec.request_id),
                      FeedbackEventIn("c1", "u1", item, "click", request_id=rec.request_id)])
    assert res.accepted == 2
    # read-your-writes at A, and B within the staleness bound
    assert a.state.bandit_evidence(row)[0].tolist() == [1.0]
    eventually(lambda: b.state.bandit_evidence(row)[0].tolist() == [1.0])
    eventually(lambda: b.state.interaction_counts(row).tolist() == [1.0])
    assert [r for r, _ in b.state.history("u1")] == [int(row[0])]


def test_a_click_at_b_is_attributed_to_the_slate_a_served(replicas):
    a, b = replicas
    rec = a.recommend(RecommendQuery(user_id="u2", n=5))
    item = rec.items[1].item_id
    row = np.array([a.catalog.row_of[item]])
    res = b.feedback([FeedbackEventIn("b-imp", "u2", item, "impression", request_id=rec.request_id),
                      FeedbackEventIn("b-clk", "u2", item, "click", request_id=rec.request_id)])
    assert (res.accepted, res.rejected) == (2, [])
    assert b.state.bandit_evidence(row)[0].tolist() == [1.0]  # attributed: the bandit learned
    eventually(lambda: a.state.bandit_evidence(row)[0].tolist() == [1.0])


def test_an_event_retried_at_the_other_replica_counts_once(replicas):
    a, b = replicas
    item = a.catalog.item_ids[7]
    row = np.array([a.catalog.row_of[item]])
    assert a.feedback([FeedbackEventIn("retry-1", "u3", item, "click")]).accepted == 1
    again = b.feedback([FeedbackEventIn("retry-1", "u3", item, "click")])
    assert (again.accepted, again.duplicates) == (0, 1)
    eventually(lambda: b.state.interaction_counts(row).tolist() == [1.0])
    time.sleep(0.05)
    assert a.state.interaction_counts(row).tolist() == b.state.interaction_counts(row).tolist() == [1.0]


def test_concurrent_feedback_at_both_replicas_ends_with_exact_counts(replicas):
    a, b = replicas
    items = a.catalog.item_ids[100:110]
    rows = np.array([a.catalog.row_of[i] for i in items])
    errors = []

    def send(engine, worker):
        try:
            for k in range(20):
                # every event goes to both replicas: one of the two copies must be a duplicate
                ev = [FeedbackEventIn(f"w{worker}-{k}-{j}", f"user{worker}", items[(k + j) % 10], "click")
                      for j in range(5)]
                engine.feedback(ev)
                (b if engine is a else a).feedback(ev)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(a if w % 2 else b, w)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = np.zeros(10)
    for w in range(8):
        for k in range(20):
            for j in range(5):
                expected[(k + j) % 10] += 1
    eventually(lambda: b.state.interaction_counts(rows).tolist() == expected.tolist())
    eventually(lambda: a.state.interaction_counts(rows).tolist() == expected.tolist())


def test_catalog_changes_reach_every_replica(replicas):
    a, b = replicas
    v = np.ones(a.catalog.dim)
    assert a.upsert_items([ItemIn("shared-new", v.tolist(), "c")]) == (1, 0)
    eventually(lambda: "shared-new" in b.catalog.row_of)
    rec = b.recommend(RecommendQuery(user_id="x", n=3, user_embedding=v.tolist()))
    assert rec.items[0].item_id == "shared-new"
    assert b.delete_items(["shared-new", "ghost"]) == (1, ["ghost"])
    eventually(lambda: "shared-new" not in a.catalog.row_of)


def test_a_restarted_replica_converges_from_snapshot_and_stream(cfg, clock, replicas):
    a, b = replicas
    for k in range(30):
        item = a.catalog.item_ids[k]
        a.feedback([FeedbackEventIn(f"s{k}", f"u{k % 4}", item, "click")])
    a.snapshot()  # in Redis
    for k in range(30, 40):
        b.feedback([FeedbackEventIn(f"s{k}", f"u{k % 4}", a.catalog.item_ids[k], "click")])
    a.snapshot()  # the stream is trimmed below the previous snapshot
    for k in range(40, 45):
        b.feedback([FeedbackEventIn(f"s{k}", f"u{k % 4}", a.catalog.item_ids[k], "click")])
    c = Engine.from_config(cfg, clock=clock)  # a new replica: snapshot + the stream after it
    try:
        rows = np.arange(60)
        eventually(lambda: c.state.interaction_counts(rows).tolist() == a.state.interaction_counts(rows).tolist())
        assert c.state.history("u1") == a.state.history("u1") == b.state.history("u1")
        r = a.journal._redis if hasattr(a.journal, "_redis") else None
        assert r is not None and r.xlen(a.journal.key_log) <= 16  # trimmed: the last two snapshots' gap and after
    finally:
        c.close(snapshot=False)


def test_redis_down_recommend_serves_feedback_is_unavailable_then_resumes(cfg, clock, redis_server):
    a = Engine.from_config(cfg, clock=clock)
    try:
        item = a.catalog.item_ids[3]
        assert a.feedback([FeedbackEventIn("before", "u", item, "click")]).accepted == 1
        redis_server.stop()
        rec = a.recommend(RecommendQuery(user_id="u", n=5))
        assert len(rec.items) == 5
        with pytest.raises(Unavailable, match="Redis"):
            a.feedback([FeedbackEventIn("during", "u", item, "click")])
        time.sleep(0.4)  # past the staleness bound
        assert a.recommend(RecommendQuery(user_id="u", n=5)).degraded
        redis_server.start()  # same data directory: the AOF brings everything back
        deadline = time.monotonic() + 10
        while True:
            try:
                res = a.feedback([FeedbackEventIn("during", "u", item, "click")])
                break
            except Unavailable:
                assert time.monotonic() < deadline, "writes did not resume after Redis came back"
                time.sleep(0.1)
        assert res.accepted == 1
        row = np.array([a.catalog.row_of[item]])
        assert a.state.interaction_counts(row).tolist() == [2.0]
        eventually(lambda: not a.recommend(RecommendQuery(user_id="u", n=5)).degraded)
    finally:
        a.close(snapshot=False)


def test_a_replica_behind_the_trimmed_history_says_so(cfg, clock, replicas):
    """A replica whose consumer fell more than a snapshot interval behind must not skip the trimmed entries."""
    a, b = replicas
    with b.journal.ingest:  # b's consumer reads a batch, then waits to apply it
        for k in range(20):
            a.feedback([FeedbackEventIn(f"t{k}", "u", a.catalog.item_ids[k], "click")])
        a.snapshot()
        for k in range(20, 30):
            a.feedback([FeedbackEventIn(f"t{k}", "u", a.catalog.item_ids[k], "click")])
        a.snapshot()  # trims below the first snapshot: entries b has not read are gone
    eventually(lambda: b.journal.behind_trim)
    assert b.journal.stale() and b.recommend(RecommendQuery(user_id="u", n=3)).degraded
    b.snapshot()  # refused: b's state is incomplete
    c = Engine.from_config(cfg, clock=clock)  # a restart recovers from the newest snapshot
    try:
        rows = np.arange(40)
        eventually(lambda: c.state.interaction_counts(rows).tolist() == a.state.interaction_counts(rows).tolist())
        assert not c.journal.stale()
    finally:
        c.close(snapshot=False)


def test_a_served_slate_resent_after_a_lost_reply_counts_once(replicas):
    a, b = replicas
    rec = a.recommend(RecommendQuery(user_id="dup", n=3))
    slate = a.state.served_slate(rec.request_id) or a.journal.fetch_served({rec.request_id})[rec.request_id]
    a.journal._send_slates([slate])  # as if the writer resent a batch whose reply was lost
    a.journal.flush_served()
    length = a.journal._redis.xlen(a.journal.key_log)
    a.journal._send_slates([slate])
    assert a.journal._redis.xlen(a.journal.key_log) == length


def test_feedback_on_a_slate_still_queued_here_is_accepted(replicas, redis_server):
    """Redis writes stalled (CLIENT PAUSE WRITE) right after a Recommend: its slate is still queued here, so a
    click on it used to be refused as an unknown request_id (not retryable) once a 0.2 s wait ran out."""
    a, _ = replicas
    rec = a.recommend(RecommendQuery(user_id="q", n=3))
    redis_server.client().client_pause(600, all=False)
    res = a.feedback([FeedbackEventIn("q-click", "q", rec.items[0].item_id, "click", request_id=rec.request_id)])
    assert (res.accepted, res.rejected) == (1, [])


def test_a_slice_slate_reaches_the_other_replica_with_the_main_policys_propensities(cfg, clock):
    """The random slice's slates carry the main policy's propensities through the shared log (the records
    codec): the other replica reads them back as served."""
    cfg = cfg.with_overrides({"exploration": {"random_share": 1.0}})
    a, b = (Engine.from_config(cfg, clock=clock) for _ in range(2))
    try:
        published = []
        publish = a.journal.publish_served
        a.journal.publish_served = lambda slate: (published.append(slate), publish(slate))[1]
        rec = a.recommend(RecommendQuery(user_id="slice", n=5))
        assert rec.random_slice
        (sent,) = published
        assert len(sent.target_propensities) == 5
        a.journal.flush_served()
        got = b.journal.fetch_served({rec.request_id})[rec.request_id]
        assert got.target_propensities == sent.target_propensities and got.random_slice
    finally:
        a.close(snapshot=False)
        b.close(snapshot=False)
