"""Typed records of the event log, their one codec, and the outcome rules of a served slate.

Everything that changes the online state is one of four records, appended to the log before it is
applied (so a restart, a replica or a read-only reader replays the same sequence):

- :class:`FeedbackBatch` — validated, de-duplicated feedback events of one call;
- :class:`ServedSlate` — a slate served to a user (for attribution, experiments and training);
- :class:`CatalogUpsert` and :class:`CatalogDelete` — catalog changes.

:func:`encode` and :func:`decode` are the only place that knows the on-disk form (a JSON object with
short keys, unchanged from earlier releases so existing logs and snapshots still load).

Outcome rules (one place; the live state and the read-only served-log reader both use them): per
(slate, item) the outcome goes ``NOTHING -> IMPRESSED -> CLICKED``. An attributed impression is a
failure at once; a click or conversion on an impressed item turns that failure into a success; a click
whose impression never came counts as an impression and a success. An event is attributed to a slate
only within the half-open window ``[served_at, served_at + attribution_window_ms)``; the feedback path
refuses an event stamped before its slate was served.

Experiment counts (:func:`count_for_experiment`): per (slate, item) at most one impression, one click and
one conversion, what a two-proportion test assumes; a click or conversion whose impression never came
counts that impression too (as the bandit does).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Union

import numpy as np

from recsvc.catalog import ItemRecord

__all__ = [
    "EventType", "FeedbackEvent", "FeedbackBatch", "ServedSlate", "CatalogUpsert", "CatalogDelete",
    "LogRecord", "Outcome", "encode", "decode", "encode_served", "settle", "attributed", "count_for_experiment",
]


class EventType(IntEnum):
    """Feedback event types; the numbers are the API's (``recsvc.v1.EventType``)."""

    IMPRESSION = 1
    CLICK = 2
    CONVERSION = 3

    @property
    def label(self) -> str:
        """``"impression"``, ``"click"`` or ``"conversion"`` (experiment aggregates, reports)."""
        return self.name.lower()

    @property
    def positive(self) -> bool:
        """Clicks and conversions: they teach popularity, co-occurrence and history."""
        return self is not EventType.IMPRESSION

    @classmethod
    def parse(cls, value: int | str) -> "EventType | None":
        """The type named by an API number, a name in any case, or ``None`` when it is neither."""
        t = _PARSE.get(value)  # the usual spellings in one lookup (this runs once per event)
        if t is None and isinstance(value, str):
            t = _PARSE.get(value.lower())
        return t


_PARSE: dict[int | str, EventType] = {k: t for t in EventType for k in (int(t), t.name.lower(), t.name)}


class Outcome(IntEnum):
    """What feedback a served item has had, per slate."""

    NOTHING = 0
    IMPRESSED = 1  # counted as a failure
    CLICKED = 2  # counted as a success


def settle(outcome: int, etype: EventType) -> tuple[Outcome, float, float, bool]:
    """The outcome after ``etype``, with the change to (successes, failures) and whether it is a new impression."""
    if etype is EventType.IMPRESSION:
        if outcome == Outcome.NOTHING:
            return Outcome.IMPRESSED, 0.0, 1.0, True
        return Outcome(outcome), 0.0, 0.0, False
    if outcome == Outcome.NOTHING:
        return Outcome.CLICKED, 1.0, 0.0, True
    if outcome == Outcome.IMPRESSED:
        return Outcome.CLICKED, 1.0, -1.0, False
    return Outcome.CLICKED, 0.0, 0.0, False


def attributed(served_at_ms: int, event_ms: int, window_ms: float) -> bool:
    """Whether an event at ``event_ms`` counts for a slate served at ``served_at_ms``: the half-open window
    ``[served_at_ms, served_at_ms + window_ms)`` (an event stamped before its slate was served never does)."""
    return 0 <= event_ms - served_at_ms < window_ms


_COUNTED_BIT = {"impression": 1, "click": 2, "conversion": 4}


def count_for_experiment(counted: int, etype: EventType) -> tuple[int, tuple[str, ...]]:
    """(flags after ``etype``, what the experiment aggregates count for it) for one (slate, item).

    ``counted`` holds what was already counted (bits: impression 1, click 2, conversion 4). Each of an
    impression, a click and a conversion is counted at most once; a click or conversion counts the
    impression too when none was counted yet.
    """
    bit = _COUNTED_BIT[etype.label]
    labels: list[str] = []
    if etype.positive and not counted & 1:
        labels.append("impression")
        counted |= 1
    if not counted & bit:
        labels.append(etype.label)
        counted |= bit
    return counted, tuple(labels)


@dataclass(slots=True)
class FeedbackEvent:
    """One validated event, resolved to its catalog row."""

    event_id: str
    user_id: str
    item_id: str
    row: int
    type: EventType
    value: float
    ts_ms: int
    request_id: str = ""


@dataclass(slots=True)
class FeedbackBatch:
    events: list[FeedbackEvent]


