"""The feedback path: validate, de-duplicate, log, attribute and apply feedback; record served slates.

One Feedback call::

    validate each event (ids, type, item, time, value, its request)  -> RejectedEvent with a reason
    drop event ids already applied or repeated in the batch          -> counted as duplicates
    append the accepted events to the log (durable before the ack)
    apply them to the online state (bandit evidence via the served slate, popularity, co-occurrence,
    history) and count the attributed ones in the experiment aggregates

A batch that is empty, or in which nothing was accepted or a duplicate, is an invalid request
(:class:`FeedbackRejected`, an ``InvalidArgument`` carrying the per-event reasons) for in-process and
gRPC callers alike; a mixed batch succeeds and lists its rejections.

Served slates come from the request path; :meth:`FeedbackPath.record_served` puts them into the log, then
the state and the aggregates (best effort: a slate the log refuses is dropped and counted, never half-kept).
Log replay applies the same records through :meth:`apply`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np

from recsvc.catalog import Catalog
from recsvc.config import Config
from recsvc.errors import InvalidArgument, Unavailable, echo
from recsvc.messages import FeedbackEventIn, FeedbackResult, RejectedEvent
from recsvc.state.interface import OnlineState
from recsvc.state.journal import Journal
from recsvc.state.records import EventType, FeedbackBatch, FeedbackEvent, ServedSlate

log = logging.getLogger("recsvc.feedback")

DAY_MS = 86_400_000
FUTURE_SLACK_MS = 3_600_000  # events may be stamped up to an hour ahead of the server's clock
#: Largest |value| an event may carry (a revenue of 10^15 in any currency unit is beyond any real one):
#: experiment reports sum values and their squares per user, and those sums must stay finite.
MAX_EVENT_VALUE = 1e15
DROP_LOG_INTERVAL_S = 60.0  # at most one log line a minute about served slates the log refused


class FeedbackRejected(InvalidArgument):
    """No event of a batch was usable; ``result`` holds the reason for each."""

    def __init__(self, message: str, result: FeedbackResult) -> None:
        super().__init__(message)
        self.result = result


class FeedbackPath:
    def __init__(self, cfg: Config, catalog: Catalog, state: OnlineState, journal: Journal,
                 aggregates, clock) -> None:
        self._max_batch = cfg.server.max_batch
        self._max_age_days = cfg.state.max_event_age_days
        #: CUPED pre-period length: every event feeds the aggregates' activity table (0: none kept)
        self._pre_days = cfg.experiments.cuped_pre_days
        self.catalog = catalog
        self.state = state
        self.journal = journal
        self.aggregates = aggregates
        self.clock = clock
        #: served slates that could not be logged (and so were not remembered): see :meth:`record_served`
        self.served_dropped = 0
        self._dropped_logged_at = -math.inf

    # -- Feedback ------------------------------------------------------------------------------------
    def ingest(self, events: Sequence[FeedbackEventIn]) -> FeedbackResult:
        if not events:
            raise InvalidArgument("events must not be empty")
        if len(events) > self._max_batch:
            raise InvalidArgument(f"at most {self._max_batch} events per call, got {len(events)}")
        now = self.clock()
        if self.journal.shared:
            # Validation reads the local read model; de-duplication and the append are one atomic step in
            # the shared log, and the consumer applies the batch (this replica waits until it has).
            accepted, rejected, duplicates = self._validate(events, now)
            if accepted:
                fresh, entry = self.journal.commit_feedback(FeedbackBatch(accepted))
                duplicates += len(accepted) - len(fresh)
                accepted = fresh
                if not self.journal.wait_applied(entry):
                    log.warning("feedback %s is stored but not yet applied on this replica", entry)
        else:
            with self.journal.ingest:
                accepted, rejected, duplicates = self._validate(events, now)
                if accepted:
                    # Durable before the ack and before the state changes.
                    batch = FeedbackBatch(accepted)
                    try:
                        lsn = self.journal.append([batch], durable=True, weight=len(accepted))
                    except OSError as exc:
                        log.error("could not write the event log: %s", exc)
                        raise Unavailable(f"the event log cannot be written ({exc.strerror or exc}); "
                                          "nothing in this batch was recorded, retry later") from None
                    self._apply_feedback(batch)
                    self.state.applied_lsn = lsn
        result = FeedbackResult(len(accepted), duplicates, rejected)
        if rejected and not accepted and not duplicates:
            # Nothing in the batch was usable: that is a bad request, not a
            # partial success. (Mixed batches succeed with the rejections.)
            details = "; ".join(f"events[{r.index}]: {r.reason}" for r in rejected[:5])
            more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
            raise FeedbackRejected(f"no event accepted: {details}{more}", result)
        return result

    def _validate(self, events: Sequence[FeedbackEventIn], now: int
                  ) -> tuple[list[FeedbackEvent], list[RejectedEvent], int]:
        """(accepted, rejected with reasons, duplicates) of a batch, against the local read model."""
        oldest = now - int(self._max_age_days * DAY_MS)
        newest = now + FUTURE_SLACK_MS
        rejected: list[RejectedEvent] = []
        duplicates = 0
        accepted: list[FeedbackEvent] = []
        batch_ids: set[str] = set()
        # each slate looked up (and decoded) once per batch, however many of its items the batch names
        slates = {rid: self.state.served_slate(rid, features=False)
                  for rid in {ev.request_id for ev in events if ev.request_id}}
        if self.journal.shared:  # slates served by another replica (or queued here), not applied here yet
            unknown = {rid for rid, slate in slates.items() if slate is None}
            if unknown:
                slates.update(self.journal.fetch_served(unknown))
        for i, ev in enumerate(events):
            etype = EventType.parse(ev.type)
            ts = int(ev.timestamp_ms) or now
            row = self.catalog.row_of.get(ev.item_id)
            reason = None
            if not ev.event_id:
                reason = "event_id is required (it is the idempotency key)"
            elif self.state.seen_event(ev.event_id) or ev.event_id in batch_ids:
                duplicates += 1
                continue
            elif not ev.user_id:
                reason = "user_id is required"
            elif etype is None:
                reason = f"unknown event type {echo(ev.type)}; expected IMPRESSION, CLICK or CONVERSION"
            elif row is None:
                reason = f"unknown item_id {echo(ev.item_id)}"
            elif ts < oldest or ts > newest:
                reason = (f"timestamp_ms {ts} is outside the accepted range "
                          f"[now - {self._max_age_days:g} days, now + 1 h]")
            elif not (math.isfinite(ev.value) and abs(ev.value) <= MAX_EVENT_VALUE):
                reason = f"value must be finite and at most {MAX_EVENT_VALUE:g} in magnitude"
            elif ev.request_id:
                slate = slates.get(ev.request_id)
                if slate is None:
                    reason = f"request_id {echo(ev.request_id)} is unknown or has expired"
                elif row not in slate.rows:
                    reason = f"item {echo(ev.item_id)} was not served in request {echo(ev.request_id)}"
                elif slate.user_id != ev.user_id:
                    reason = f"request {echo(ev.request_id)} was served to another user"
                elif ts < slate.served_at_ms:
                    reason = (f"timestamp_ms {ts} is before request {echo(ev.request_id)} was served "
                              f"({slate.served_at_ms}): feedback cannot precede its slate")
            if reason is not None:
                rejected.append(RejectedEvent(i, ev.event_id, reason))
                continue
            batch_ids.add(ev.event_id)
            accepted.append(FeedbackEvent(ev.event_id, ev.user_id, ev.item_id, int(row), etype,
                                          float(ev.value), ts, ev.request_id or ""))
        return accepted, rejected, duplicates

    def _apply_feedback(self, batch: FeedbackBatch) -> None:
        pre_days = self._pre_days
        for ev, (arms, labels) in zip(batch.events, self.state.apply_feedback_counted(batch.events)):
            if arms:  # attributed to a slate in an experiment
                # per (slate, item) at most one impression, click and conversion (records.count_for_experiment)
                for label in labels:
                    value = ev.value if label == ev.type.label else 0.0
                    self.aggregates.record_event(arms, ev.user_id, label, value, ev.ts_ms)
            else:
                labels = (ev.type.label,)
            if pre_days:  # every user's activity, in an experiment or not: the CUPED pre-periods
                self.aggregates.record_activity(ev.user_id, labels, ev.value if ev.type.label in labels else 0.0,
                                                ev.ts_ms, pre_days)

    # -- served slates ---------------------------------------------------------------------------------
    def record_served(self, slate: ServedSlate) -> bool:
        """A slate the request path served: into the log, then the state and the aggregates (not fsync'd:
        a slate lost in a crash only loses the attribution of its feedback).

        Best effort: when the log cannot be written (a full disk), the slate is dropped — counted in
        :attr:`served_dropped` and logged — and neither the state nor the aggregates see it, so memory
        agrees with the log and a restart rebuilds the same slates. The Recommend is still answered; feedback
        naming its request_id is refused as unknown. Returns whether the slate was recorded.
        """
        if slate.arms:
            slate.diversity, slate.novelty = self.slate_diversity_novelty(slate.rows)
        if self.journal.shared:  # the consumer applies it, here and on every replica
            self.journal.publish_served(slate)
            return True
        with self.journal.served:
            try:
                self.journal.append([slate], durable=False)
            except OSError as exc:
                self._dropped_served(exc)
                return False
            self.state.remember_served(slate)
            self._record_served_aggregates(slate)
        return True

    def _dropped_served(self, exc: OSError) -> None:
        """Count a served slate the log refused; log the first and then at most one line a minute."""
        self.served_dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged_at >= DROP_LOG_INTERVAL_S:
            self._dropped_logged_at = now
            log.warning("could not log a served slate (%s); %d served slate(s) dropped so far: Recommend keeps "
                        "serving, feedback on those slates cannot be attributed", exc.strerror or exc,
                        self.served_dropped)

    def slate_diversity_novelty(self, rows_list: list[int]) -> tuple[float | None, float | None]:
        """Intra-list diversity and novelty of a slate (``recsvc.evaluation.metrics``' definitions, with the
        item's share of all decayed interactions as its popularity), computed once when served and logged
        with it, so a replay reports the same numbers."""
        from recsvc.evaluation.metrics import intra_list_diversity, novelty

        rows = np.asarray(rows_list, np.int64)
        diversity = nov = None
        if rows.size > 1:
            diversity = float(intra_list_diversity(np.arange(rows.size)[None, :], self.catalog.embeddings[rows])[0])
        if rows.size:
            share = np.maximum(self.state.popularity_share(rows), 1e-12)
            nov = float(novelty(np.arange(rows.size)[None, :], share)[0])
        return diversity, nov

    def _record_served_aggregates(self, slate: ServedSlate) -> None:
        if slate.arms:
            self.aggregates.record_served(slate.arms, slate.user_id, slate.rows, slate.served_at_ms,
                                          diversity=slate.diversity, novelty=slate.novelty,
                                          pre_days=self._pre_days)

    def _local_rows(self, batch: FeedbackBatch) -> FeedbackBatch:
        """A shared log's events with this replica's catalog rows (the same when replicas apply the same catalog
        changes from the same base, as they must; an item deleted meanwhile drops its event, logged)."""
        events = []
        for ev in batch.events:
            row = self.catalog.row_of.get(ev.item_id, -1) if ev.item_id else ev.row
            if row < 0:
                log.warning("skipping event %s: item %s is not in this replica's catalog", echo(ev.event_id),
                            echo(ev.item_id))
                continue
            ev.row = row
            events.append(ev)
        return FeedbackBatch(events)

    # -- log replay ----------------------------------------------------------------------------------------
    def apply(self, record: FeedbackBatch | ServedSlate) -> None:
        """Apply a logged feedback batch or served slate (recovery; a replica tailing a shared log)."""
        if isinstance(record, FeedbackBatch):
            if self.journal.shared:
                record = self._local_rows(record)
            self._apply_feedback(record)
        elif self.state.served_slate(record.request_id, features=False) is None:  # (once: never counted twice)
            self.state.remember_served(record)
            self._record_served_aggregates(record)
