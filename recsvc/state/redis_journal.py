"""The shared journal: a Redis Stream as the ordered event log of every worker and replica.

Keys (all under ``state.redis_prefix``, default ``recsvc``)::

    {p}:log              the stream; entry field ``r`` = one record (the JSON of recsvc.state.records)
    {p}:ev:{event_id}    de-duplication marker, TTL = state.dedupe_ttl_s
    {p}:slate:{req_id}   a served slate, TTL = state.attribution_window_s (any replica validates feedback on it)
    {p}:snapshot         hash: ``id`` (the stream id it covers), ``data`` (a tar of the snapshot directory)
    {p}:snapshot-lock    held (with a TTL) by the replica writing a snapshot
    {p}:trimmed-to       every stream entry below this id has been trimmed

Writes:
- **Feedback** goes through one Lua script: ``SET NX`` of each event's marker, then one ``XADD`` of the
  events that were new — de-duplication and append in one atomic step. The call is acknowledged only after
  Redis accepted it; with ``appendonly yes`` and ``appendfsync always`` that means it is on Redis's disk, the
  embedded backend's guarantee (``everysec``: up to a second of acknowledged events can be lost with the
  Redis host; no AOF: everything since Redis's last RDB save).
- **Catalog changes** are one ``XADD`` each, acknowledged after Redis accepted them.
- **Served slates** come from the request path, which never waits on the network: they are queued and a
  writer thread sends them (``SET`` with a TTL and ``XADD``, in one ``MULTI``) a few at a time.

Reads: a consumer thread tails the stream (``XREAD BLOCK``) and applies every entry — this process's own
included — to the local read model under the ingest lock, so every replica applies the same sequence and
converges to the same state. A write waits (a few milliseconds) until its own entry is applied, so a caller
reads its own writes on the replica it wrote to. The request path reads only the local read model; when the
consumer has not heard from Redis for ``state.max_staleness_ms``, responses are marked degraded.

Start-up: the newest snapshot (from Redis), then the stream after the id it covers. Snapshots are written by
one replica at a time (a lock with a TTL) every ``state.snapshot_every_events`` entries; the stream is trimmed
only below the id the *previous* snapshot covers (``XTRIM MINID``), so a replica a little behind still finds
every entry it has not applied; one cut off for longer (its next entry was trimmed) says so, marks its
responses degraded and must be restarted (it then recovers from the newest snapshot).

Faults: Redis unreachable — reads keep serving from the read model; Feedback, UpsertItems and DeleteItems
raise ``Unavailable`` (nothing is acknowledged that was not stored); served slates wait in a bounded queue
(then are dropped and counted); every thread reconnects on its own.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

from recsvc.config import Config
from recsvc.catalog import CatalogError
from recsvc.errors import InvalidArgument, Unavailable
from recsvc.state.records import (
    FeedbackBatch,
    FeedbackEvent,
    LogRecord,
    ServedSlate,
    decode,
    encode,
    encode_served,
)

log = logging.getLogger("recsvc.state.redis")

# KEYS: stream, event-marker prefix. ARGV: ttl ms, then (event id, event JSON) pairs.
# Returns {stream id or false, the ids that were new}.
_COMMIT_FEEDBACK = """
local kept, ids = {}, {}
for i = 2, #ARGV, 2 do
  if redis.call('SET', KEYS[2] .. ARGV[i], '1', 'NX', 'PX', ARGV[1]) then
    kept[#kept + 1] = ARGV[i + 1]
    ids[#ids + 1] = ARGV[i]
  end
end
if #kept == 0 then return {false, ids} end
local id = redis.call('XADD', KEYS[1], '*', 'r', '{"t":"fb","e":[' .. table.concat(kept, ',') .. ']}')
return {id, ids}
"""

# KEYS: stream, slate-key prefix. ARGV: ttl ms, then (request id, slate JSON) pairs. A slate is appended
# only if its key was new: a batch resent after a lost reply adds nothing twice.
_PUBLISH_SERVED = """
for i = 2, #ARGV, 2 do
  if redis.call('SET', KEYS[2] .. ARGV[i], ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    redis.call('XADD', KEYS[1], '*', 'r', ARGV[i + 1])
  end
end
return 1
"""

# KEYS: snapshot hash, stream, trimmed-to. ARGV: new id, data. Store only a newer snapshot; trim the stream
# below the previous one and record where it was trimmed — all or nothing.
_STORE_SNAPSHOT = """
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local cur = redis.call('HGET', KEYS[1], 'id')
if cur and not newer(ARGV[1], cur) then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'data', ARGV[2])
if cur then
  redis.call('XTRIM', KEYS[2], 'MINID', cur)
  redis.call('SET', KEYS[3], cur)
end
return 1
"""

# KEYS: lock. ARGV: token. Delete the lock only if this writer still holds it.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_SERVED_QUEUE_MAX = 50_000
_SKIPPABLE = (KeyError, ValueError, TypeError)  # a record that cannot apply here (as recovery skips them)
_APPLY_WAIT_S = 5.0


def stream_id(value: str | bytes) -> tuple[int, int]:
    """``"1700000000000-3"`` -> (1700000000000, 3): stream ids compare as such tuples."""
    ms, _, seq = (value.decode() if isinstance(value, bytes) else value).partition("-")
    return int(ms), int(seq or 0)


class RedisJournal:
    """The shared journal over one Redis (see the module docstring)."""

    shared = True
    durable = True

    def __init__(self, cfg: Config, client: Any = None) -> None:
        import redis

        st = cfg.state
        self._redis = client if client is not None else redis.Redis.from_url(
            st.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=10)
        p = st.redis_prefix
        self.key_log, self.key_snapshot, self.key_lock = f"{p}:log", f"{p}:snapshot", f"{p}:snapshot-lock"
        self.key_trimmed = f"{p}:trimmed-to"
        self._ev_prefix, self._slate_prefix = f"{p}:ev:", f"{p}:slate:"
        ttl_s = st.dedupe_ttl_s if st.dedupe_ttl_s is not None else st.max_event_age_days * 86_400 + 3600
        self._dedupe_ttl_ms = int(ttl_s * 1000)
        self._slate_ttl_ms = max(int(st.attribution_window_s * 1000), 1)
        self._staleness_s = st.max_staleness_ms / 1000.0
        self._commit = self._redis.register_script(_COMMIT_FEEDBACK)
        self._publish = self._redis.register_script(_PUBLISH_SERVED)
        self._store_snapshot = self._redis.register_script(_STORE_SNAPSHOT)
        self._release = self._redis.register_script(_RELEASE_LOCK)
        self.ingest = threading.Lock()  # the consumer applies under it; snapshots take their cut under it
        self.served = threading.Lock()
        self.since_snapshot = 0
        self._applied = "0-0"
        self._applied_cond = threading.Condition()
        self._last_contact = time.monotonic()
        self._apply: Callable[[LogRecord], None] | None = None
        self._on_batch: Callable[[], None] | None = None
        self._closed = threading.Event()
        self._consumer: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._served_queue: deque[ServedSlate] = deque()
        self._pending: dict[str, ServedSlate] = {}  # queued, not yet in Redis, by request id
        self._publish_lock = threading.Lock()  # the writer thread and a synchronous flush of one slate
        #: set when the consumer met an error it must not skip: it stops applying, responses are degraded,
        #: and this replica writes no snapshot (its state may be wrong); restart it
        self.failed = False
        self._served_wake = threading.Event()
        self.served_dropped = 0  # served slates lost while Redis was unreachable and the queue full
        #: set when entries this replica never applied were trimmed (it must restart); responses are degraded
        self.behind_trim = False
        self._snapshot_tmp: list[Path] = []
        self._latest: tuple[str | int, Path | None] | None = None

    # -- positions ------------------------------------------------------------------------------------
    @property
    def lsn(self) -> str:
        """The stream id of the last entry applied to the local read model."""
        return self._applied

    def stale(self) -> bool:
        return self.behind_trim or self.failed or time.monotonic() - self._last_contact > self._staleness_s

    def _read_after(self, after: str, count: int) -> list:
        """Up to ``count`` entries after ``after``, read in one transaction with the trim point: raises
        ``TrimmedAway`` when entries this replica has not applied were trimmed (they would be skipped
        silently otherwise)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self.key_trimmed)
        pipe.xrange(self.key_log, min="-" if after in ("0", "0-0") else f"({after}", max="+", count=count)
        trimmed, entries = pipe.execute()
        if trimmed is not None and stream_id(trimmed) > stream_id(after):
            raise TrimmedAway(trimmed.decode(), after)
        return entries

    def staleness_s(self) -> float:
        """Seconds since the consumer last heard from Redis."""
        return time.monotonic() - self._last_contact

    # -- writes ---------------------------------------------------------------------------------------
    def commit_feedback(self, batch: FeedbackBatch) -> tuple[list[FeedbackEvent], str | None]:
        """Append the events not seen before, atomically with their de-duplication; (the new ones, stream id)."""
        args: list[Any] = [self._dedupe_ttl_ms]
        for ev, doc in zip(batch.events, encode(batch)["e"]):
            args += [ev.event_id, json.dumps(doc, separators=(",", ":"), ensure_ascii=False)]
        try:
            entry, new_ids = self._commit(keys=[self.key_log, self._ev_prefix], args=args)
        except Exception as exc:  # redis.ConnectionError, TimeoutError, ...
            raise _unavailable(exc, "nothing in this batch was recorded") from None
        new = {i.decode() if isinstance(i, bytes) else i for i in new_ids}
        fresh = [ev for ev in batch.events if ev.event_id in new]
        return fresh, (entry.decode() if isinstance(entry, bytes) else entry) if entry else None

    def append(self, records: list[LogRecord], durable: bool, weight: int | None = None) -> str:
        """Append records (catalog changes) to the stream; returns the last entry's id."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            for rec in records:
                pipe.xadd(self.key_log, {"r": _json(encode(rec))})
            ids = pipe.execute()
        except Exception as exc:
            raise _unavailable(exc, "nothing was changed") from None
        return ids[-1].decode() if isinstance(ids[-1], bytes) else ids[-1]

    def publish_served(self, slate: ServedSlate) -> None:
        """Queue a served slate for the writer thread (never blocks the request path)."""
        if len(self._served_queue) >= _SERVED_QUEUE_MAX:
            self.served_dropped += 1
            return
        self._pending[slate.request_id] = slate
        self._served_queue.append(slate)
        self._served_wake.set()

    def fetch_served(self, request_ids: set[str], wait_s: float = 0.2) -> dict[str, ServedSlate]:
        """Slates served by this or another replica that this read model has not applied yet (feedback may
        reach a replica before the stream does): one ``MGET`` for a batch, then one bounded wait for the rest.

        A slate this replica still has queued is sent first, synchronously, so it precedes the feedback in the
        stream. Raises ``Unavailable`` (retryable) when some are missing while this replica's writer is behind:
        they may be among the slates it has not sent yet."""
        found: dict[str, ServedSlate] = {}
        try:
            mine = [self._pending[r] for r in request_ids if r in self._pending]
            if mine:
                self._send_slates(mine)
                found.update((sl.request_id, sl) for sl in mine)
            missing = [r for r in request_ids if r not in found]
            deadline = time.monotonic() + wait_s
            while missing:
                for rid, raw in zip(missing, self._redis.mget([self._slate_prefix + r for r in missing])):
                    if raw is not None:
                        slate = decode(json.loads(raw))
                        if isinstance(slate, ServedSlate):
                            found[rid] = slate
                missing = [r for r in missing if r not in found]
                if not missing or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        except Exception as exc:
            raise _unavailable(exc, "the request_ids could not be checked") from None
        if missing and self._served_queue:
            raise Unavailable(f"{len(missing)} request_id(s) are not in the shared log yet ({len(self._served_queue)} "
                              "served slates are waiting to be written); retry shortly")
        return found

    def wait_applied(self, entry: str | None, timeout: float = _APPLY_WAIT_S) -> bool:
        """Wait until the consumer has applied ``entry`` (read-your-writes on this replica)."""
        if entry is None:
            return True
        target = stream_id(entry)
        with self._applied_cond:
            return self._applied_cond.wait_for(lambda: stream_id(self._applied) >= target, timeout)

    # -- the consumer -----------------------------------------------------------------------------------
    def replay(self, after: str | int) -> Iterator[tuple[str, LogRecord | Exception]]:
        """The stream after ``after`` (start-up), in order; the consumer later continues from the last one.

        Raises ``TrimmedAway`` when the stream was trimmed past ``after`` (a newer snapshot was written while
        this replica started): start again from the newest snapshot."""
        self._applied = "0-0" if after in (0, "0", "0-0") else str(after)
        while True:
            entries = self._read_after(self._applied, 1000)
            if not entries:
                return
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    rec: LogRecord | Exception = decode(json.loads(fields[b"r"]))
                except (KeyError, ValueError, TypeError) as exc:
                    rec = exc
                self._applied = eid
                yield eid, rec

    def forget_snapshot(self) -> None:
        """Read the newest snapshot again at the next ``latest_snapshot`` (after ``TrimmedAway``)."""
        self._latest = None

    def start(self, apply: Callable[[LogRecord], None], on_batch: Callable[[], None] | None = None) -> None:
        """Start the consumer (from the last id replayed) and the served-slate writer.

        ``apply`` runs under the ingest lock for each entry; ``on_batch`` after each batch of entries (e.g. to
        start a snapshot when one is due)."""
        self._apply = apply
        self._on_batch = on_batch
        self._last_contact = time.monotonic()
        self._consumer = threading.Thread(target=self._consume, name="recsvc-redis-consumer", daemon=True)
        self._writer = threading.Thread(target=self._write_served, name="recsvc-redis-writer", daemon=True)
        self._consumer.start()
        self._writer.start()

    def _consume(self) -> None:
        backoff = 0.05
        while not self._closed.is_set() and not self.failed and not self.behind_trim:
            try:
                entries = self._read_after(self._applied, 1000)
                if not entries:  # wait for new entries, then read them with the trim point
                    self._redis.xread({self.key_log: self._applied}, count=1, block=100)
                    self._last_contact = time.monotonic()
                    continue
            except TrimmedAway as exc:
                log.error("this replica is behind the shared log's trimmed history (applied %s, trimmed up to %s): "
                          "its state can no longer catch up; restart it to recover from the newest snapshot",
                          exc.after, exc.trimmed)
                self.behind_trim = True
                return
            except Exception as exc:
                if self._closed.is_set():
                    return
                log.warning("redis consumer: %s; retrying in %.2f s", exc, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            self._last_contact = time.monotonic()
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                with self.ingest:  # the record and its position move together (a snapshot's cut)
                    try:
                        rec = decode(json.loads(fields[b"r"]))
                        self._apply(rec)  # type: ignore[misc]
                        self.since_snapshot += len(rec.events) if isinstance(rec, FeedbackBatch) else 1
                    except (InvalidArgument, CatalogError, *_SKIPPABLE) as exc:
                        # validated before it was logged: it applies on no replica (recovery skips it too)
                        log.error("skipping stream entry %s: %s", eid, exc)
                    except Exception:
                        log.exception("stream entry %s failed to apply; this replica stops applying the log and "
                                      "serves degraded: restart it", eid)
                        self.failed = True
                        return
                    self._applied = eid
                with self._applied_cond:
                    self._applied_cond.notify_all()
            if self._on_batch is not None:
                self._on_batch()

    def _write_served(self) -> None:
        while not self._closed.is_set():
            if not self._served_queue:
                self._served_wake.wait(0.1)
                self._served_wake.clear()
                continue
            batch = [self._served_queue[i] for i in range(min(len(self._served_queue), 200))]
            try:
                self._send_slates(batch)
            except Exception as exc:
                log.warning("redis served-slate writer: %s; %d slates waiting", exc, len(self._served_queue))
                self._closed.wait(0.2)
                continue
            for _ in batch:
                self._served_queue.popleft()

    def _send_slates(self, slates: list[ServedSlate]) -> None:
        """Store slates (key with TTL, and the stream) idempotently; they leave the pending set."""
        args: list[Any] = [self._slate_ttl_ms]
        for sl in slates:
            args += [sl.request_id, _json(encode_served(sl, with_outcome=False))]
        with self._publish_lock:
            self._publish(keys=[self.key_log, self._slate_prefix], args=args)
            for sl in slates:
                self._pending.pop(sl.request_id, None)

    def flush_served(self, timeout: float = 5.0) -> bool:
        """Wait until every queued served slate was sent (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._served_queue and time.monotonic() < deadline:
            self._served_wake.set()
            time.sleep(0.002)
        return not self._served_queue

    # -- snapshots --------------------------------------------------------------------------------------
    def latest_snapshot(self) -> tuple[str | int, Path | None]:
        """(the stream id it covers, a local directory with its files) or (0, None); read once per process."""
        if self._latest is not None:
            return self._latest
        try:
            got = self._redis.hmget(self.key_snapshot, ["id", "data"])
        except Exception as exc:
            raise _unavailable(exc, "the newest snapshot could not be read") from None
        if got[0] is None or got[1] is None:
            self._latest = (0, None)
            return self._latest
        directory = Path(tempfile.mkdtemp(prefix="recsvc-snapshot-"))
        self._snapshot_tmp.append(directory)
        with tarfile.open(fileobj=io.BytesIO(got[1]), mode="r") as tar:
            tar.extractall(directory, filter="data")
        self._latest = (got[0].decode(), directory)
        return self._latest

    def write_snapshot(self, lsn: str, write: Callable[[Path], None]) -> None:
        """Write the snapshot's files locally, then store them in Redis (one replica at a time) and trim the
        stream below the id it covers."""
        if self.failed or self.behind_trim:
            log.error("no snapshot from this replica: its state is not known to be right (restart it)")
            return
        token = f"{time.time_ns()}"
        if not self._redis.set(self.key_lock, token, nx=True, px=120_000):
            return  # another replica is writing one
        try:
            with tempfile.TemporaryDirectory(prefix="recsvc-snapshot-") as tmp:
                write(Path(tmp))
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    for path in sorted(Path(tmp).rglob("*")):
                        tar.add(path, arcname=str(path.relative_to(tmp)), recursive=False)
            # Stored only if newer than the one there; the stream is trimmed below the previous one, so a
            # replica a little behind this cut still finds every entry it has not applied.
            self._store_snapshot(keys=[self.key_snapshot, self.key_log, self.key_trimmed], args=[lsn, buf.getvalue()])
        finally:
            self._release(keys=[self.key_lock], args=[token])

    def sync(self) -> None:
        return None

    def close(self) -> None:
        self.flush_served(timeout=2.0)
        self._closed.set()
        self._served_wake.set()
        for t in (self._consumer, self._writer):
            if t is not None:
                t.join(5.0)
        for d in self._snapshot_tmp:
            shutil.rmtree(d, ignore_errors=True)
        try:
            self._redis.close()
        except Exception:
            pass


class TrimmedAway(RuntimeError):
    """Entries after the replica's position were trimmed from the stream: it must restart from a snapshot."""

    def __init__(self, trimmed: str, after: str) -> None:
        super().__init__(f"the shared log was trimmed up to {trimmed}, past this replica's position {after}")
        self.trimmed, self.after = trimmed, after


def _json(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _unavailable(exc: Exception, what: str) -> Unavailable:
    log.error("redis: %s", exc)
    return Unavailable(f"the shared state (Redis) cannot be reached ({type(exc).__name__}: {exc}); {what}, "
                       "retry later")
