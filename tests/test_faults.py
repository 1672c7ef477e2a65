"""Issue 13: faults that reached callers, and validation gaps — each test named after what broke.

Most run through a real server on a free loopback port (as callers see it) and in process.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import threading
import time

import grpc
import numpy as np
import pytest

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from conftest import small_config

EXPERIMENTS = """
[[experiment]]
name = "policy"
salt = "faults-test"
  [[experiment.variant]]
  name = "control"
  weight = 1
  [[experiment.variant]]
  name = "greedy"
  weight = 1
  overrides = { exploration = { policy = "greedy" } }
"""

HUGE = 20_000  # characters: past gRPC's 8-16 KB limit on status details once echoed


def start_server(cfg, engine_factory=None):
    """``serve`` in a thread; returns (channel, stop)."""
    from recsvc.server import serve

    stop, started, ready = threading.Event(), threading.Event(), {}

    def on_ready(port):
        ready["port"] = port
        started.set()

    t = threading.Thread(target=serve, args=(cfg,), daemon=True,
                         kwargs={"on_ready": on_ready, "stop_event": stop, "engine_factory": engine_factory})
    t.start()
    assert started.wait(120), "server did not become ready"
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['port']}")

    def close():
        channel.close()
        stop.set()
        t.join(30)

    return channel, close


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "experiments.toml").write_text(EXPERIMENTS)
    cfg = small_config(tmp, server={"port": 0}, experiments={"file": str(tmp / "experiments.toml")})
    channel, close = start_server(cfg)
    yield pb_grpc.RecommenderStub(channel)
    close()


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value


# -- 6. error messages echo unbounded input --------------------------------------------------------------

def _huge(prefix: str) -> str:
    return prefix + "x" * (HUGE - len(prefix))


@pytest.mark.parametrize("method, request_, code, fragment", [
    ("Feedback", pb.FeedbackRequest(events=[pb.FeedbackEvent(event_id="e", user_id="u", item_id=_huge("item-"),
                                                             type=pb.CLICK)]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown item_id 'item-xxx"),
    ("Feedback", pb.FeedbackRequest(events=[pb.FeedbackEvent(event_id="e", user_id="u", item_id="item-0001",
                                                             request_id=_huge("req-"), type=pb.CLICK)]),
     grpc.StatusCode.INVALID_ARGUMENT, "request_id 'req-xxx"),
    ("Recommend", pb.RecommendRequest(user_id="u", filter=pb.Filter(allowed_categories=[_huge("cat-")] * 3)),
     grpc.StatusCode.INVALID_ARGUMENT, "filter.allowed_categories: none of ['cat-xxx"),
    ("UpsertItems", pb.UpsertItemsRequest(items=[pb.Item(item_id=_huge("up-"), embedding=[1.0])]),
     grpc.StatusCode.INVALID_ARGUMENT, "items[0] ('up-xxx"),
    ("GetExperimentReport", pb.GetExperimentReportRequest(experiment=_huge("exp-")),
     grpc.StatusCode.NOT_FOUND, "no experiment named 'exp-xxx"),
    ("GetExperimentReport", pb.GetExperimentReportRequest(experiment="policy", plot_metric=_huge("m-")),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown metric 'm-xxx"),
])
def test_huge_echoed_value_is_truncated_not_stream_removed(stub, method, request_, code, fragment):
    """20 KB ids and names came back as RESOURCE_EXHAUSTED "Stream removed" instead of the real status."""
    err = rpc_error(getattr(stub, method), request_)
    assert err.code() == code, err.details()
    details = err.details()
    assert fragment in details
    assert len(details) < 1000
    assert f"({HUGE} characters)" in details


def test_feedback_rejection_reasons_are_truncated(stub):
    """A mixed batch succeeds; its per-event reasons must not echo 20 KB either."""
    rec = stub.Recommend(pb.RecommendRequest(user_id="trunc", n=2), timeout=10)
    resp = stub.Feedback(pb.FeedbackRequest(events=[
        pb.FeedbackEvent(event_id="ok-1", user_id="trunc", item_id=rec.items[0].item_id, type=pb.CLICK),
        pb.FeedbackEvent(event_id="bad-1", user_id="trunc", item_id=_huge("ghost-"), type=pb.CLICK),
    ]), timeout=10)
    assert resp.accepted == 1 and len(resp.rejected) == 1
    reason = resp.rejected[0].reason
    assert reason.startswith("unknown item_id 'ghost-xxx") and f"({HUGE} characters)" in reason
    assert len(reason) < 300


def test_echo_keeps_short_values_whole_and_cuts_long_ones():
    from recsvc.errors import echo

    assert echo("item-1") == "'item-1'"
    assert echo("x" * 100) == repr("x" * 100)
    assert echo("x" * 101) == repr("x" * 100) + "... (101 characters)"
    assert echo(7) == "7"
    long_list = echo(["a" * 500])
    assert len(long_list) < 200 and "characters)" in long_list


def test_status_message_backstop_cuts_any_long_message():
    from recsvc.server.interceptors import MAX_DETAILS, bounded

    assert bounded("short") == "short"
    cut = bounded("y" * 50_000)
    assert len(cut) <= MAX_DETAILS and cut.endswith("(message cut from 50000 characters)")


# -- 5. Recommend on a full disk ----------------------------------------------------------------------------

class FullDisk:
    """The state store's log file on a full disk: every write raises ENOSPC while ``full``."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.full = True

    @classmethod
    def install(cls, store) -> "FullDisk":
        disk = cls(store._fh)
        store._fh = disk
        return disk

    def write(self, data):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def test_recommend_keeps_serving_when_the_served_log_cannot_be_written(tmp_path, clock, caplog):
    """A full disk made Recommend fail with INTERNAL, after the slate had entered memory but not the log."""
    from recsvc.engine import Engine, FeedbackEventIn, FeedbackRejected, RecommendQuery

    cfg = small_config(tmp_path)
    eng = Engine.from_config(cfg, clock=clock)
    kept = eng.recommend(RecommendQuery(user_id="u", n=4))
    disk = FullDisk.install(eng.store)
    lsn = eng.store.lsn
    with caplog.at_level(logging.WARNING, logger="recsvc.feedback"):
        dropped = [eng.recommend(RecommendQuery(user_id="u", n=4)) for _ in range(3)]
    assert all(len(r.items) == 4 for r in dropped)
    assert eng.feedback_path.served_dropped == 3
    assert "served slate" in caplog.text and "No space left on device" in caplog.text
    assert eng.store.lsn == lsn  # nothing half-written
    # memory agrees with the log: the dropped slates are unknown, so their feedback is refused
    assert all(eng.state.served_slate(r.request_id) is None for r in dropped)
    with pytest.raises(FeedbackRejected, match="is unknown or has expired"):
        disk.full = False
        eng.feedback([FeedbackEventIn("f1", "u", dropped[0].items[0].item_id, "click",
                                      request_id=dropped[0].request_id)])
    after = eng.recommend(RecommendQuery(user_id="u", n=4))
    remembered = {s.request_id for s in eng.state.served_slates()}
    assert {kept.request_id, after.request_id} <= remembered
    eng.close(snapshot=False)  # the log alone must rebuild the same slates
    again = Engine.from_config(cfg, clock=clock)
    assert {s.request_id for s in again.state.served_slates()} == remembered
    again.close(snapshot=False)


