"""The online-state interface: what the request path reads and what the feedback path writes.

The request path and retrieval depend on :class:`OnlineStateReader` only; the feedback path and the
catalog writer on :class:`OnlineStateWriter`; no module outside ``recsvc.state`` touches a backend's
arrays, dicts or keys. Reads are local and never wait on a network: a backend shared by several
processes (e.g. one that tails a Redis stream) keeps a local read model up to date in the background
and answers these calls from it, so the request path does not change with the backend.

Rows are catalog rows (``int32``/``int64`` arrays or lists); times are epoch milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from recsvc.state.records import EventType, FeedbackEvent, ServedSlate


@runtime_checkable
class OnlineStateReader(Protocol):
    """Reads of the request path (pure: nothing here changes the state)."""

    def history(self, user_id: str) -> list[tuple[int, int]]:
        """The user's most recent positive interactions as (row, ts_ms), oldest first."""

    def bandit_evidence(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 (successes, failures) of each row; the posterior is the prior plus these."""

    def total_impressions(self) -> float:
        """Attributed impressions so far, over all items (UCB's exploration term)."""

    def log_popularity(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        """float32 ``log(1 + decayed popularity)`` of each row at ``now_ms``."""

    def decayed_popularity(self, now_ms: int) -> np.ndarray:
        """float64 decayed popularity of every row at ``now_ms`` (a new array)."""

    def interaction_counts(self, rows: np.ndarray) -> np.ndarray:
        """float64 positive interactions (clicks and conversions) of each row, not decayed."""

    def relative_popularity(self, rows: np.ndarray) -> np.ndarray:
        """float64 values proportional to the rows' decayed popularity (the factor moves with time, the order
        does not): for comparing items with each other."""

    def popularity_share(self, rows: np.ndarray) -> np.ndarray:
        """float64 each row's share of all decayed interactions (0 when there are none)."""

    def popularity_percentile(self, now_ms: int, size: int) -> np.ndarray:
        """float32[size]: each row's popularity percentile in [0, 1] (recomputed at most every few seconds)."""

    def top_popular(self) -> np.ndarray:
        """int32 rows of the most popular live items, most popular first."""

    def neighbour_lists(self, recent_rows: list[int], weights: list[float]
                        ) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
        """Co-occurrence neighbours (int32 rows, float64 scores) of each recent item that has any, with its weight."""

    def neighbour_counts(self, recent_rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every co-occurrence neighbour of the recent items with its raw count, flattened: (int32 neighbour
        rows, float64 counts, int32 index into ``recent_rows`` of the item each belongs to)."""

    def served_slate(self, request_id: str, features: bool = True) -> ServedSlate | None:
        """A slate served within the served-log bound (for validating feedback), or None: a copy (changing it
        changes nothing in the state). ``features=False`` leaves its logged features out (``b""``): decoding
        them is most of the cost of a lookup, and validation does not need them."""

    def attributed_slate(self, request_id: str, ts_ms: int, features: bool = True) -> ServedSlate | None:
        """The served slate an event at ``ts_ms`` is attributed to: known and within the attribution window."""

    def seen_event(self, event_id: str) -> bool:
        """Whether an event id was applied within the dedupe window."""

    def served_slates(self) -> Sequence[ServedSlate]:
        """A copy of the remembered served slates, oldest first (training, off-policy evaluation): a sequence
        that decodes each slate as it is read."""


@runtime_checkable
class OnlineStateWriter(Protocol):
    """Writes of the feedback path and the catalog writer (one writer at a time)."""

    applied_lsn: int

    def apply_feedback(self, events: Sequence[FeedbackEvent]) -> list[tuple[tuple[str, str], ...] | None]:
        """Apply validated, de-duplicated events in order; returns, per event, the experiment arms of the slate it
        was attributed to (``()`` when that slate was in no experiment), or None when it was not attributed."""

    def apply_feedback_counted(
        self, events: Sequence[FeedbackEvent]
    ) -> list[tuple[tuple[tuple[str, str], ...] | None, tuple[str, ...]]]:
        """:meth:`apply_feedback`, with, per event, what the experiment aggregates count for it
        (:meth:`count_for_experiment`, settled in the same look-up of its slate): (arms or None, labels)."""

    def remember_served(self, slate: ServedSlate) -> None:
        """Remember a served slate (with its outcome and counted flags); the oldest leave beyond the bound."""

    def count_for_experiment(self, request_id: str, row: int, etype: EventType) -> tuple[str, ...]:
        """What the experiment aggregates count for an attributed event on ``row`` of a remembered slate
        (:func:`recsvc.state.records.count_for_experiment`), remembering it; ``()`` for an unknown slate."""

    def seed_popularity(self, rows: np.ndarray, counts: np.ndarray, now_ms: int) -> None:
        """Initial popularity (e.g. from catalog metadata), as if observed at ``now_ms``."""

    def ensure_capacity(self, capacity: int) -> None:
        """Make room for rows ``< capacity`` (before a catalog grows)."""

    def drop_items(self, rows: np.ndarray) -> None:
        """Deleted items leave the popular list and the co-occurrence tables."""

    def max_referenced_row(self) -> int:
        """The highest catalog row the state refers to (-1 when none): checks a state belongs to its catalog."""

    def snapshot_cut(self, lsn):
        """A copy of the state at ``lsn``, taken while every writer waits (milliseconds); its ``write(directory)``
        writes the snapshot files afterwards, with writers running again."""

    def write_snapshot(self, directory: Path, served: Sequence[ServedSlate] | None = None) -> None: ...

    def read_snapshot(self, directory: Path) -> None: ...


class OnlineState(OnlineStateReader, OnlineStateWriter, Protocol):
    """Both sides, as one backend provides them."""
