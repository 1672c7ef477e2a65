"""Property: whatever a caller sends, a live server answers with a documented status — never INTERNAL or
UNKNOWN (issue 13, "Proof").

Request messages of every RPC are drawn by hypothesis — extreme numbers (NaN, ±inf, 1e±38, denormals,
int32/int64 limits), empty, long and odd strings (NUL, surrogate-free unicode), wrong dimensions, unknown
enum values, known and unknown ids — and sent through a real server on a free loopback port. The number of
examples is bounded (``EXAMPLES`` per RPC) so the default suite stays fast.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from conftest import small_config

EXAMPLES = int(__import__("os").environ.get("RECSVC_PROPERTY_EXAMPLES", "60"))
DIM = 16  # small_config's catalog

DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
}

EXPERIMENTS = """
[[experiment]]
name = "policy"
salt = "property"
  [[experiment.variant]]
  name = "control"
  weight = 1
  [[experiment.variant]]
  name = "ucb"
  weight = 1
  overrides = { exploration = { policy = "ucb1" }, reranking = { mmr_lambda = 0.3 } }
"""

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    from recsvc.server import serve

    tmp = tmp_path_factory.mktemp("property")
    (tmp / "experiments.toml").write_text(EXPERIMENTS)
    cfg = small_config(tmp, server={"port": 0}, experiments={"file": str(tmp / "experiments.toml")},
                       state={"fsync": "none"})
    stop, started, ready = threading.Event(), threading.Event(), {}

    def on_ready(port):
        ready["port"] = port
        started.set()

    t = threading.Thread(target=serve, args=(cfg,), kwargs={"on_ready": on_ready, "stop_event": stop}, daemon=True)
    t.start()
    assert started.wait(120)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready['port']}",
                                    options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = pb_grpc.RecommenderStub(channel)
    stub.channel = channel
    yield stub
    channel.close()
    stop.set()
    t.join(30)


def status_of(call, request) -> grpc.StatusCode:
    """The call's status; fails unless it is a documented one that the server itself chose (a status made
    up by the transport, e.g. RESOURCE_EXHAUSTED "Stream removed" for an oversized message, is not)."""
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in DOCUMENTED, f"{code.name}: {details} for {request!r:.2000}"
        assert "Stream removed" not in details, f"{code.name}: {details} for {request!r:.2000}"
        return code
    return grpc.StatusCode.OK


# -- strategies ---------------------------------------------------------------------------------------------

INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
FLOAT32 = st.one_of(
    st.floats(width=32),  # NaN, ±inf, denormals, the float32 extremes
    st.sampled_from([0.0, -0.0, 1e-45, 1e-38, 1e19, 3.4e38, -3.4e38, 1.0, -1.0]),
)
FLOAT64 = st.one_of(st.floats(), st.sampled_from([0.0, 1e15, -1e15, 1.7e308, 5e-324]))
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", " ", "\x00", "a\x00", "\x00deleted:1", "cat-01", "item-0001", "item-0042", "policy",
                     "ctr", "conversion_rate", "value_per_user"]),
    st.builds(lambda c, k: c * k, st.sampled_from(["x", "é", "\x00"]), st.sampled_from([101, 5000, 20_000])),
)
ITEM_ID = st.one_of(TEXT, st.integers(0, 2999).map(lambda i: f"item-{i:04d}"))
EMBEDDING = st.one_of(
    st.lists(FLOAT32, min_size=DIM, max_size=DIM),
    st.lists(FLOAT32, max_size=20),
    st.builds(lambda x: [x] * DIM, FLOAT32),
)
SMALL_MAP = st.dictionaries(TEXT, TEXT, max_size=3)

RERANK = st.builds(
    pb.RerankRules,
    max_per_category=st.one_of(st.none(), INT32),
    mmr_lambda=st.one_of(st.none(), FLOAT32),
    freshness_boost=st.one_of(st.none(), FLOAT32),
    long_tail_boost=st.one_of(st.none(), FLOAT32),
    pinned=st.dictionaries(ITEM_ID, st.one_of(st.integers(-2, 12), INT32), max_size=3),
    sponsored_item_ids=st.lists(ITEM_ID, max_size=3),
    sponsored_positions=st.lists(st.one_of(st.integers(-2, 12), INT32), max_size=3),
)

RECOMMEND = st.builds(
    pb.RecommendRequest,
    user_id=TEXT,
    n=st.one_of(st.integers(-2, 30), INT32),
    user_embedding=st.one_of(st.just([]), EMBEDDING),
    context=st.one_of(SMALL_MAP, st.fixed_dictionaries({"hour": TEXT, "device": TEXT})),
    exclude_item_ids=st.lists(ITEM_ID, max_size=3),
    filter=st.builds(pb.Filter, allowed_categories=st.lists(TEXT, max_size=3),
                     blocked_categories=st.lists(TEXT, max_size=3), max_maturity=INT32),
    debug=st.booleans(),
    budget_ms=st.one_of(st.integers(-5, 300), INT32),
    rerank=st.one_of(st.none(), RERANK),
)

EVENT = st.builds(
    pb.FeedbackEvent,
    event_id=st.one_of(TEXT, st.uuids().map(str)), request_id=TEXT, user_id=TEXT, item_id=ITEM_ID,
    type=st.integers(0, 5),  # 4 and 5 are not in the enum: proto3 keeps them as unknown values
    value=FLOAT64,
    timestamp_ms=st.one_of(st.just(0), INT64),
)

ITEM = st.builds(pb.Item, item_id=ITEM_ID, embedding=EMBEDDING, category=TEXT, maturity=INT32,
                 created_at_ms=st.one_of(st.just(0), INT64), attributes=SMALL_MAP)


# -- properties ----------------------------------------------------------------------------------------------

@SETTINGS
@given(request=RECOMMEND)
def test_recommend_answers_only_documented_statuses(stub, request):
    status_of(stub.Recommend, request)


@SETTINGS
@given(user=st.sampled_from(["fb-a", "fb-b"]), served=st.booleans(), events=st.lists(EVENT, max_size=4))
def test_feedback_answers_only_documented_statuses(stub, user, served, events):
    if served:  # events that name a real slate reach attribution, not only validation
        rec = stub.Recommend(pb.RecommendRequest(user_id=user, n=3), timeout=30)
        for ev, item in zip(events, rec.items):
            ev.request_id, ev.item_id, ev.user_id = rec.request_id, item.item_id, user
    status_of(stub.Feedback, pb.FeedbackRequest(events=events))
    # whatever was accepted, the experiment report still renders
    status_of(stub.GetExperimentReport, pb.GetExperimentReportRequest(experiment="policy"))


@SETTINGS
@given(items=st.lists(ITEM, max_size=3), delete=st.lists(ITEM_ID, max_size=3))
def test_catalog_changes_answer_only_documented_statuses(stub, items, delete):
    status_of(stub.UpsertItems, pb.UpsertItemsRequest(items=items))
    status_of(stub.DeleteItems, pb.DeleteItemsRequest(item_ids=delete))


@settings(SETTINGS, max_examples=EXAMPLES // 3)
@given(experiment=TEXT, plot_metric=st.one_of(st.just(""), TEXT))
def test_experiment_report_answers_only_documented_statuses(stub, experiment, plot_metric):
    status_of(stub.GetExperimentReport,
              pb.GetExperimentReportRequest(experiment=experiment, plot_metric=plot_metric))


@SETTINGS
@given(method=st.sampled_from(["Recommend", "Feedback", "UpsertItems", "DeleteItems", "GetExperimentReport",
                               "ReloadRanker"]),
       payload=st.binary(max_size=64))
def test_undecodable_bytes_answer_only_documented_statuses(stub, method, payload):
    raw = stub.channel.unary_unary(f"/recsvc.v1.Recommender/{method}",
                                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    status_of(raw, payload)


def test_the_server_is_still_healthy_afterwards(stub):
    rec = stub.Recommend(pb.RecommendRequest(user_id="after", n=5), timeout=30)
    assert len(rec.items) == 5