def test_recommend_over_grpc_on_a_full_disk_is_ok_and_feedback_unavailable(tmp_path):
    from recsvc.engine import Engine

    disks = []

    def factory(c):
        eng = Engine.from_config(c)
        disks.append(FullDisk.install(eng.store))
        return eng

    channel, close = start_server(small_config(tmp_path, server={"port": 0}), engine_factory=factory)
    try:
        stub = pb_grpc.RecommenderStub(channel)
        rec = stub.Recommend(pb.RecommendRequest(user_id="disk", n=3), timeout=10)
        assert len(rec.items) == 3
        err = rpc_error(stub.Feedback, pb.FeedbackRequest(events=[
            pb.FeedbackEvent(event_id="d1", user_id="disk", item_id=rec.items[0].item_id, type=pb.CLICK)]))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "retry later" in err.details()
        disks[0].full = False
        rec = stub.Recommend(pb.RecommendRequest(user_id="disk", n=3), timeout=10)
        fb = stub.Feedback(pb.FeedbackRequest(events=[
            pb.FeedbackEvent(event_id="d2", user_id="disk", item_id=rec.items[0].item_id, type=pb.CLICK,
                             request_id=rec.request_id)]), timeout=10)
        assert fb.accepted == 1
    finally:
        close()


# -- 10. validation gaps ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_engine(tmp_path_factory):
    """One in-process engine for the validation tests (they change nothing)."""
    from conftest import FakeClock
    from recsvc.engine import Engine

    eng = Engine.from_config(small_config(tmp_path_factory.mktemp("greedy"), exploration={"policy": "greedy"}),
                             clock=FakeClock())
    yield eng
    eng.close(snapshot=False)


