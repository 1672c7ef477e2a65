"""The gRPC servicer: proto -> plain types -> Engine -> proto. No logic here."""

from __future__ import annotations

import json

import grpc

from recsvc.engine import Engine, FeedbackEventIn, ItemIn, RecommendQuery
from recsvc.server.admission import queued_ms
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RecommendResponse:
        budget_ms = float(request.budget_ms)
        remaining = context.time_remaining()  # what the caller's deadline leaves (time queued is spent)
        if remaining is not None:
            # Leave a little room for serialisation and the network.
            deadline_ms = max(remaining * 1000.0 - 1.0, 0.1)
            budget_ms = min(budget_ms, deadline_ms) if budget_ms > 0 else deadline_ms
        f = request.filter
        rec = self.engine.recommend(RecommendQuery(
            user_id=request.user_id,
            n=request.n,
            user_embedding=list(request.user_embedding) or None,
            context=dict(request.context),
            exclude_item_ids=list(request.exclude_item_ids),
            allowed_categories=list(f.allowed_categories),
            blocked_categories=list(f.blocked_categories),
            max_maturity=f.max_maturity,
            debug=request.debug,
            budget_ms=budget_ms,
            queued_ms=queued_ms(),
            rerank=_rules(request.rerank) if request.HasField("rerank") else {},
        ))
        response = pb.RecommendResponse(
            request_id=rec.request_id,
            variant=rec.variant,
            timings=pb.StageTimings(**rec.timings_us),
            degraded=rec.degraded,
            degraded_reasons=rec.degraded_reasons,
            random_slice=rec.random_slice,
        )
        # items added in place (half the cost of building ScoredItem messages and copying them in); the
        # debug map only when there is one (an empty map argument still costs a conversion)
        add = response.items.add
        for i in rec.items:
            item = add(item_id=i.item_id, score=i.score, category=i.category, sources=i.sources,
                       position=i.position, propensity=i.propensity, sponsored=i.sponsored)
            if i.debug:
                item.debug.update(i.debug)
        return response

    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackResponse:
        # An unknown enum number reaches the engine as is, so its rejection names it.
        result = self.engine.feedback([
            FeedbackEventIn(event_id=e.event_id, user_id=e.user_id, item_id=e.item_id, type=int(e.type),
                            request_id=e.request_id, value=e.value, timestamp_ms=e.timestamp_ms)
            for e in request.events
        ])
        return pb.FeedbackResponse(
            accepted=result.accepted, duplicates=result.duplicates,
            rejected=[pb.RejectedEvent(index=r.index, event_id=r.event_id, reason=r.reason)
                      for r in result.rejected],
        )

    def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext) -> pb.UpsertItemsResponse:
        inserted, updated = self.engine.upsert_items([
            ItemIn(item_id=i.item_id, embedding=list(i.embedding), category=i.category,
                   maturity=i.maturity, created_at_ms=i.created_at_ms, attributes=dict(i.attributes))
            for i in request.items
        ])
        return pb.UpsertItemsResponse(inserted=inserted, updated=updated)

    def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.ServicerContext) -> pb.DeleteItemsResponse:
        deleted, missing = self.engine.delete_items(list(request.item_ids))
        return pb.DeleteItemsResponse(deleted=deleted, not_found=missing)

    def GetExperimentReport(self, request, context):
        data, text, png = self.engine.experiment_report(request.experiment, request.plot_metric)
        return pb.GetExperimentReportResponse(report_json=json.dumps(data), report_text=text, plot_png=png)

    def ReloadRanker(self, request, context):
        files, _ = self.engine.reload()  # the reloadable config keys, then the weights (logged)
        return pb.ReloadRankerResponse(reloaded=files)


def _rules(r: pb.RerankRules) -> dict:
    """Only the fields the caller set (proto3 `optional` keeps presence)."""
    out: dict = {}
    for name in ("max_per_category", "mmr_lambda", "freshness_boost", "long_tail_boost"):
        if r.HasField(name):
            out[name] = getattr(r, name)
    if r.pinned:
        out["pinned"] = dict(r.pinned)
    if r.sponsored_item_ids or r.sponsored_positions:
        out["sponsored_items"] = list(r.sponsored_item_ids)
        out["sponsored_positions"] = list(r.sponsored_positions)
    return out
