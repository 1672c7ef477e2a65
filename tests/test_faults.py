"""Issue 13: faults that reached callers, and validation gaps — each test named after what broke.

Most run through a real server on a free loopback port (as callers see it) and in process.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

import grpc
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