def _slate(eng, user, **kw):
    from recsvc.engine import RecommendQuery

    return [(i.item_id, i.sources) for i in eng.recommend(RecommendQuery(user_id=user, n=8, **kw)).items]


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-25])
def test_user_embedding_of_any_finite_magnitude_keeps_its_direction(greedy_engine, scale):
    """1e19 overflowed the float32 norm: the user vector became zeros and the ANN source silently vanished."""
    v = greedy_engine.catalog.embeddings[42].astype(np.float64)
    v = v / np.abs(v).max()
    expected = _slate(greedy_engine, "a", user_embedding=v.tolist())
    assert any("ann" in s for _, s in expected)
    scaled = (v * scale).astype(np.float32)  # what a gRPC caller can send
    assert np.isfinite(scaled).all() and scaled.any()
    assert _slate(greedy_engine, "b", user_embedding=scaled.tolist()) == expected


def test_user_embedding_of_1e45_is_not_all_zeros(greedy_engine):
    """1e-45 (a float32 denormal) was refused as "all zeros": its float32 norm underflowed."""
    ones = _slate(greedy_engine, "a", user_embedding=[1.0] * 16)
    assert _slate(greedy_engine, "b", user_embedding=[1e-45] * 16) == ones
    assert _slate(greedy_engine, "c", user_embedding=[-1e-300] * 16) == \
        _slate(greedy_engine, "d", user_embedding=[-1.0] * 16)


@pytest.mark.parametrize("values, match", [
    ([0.0] * 16, "non-zero"),
    ([math.inf] + [1.0] * 15, "finite"),
    ([math.nan] * 16, "finite"),
    ([1e39] * 16, "float32 range"),
])
def test_user_embedding_refused_only_when_not_finite_or_zero(greedy_engine, values, match):
    from recsvc.engine import RecommendQuery
    from recsvc.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=match):
        greedy_engine.recommend(RecommendQuery(user_id="u", user_embedding=values))


def test_item_embeddings_of_extreme_magnitude_over_grpc(stub):
    """Items are normalised by the same rule (float64): 1e-45 and 1e19 keep their direction."""
    for item_id, scale in (("tiny-45", 1e-45), ("huge-19", 1e19)):
        v = np.zeros(16)
        v[5] = scale
        up = stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=item_id, embedding=v.tolist())]),
                              timeout=10)
        assert up.inserted == 1
        rec = stub.Recommend(pb.RecommendRequest(user_id=f"x-{item_id}", n=5, user_embedding=v.tolist()),
                             timeout=10)
        assert item_id in [i.item_id for i in rec.items]
        stub.DeleteItems(pb.DeleteItemsRequest(item_ids=[item_id]), timeout=10)
    err = rpc_error(stub.Recommend, pb.RecommendRequest(user_id="z", user_embedding=[0.0] * 16))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-zero" in err.details()


