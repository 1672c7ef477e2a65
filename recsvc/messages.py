"""The in-process API's plain request and response types (the gRPC servicer converts to and from these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass
class RecommendQuery:
    user_id: str
    n: int = 0
    user_embedding: Sequence[float] | None = None
    context: Mapping[str, str] = field(default_factory=dict)
    exclude_item_ids: Sequence[str] = ()
    allowed_categories: Sequence[str] = ()
    blocked_categories: Sequence[str] = ()
    max_maturity: int = 0
    debug: bool = False
    #: Time budget for this call in ms (0: the configured budget). The gRPC
    #: layer passes the caller's deadline here.
    budget_ms: float = 0.0
    #: How long the request already waited to be served, in ms (the gRPC layer: for a worker); it counts
    #: against ``budgets.total_ms``.
    queued_ms: float = 0.0
    #: Per-request re-ranking rules (keys of ``RerankingConfig``: max_per_category,
    #: mmr_lambda, freshness_boost, long_tail_boost, pinned, sponsored_items,
    #: sponsored_positions), applied on top of the configured/variant rules.
    rerank: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class SlateItem:
    item_id: str
    #: the item's score after exploration and boosts; 0 for a pinned or sponsored item that was not among
    #: the ranked candidates (placed, not ranked)
    score: float
    category: str
    sources: list[str]
    position: int
    propensity: float
    sponsored: bool = False
    debug: dict[str, float] = field(default_factory=dict)


@dataclass
class Recommendation:
    request_id: str
    items: list[SlateItem]
    variant: str
    timings_us: dict[str, int]
    degraded: bool
    #: why ``degraded``: "candidates_cut", "ranking_skipped", "mmr_skipped", "stale_state"
    degraded_reasons: list[str] = field(default_factory=list)
    random_slice: bool = False  # served uniformly at random (exploration.random_share); in-process only for now


@dataclass
class FeedbackEventIn:
    event_id: str
    user_id: str
    item_id: str
    type: int | str  # an EventType number or name ("click"); anything else is rejected with a reason
    request_id: str = ""
    value: float = 0.0
    timestamp_ms: int = 0


@dataclass
class RejectedEvent:
    index: int
    event_id: str
    reason: str


@dataclass
class FeedbackResult:
    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]


@dataclass
class ItemIn:
    item_id: str
    embedding: Sequence[float]
    category: str = ""
    maturity: int = 0
    created_at_ms: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)