@dataclass(slots=True)
class ServedSlate:
    """A served slate: who got which rows with which propensities, and in which experiment arms."""

    request_id: str
    user_id: str
    variant: str
    arms: list[tuple[str, str]]
    rows: list[int]
    propensities: list[float]
    served_at_ms: int
    features: bytes = b""  # float32 [k, F] of the served items, for training (b"" when not ranked)
    feature_names: list[str] = field(default_factory=list)
    diversity: float | None = None  # intra-list diversity when served (experiment aggregates)
    novelty: float | None = None
    #: row -> Outcome, per served item, updated as feedback arrives
    outcome: dict[int, int] = field(default_factory=dict)
    #: row -> what the experiment aggregates have counted for it (count_for_experiment's flags)
    counted: dict[int, int] = field(default_factory=dict)
    #: served uniformly at random (exploration.random_share): its propensities are exact
    random_slice: bool = False
    #: what the random slice gives each eligible item of this request: need / eligible pool (OPE validation)
    random_p: float | None = None
    #: random-slice slates only, per served item: the probability that the main policy (the variant's
    #: exploration and re-ranking, what the request would have got outside the slice) serves it in this
    #: request (0 allowed); empty otherwise. The exact reverse direction of ``recsvc ope --validate``.
    target_propensities: list[float] = field(default_factory=list)

    def feature_block(self) -> np.ndarray | None:
        """The logged features as float32 [k, F], or None when the slate was not ranked."""
        if not self.features or not self.feature_names:
            return None
        return np.frombuffer(self.features, np.float32).reshape(len(self.rows), len(self.feature_names))


@dataclass(slots=True)
class CatalogUpsert:
    items: list[ItemRecord]


@dataclass(slots=True)
class CatalogDelete:
    item_ids: list[str]


LogRecord = Union[FeedbackBatch, ServedSlate, CatalogUpsert, CatalogDelete]


# -- the codec ---------------------------------------------------------------------------------------
def encode(rec: LogRecord) -> dict[str, Any]:
    """The log's JSON object for a record (the store adds ``lsn``)."""
    if isinstance(rec, FeedbackBatch):
        return {"t": "fb", "e": [{"id": e.event_id, "u": e.user_id, "row": e.row, "type": int(e.type),
                                  "value": e.value, "ts": e.ts_ms, "req": e.request_id, "item": e.item_id}
                                 for e in rec.events]}
    if isinstance(rec, ServedSlate):
        return encode_served(rec, with_outcome=False)
    if isinstance(rec, CatalogUpsert):
        return {"t": "upsert", "items": [_item_to_json(r) for r in rec.items]}
    if isinstance(rec, CatalogDelete):
        return {"t": "delete", "ids": list(rec.item_ids)}
    raise TypeError(f"not a log record: {type(rec).__name__}")


def encode_served(s: ServedSlate, with_outcome: bool) -> dict[str, Any]:
    """A served slate as JSON; snapshots keep its outcome, the log does not (feedback rebuilds it)."""
    d: dict[str, Any] = {"t": "served", "r": s.request_id, "u": s.user_id, "v": s.variant,
                         "arms": [list(a) for a in s.arms], "rows": s.rows, "p": s.propensities,
                         "ts": s.served_at_ms, "f": base64.b64encode(s.features).decode() if s.features else "",
                         "fn": s.feature_names, "div": s.diversity, "nov": s.novelty}
    if s.random_slice:
        d["rs"] = True
    if s.random_p is not None:
        d["rp"] = s.random_p
    if s.target_propensities:
        d["tp"] = s.target_propensities
    if with_outcome:
        d["o"] = {str(k): int(v) for k, v in s.outcome.items()}
        d["c"] = {str(k): int(v) for k, v in s.counted.items()}
    return d


def decode(d: dict[str, Any]) -> LogRecord:
    """The record of a log (or snapshot) JSON object; ``KeyError``/``ValueError`` when it is malformed."""
    t = d["t"]
    if t == "fb":
        return FeedbackBatch([FeedbackEvent(e["id"], e["u"], e.get("item", ""), int(e["row"]),
                                            EventType(int(e["type"])), float(e["value"]), int(e["ts"]),
                                            e.get("req") or "") for e in d["e"]])
    if t == "served":
        return ServedSlate(d["r"], d["u"], d["v"], [(str(a[0]), str(a[1])) for a in d.get("arms", [])],
                           [int(r) for r in d["rows"]], [float(p) for p in d["p"]], int(d["ts"]),
                           base64.b64decode(d["f"]) if d.get("f") else b"", list(d.get("fn", [])),
                           d.get("div"), d.get("nov"),
                           {int(k): int(v) for k, v in d.get("o", {}).items()},
                           {int(k): int(v) for k, v in d.get("c", {}).items()}, bool(d.get("rs", False)),
                           d.get("rp"), [float(p) for p in d.get("tp", ())])
    if t == "upsert":
        return CatalogUpsert([_item_from_json(x) for x in d["items"]])
    if t == "delete":
        return CatalogDelete(list(d["ids"]))
    raise ValueError(f"unknown log record type {t!r}")


def _item_to_json(r: ItemRecord) -> dict[str, Any]:
    return {"id": r.item_id, "emb": base64.b64encode(np.asarray(r.embedding, np.float32).tobytes()).decode(),
            "cat": r.category, "mat": r.maturity, "ts": r.created_at_ms, "attrs": r.attributes}


def _item_from_json(d: dict[str, Any]) -> ItemRecord:
    emb = np.frombuffer(base64.b64decode(d["emb"]), np.float32)
    return ItemRecord(d["id"], emb, d["cat"], int(d["mat"]), int(d["ts"]), 0.0, dict(d.get("attrs", {})))