@pytest.mark.parametrize("rules, key", [
    ({"pinned": {"item-0001": -1}}, "rerank.pinned.item-0001"),
    ({"pinned": {"item-0001": 10**9}}, "rerank.pinned.item-0001"),
    ({"sponsored_items": ["item-0001"], "sponsored_positions": [-1]}, "rerank.sponsored_positions.0"),
    ({"sponsored_items": ["item-0001"], "sponsored_positions": [2, 10**9]}, "rerank.sponsored_positions.1"),
    ({"long_tail_boost": math.inf}, "rerank.long_tail_boost"),
    ({"long_tail_boost": math.nan}, "rerank.long_tail_boost"),
    ({"freshness_boost": math.inf}, "rerank.freshness_boost"),
])
def test_out_of_range_rerank_rules_are_invalid_argument(greedy_engine, rules, key):
    """Positions of -1 or 10^9 and an infinite boost were accepted (the boost made NaN scores)."""
    from recsvc.engine import RecommendQuery
    from recsvc.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=re.escape(key)):
        greedy_engine.recommend(RecommendQuery(user_id="u", rerank=rules))


@pytest.mark.parametrize("request_, key", [
    (pb.RecommendRequest(user_id="u", rerank=pb.RerankRules(pinned={"item-0001": -1})), "rerank.pinned.item-0001"),
    (pb.RecommendRequest(user_id="u", rerank=pb.RerankRules(pinned={"item-0001": 10**9})),
     "rerank.pinned.item-0001"),
    (pb.RecommendRequest(user_id="u", rerank=pb.RerankRules(sponsored_item_ids=["item-0001"],
                                                            sponsored_positions=[-1])),
     "rerank.sponsored_positions.0"),
    (pb.RecommendRequest(user_id="u", rerank=pb.RerankRules(long_tail_boost=math.inf)), "rerank.long_tail_boost"),
    (pb.RecommendRequest(user_id="u", rerank=pb.RerankRules(pinned={_huge("pin-"): -1})), "rerank.pinned.'pin-xxx"),
])
def test_out_of_range_rerank_rules_over_grpc(stub, request_, key):
    err = rpc_error(stub.Recommend, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert key in err.details() and len(err.details()) < 1000


@pytest.mark.parametrize("reranking, key", [
    ({"pinned": {"item-0001": -1}}, "reranking.pinned.item-0001"),
    ({"pinned": {"item-0001": 10**9}}, "reranking.pinned.item-0001"),
    ({"sponsored_positions": [-1]}, "reranking.sponsored_positions.0"),
    ({"sponsored_positions": [10**9]}, "reranking.sponsored_positions"),
    ({"long_tail_boost": math.inf}, "reranking.long_tail_boost"),
    ({"freshness_boost": math.inf}, "reranking.freshness_boost"),
])
def test_out_of_range_rerank_rules_in_config_are_refused(tmp_path, reranking, key):
    from recsvc.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        small_config(tmp_path, reranking=reranking)


def test_pinned_item_that_was_not_a_candidate_has_score_zero_not_nan(greedy_engine, stub):
    from recsvc.engine import RecommendQuery

    """A pinned item that retrieval had not proposed came back with score NaN."""
    eng = greedy_engine
    candidates = set(eng.candidates(RecommendQuery(user_id="p", n=5)).rows.tolist())
    far = next(eng.catalog.item_ids[r] for r in range(eng.catalog.n_rows) if r not in candidates)
    near = eng.catalog.item_ids[min(candidates)]
    rec = eng.recommend(RecommendQuery(user_id="p", n=5, rerank={"pinned": {far: 0, near: 1}}))
    assert [i.item_id for i in rec.items[:2]] == [far, near]
    assert rec.items[0].score == 0.0  # placed, not ranked
    assert all(math.isfinite(i.score) for i in rec.items)
    resp = stub.Recommend(pb.RecommendRequest(user_id="p", n=5, rerank=pb.RerankRules(
        pinned={"item-0001": 0}, sponsored_item_ids=["item-0002"], sponsored_positions=[1])), timeout=10)
    assert [i.item_id for i in resp.items[:2]] == ["item-0001", "item-0002"]
    assert all(math.isfinite(i.score) for i in resp.items)


def test_category_ending_in_nul_is_refused(tmp_path, clock, stub):
    """"cat\\x00" came back as "cat" after a restart: the snapshot's catalog is loaded through numpy strings,
    which drop trailing NULs (the log replay kept it)."""
    from recsvc.engine import Engine, ItemIn
    from recsvc.errors import InvalidArgument

    eng = Engine.from_config(small_config(tmp_path), clock=clock)
    with pytest.raises(InvalidArgument, match="category must not end with a NUL character"):
        eng.upsert_items([ItemIn("n1", [1.0] * 16, category="cat\x00")])
    eng.upsert_items([ItemIn("n2", [1.0] * 16, category="a\x00b")])  # an inner NUL survives a restart
    eng.close()
    eng = Engine.from_config(small_config(tmp_path), clock=clock)
    c = eng.catalog
    assert "n1" not in c.row_of and c.category_names[c.categories[c.row_of["n2"]]] == "a\x00b"
    eng.close(snapshot=False)
    err = rpc_error(stub.UpsertItems, pb.UpsertItemsRequest(items=[
        pb.Item(item_id="n3", embedding=[1.0] * 16, category="\x00")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in err.details()


def test_huge_conversion_value_is_refused_and_reports_stay_finite(tmp_path, clock):
    """A conversion value of 1.7e308 was accepted and the experiment report showed inf and nan."""
    from recsvc.engine import Engine, FeedbackEventIn, FeedbackRejected, RecommendQuery
    from recsvc.feedback import MAX_EVENT_VALUE

    (tmp_path / "experiments.toml").write_text(EXPERIMENTS)
    eng = Engine.from_config(small_config(tmp_path, experiments={"file": str(tmp_path / "experiments.toml")}),
                             clock=clock)
    events = []
    for u in range(6):
        rec = eng.recommend(RecommendQuery(user_id=f"v{u}", n=2))
        item = rec.items[0].item_id
        events += [FeedbackEventIn(f"i{u}", f"v{u}", item, "impression", request_id=rec.request_id),
                   FeedbackEventIn(f"c{u}", f"v{u}", item, "conversion", request_id=rec.request_id,
                                   value=MAX_EVENT_VALUE if u % 2 else -MAX_EVENT_VALUE)]
    with pytest.raises(FeedbackRejected, match=r"value must be finite and at most 1e\+15 in magnitude"):
        eng.feedback([FeedbackEventIn("big", "v0", events[0].item_id, "conversion", value=1.7e308)])
    assert eng.feedback(events).accepted == len(events)
    data, text, _ = eng.experiment_report("policy")
    json.dumps(data, allow_nan=False)  # every number finite (or None)
    assert "inf" not in text and "nan" not in text
    eng.close(snapshot=False)


# -- 9. two servers on one port -----------------------------------------------------------------------------

def test_second_server_on_a_taken_port_refuses_to_start(tmp_path):
    """gRPC's SO_REUSEPORT let two servers share a port and split the traffic between two states."""
    from conftest import free_port
    from recsvc.server import serve

    port = free_port()
    channel, close = start_server(small_config(tmp_path / "a", server={"port": port}))
    try:
        errors, second_ready, stop_second = [], threading.Event(), threading.Event()

        def second():
            try:
                serve(small_config(tmp_path / "b", server={"port": port}), stop_event=stop_second,
                      on_ready=lambda _: second_ready.set())
            except Exception as exc:  # noqa: BLE001 - inspected below
                errors.append(exc)

        t = threading.Thread(target=second, daemon=True)
        t.start()
        while t.is_alive() and not second_ready.wait(0.05):
            pass
        stop_second.set()
        t.join(30)
        assert not second_ready.is_set(), "a second server started on a taken port"
        assert isinstance(errors[0], OSError)
        assert f"127.0.0.1:{port} is already in use" in str(errors[0]) and "server.port" in str(errors[0])
        # the first server still answers every call
        stub = pb_grpc.RecommenderStub(channel)
        for k in range(5):
            assert len(stub.Recommend(pb.RecommendRequest(user_id=f"p{k}", n=2), timeout=10).items) == 2
    finally:
        close()


# -- 7. overload is shed, not queued ------------------------------------------------------------------------

def slow_engine_factory(delay_s: float, slow: threading.Event):
    """Engines whose Recommend takes ``delay_s`` longer while ``slow`` is set (a stand-in for a busy CPU)."""
    from recsvc.engine import Engine

    def factory(c):
        eng = Engine.from_config(c)
        real = eng.recommend

        def recommend(q, *a, **kw):
            if slow.is_set():
                time.sleep(delay_s)
            return real(q, *a, **kw)

        eng.recommend = recommend
        return eng

    return factory


def _concurrently(calls):
    """Run the zero-argument ``calls`` at once; [(outcome, seconds)] in order (outcome: response or status)."""
    out = [None] * len(calls)

    def run(i):
        t0 = time.monotonic()
        try:
            res = calls[i]()
        except grpc.RpcError as exc:
            res = exc.code()
        out[i] = (res, time.monotonic() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for k, t in enumerate(threads):
        t.start()
        time.sleep(0.02)  # arrive in this order
    for t in threads:
        t.join()
    return out


def test_overload_beyond_the_queue_is_refused_at_once(tmp_path):
    """64 callers queued in the thread pool until their deadlines passed; now what cannot wait is refused."""
    slow = threading.Event()
    cfg = small_config(tmp_path, server={"port": 0, "max_workers": 1, "max_queued_rpcs": 1})
    channel, close = start_server(cfg, engine_factory=slow_engine_factory(0.3, slow))
    try:
        stub = pb_grpc.RecommenderStub(channel)
        slow.set()
        results = _concurrently([lambda k=k: stub.Recommend(pb.RecommendRequest(user_id=f"o{k}", n=3), timeout=5)
                                 for k in range(6)])
        ok = [r for r, _ in results if isinstance(r, pb.RecommendResponse)]
        refused = [s for r, s in results if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(ok) == 2 and len(refused) == 4, results  # one running, one waiting
        assert max(refused) < 0.25  # refused at once: waiting would take >= 0.3 s
    finally:
        slow.clear()
        close()


def test_call_whose_deadline_ran_out_in_the_queue_is_refused_not_started(tmp_path):
    """A call that waited until its deadline left less than server.min_deadline_ms used to start anyway and
    end in DEADLINE_EXCEEDED; it is refused with RESOURCE_EXHAUSTED (retryable) before its deadline."""
    slow = threading.Event()
    cfg = small_config(tmp_path, server={"port": 0, "max_workers": 1, "max_queued_rpcs": 4,
                                         "min_deadline_ms": 250})
    channel, close = start_server(cfg, engine_factory=slow_engine_factory(0.3, slow))
    try:
        stub = pb_grpc.RecommenderStub(channel)
        slow.set()
        (first, _), (second, took) = _concurrently([
            lambda: stub.Recommend(pb.RecommendRequest(user_id="first", n=3), timeout=5),
            lambda: stub.Recommend(pb.RecommendRequest(user_id="second", n=3), timeout=0.45),
        ])
        assert isinstance(first, pb.RecommendResponse)
        assert second == grpc.StatusCode.RESOURCE_EXHAUSTED and took < 0.45
    finally:
        slow.clear()
        close()


def test_time_queued_counts_against_the_budget(tmp_path):
    """Without a caller deadline, a call that waited past budgets.total_ms for a worker still planned a full
    pipeline; the wait now counts, so it comes back degraded."""
    slow = threading.Event()
    cfg = small_config(tmp_path, server={"port": 0, "max_workers": 1, "max_queued_rpcs": 4})
    channel, close = start_server(cfg, engine_factory=slow_engine_factory(0.3, slow))
    try:
        stub = pb_grpc.RecommenderStub(channel)
        slow.set()
        (first, _), (second, _) = _concurrently([
            lambda: stub.Recommend(pb.RecommendRequest(user_id="first", n=3)),
            lambda: stub.Recommend(pb.RecommendRequest(user_id="second", n=3)),
        ])
        assert not first.degraded and second.degraded and len(second.items) == 3
    finally:
        slow.clear()
        close()


def test_queued_ms_counts_against_the_budget_in_process(greedy_engine):
    from recsvc.engine import RecommendQuery

    assert not greedy_engine.recommend(RecommendQuery(user_id="q", n=5)).degraded
    rec = greedy_engine.recommend(RecommendQuery(user_id="q", n=5, queued_ms=greedy_engine.cfg.budgets.total_ms + 1))
    assert rec.degraded and len(rec.items) == 5
