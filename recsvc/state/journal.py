"""The write side's one door to the durable log: typed records in, encoded once, and the locks around it.

The feedback path and the catalog writer append through a :class:`Journal`; recovery replays through
it; snapshots take their consistent cut under its locks. Two locks:

- ``ingest`` — held by whoever changes the state from the log's point of view (a feedback batch, a
  catalog change, a snapshot's cut): one writer at a time, in log order;
- ``served`` — held while a served slate enters the state, the aggregates and the log together, so a
  snapshot never sees one without the other (no double count on replay).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

from recsvc.state.records import LogRecord, decode, encode
from recsvc.state.store import MemoryStateStore, StateStore


class Journal:
    """The embedded journal: a local log; the writer applies each record itself right after appending it.

    A shared journal (``recsvc.state.redis_journal.RedisJournal``) has the same methods with
    ``shared = True``: it de-duplicates atomically with the append, and a background consumer applies
    every record — this process's own included — to the local read model, in the shared log's order.
    """

    #: False: the caller applies what it appended. True: the consumer does (wait with ``wait_applied``).
    shared = False

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.ingest = threading.Lock()
        self.served = threading.Lock()
        #: records appended since the last snapshot's cut (a snapshot is due past ``snapshot_every_events``)
        self.since_snapshot = 0

    @property
    def durable(self) -> bool:
        """False for the in-memory store (nothing to snapshot or replay)."""
        return not isinstance(self.store, MemoryStateStore)

    @property
    def lsn(self) -> int:
        """The last log sequence number assigned."""
        return int(getattr(self.store, "lsn", 0))

    def append(self, records: list[LogRecord], durable: bool, weight: int | None = None) -> int:
        """Append records (durable before returning when asked); returns the last lsn.

        ``weight`` is how many events they count as towards the next snapshot (default: one each).
        ``OSError`` from the store propagates: nothing was recorded.
        """
        lsn = self.store.append([encode(r) for r in records], durable=durable)
        self.since_snapshot += len(records) if weight is None else weight
        return lsn

    def replay(self, after_lsn: int) -> Iterator[tuple[int, LogRecord | Exception]]:
        """(lsn, record) after ``after_lsn`` in order; a record that cannot be decoded comes as its exception."""
        for raw in self.store.replay(after_lsn):
            try:
                yield int(raw["lsn"]), decode(raw)
            except (KeyError, ValueError, TypeError) as exc:
                yield int(raw.get("lsn", 0)), exc

    def latest_snapshot(self) -> tuple[int, Path | None]:
        return self.store.latest_snapshot()

    def write_snapshot(self, lsn: int, write: Callable[[Path], None]) -> None:
        self.store.write_snapshot(lsn, write)

    def sync(self) -> None:
        sync = getattr(self.store, "sync", None)
        if sync is not None:
            sync()

    def stale(self) -> bool:
        """Whether the local read model may be further behind the shared log than the staleness bound."""
        return False

    def close(self) -> None:
        self.store.close()
