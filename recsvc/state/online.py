"""The embedded read model: the online state in this process's memory (numpy arrays and dicts).

It implements :class:`~recsvc.state.interface.OnlineState`; the request path reads it through
:class:`~recsvc.state.interface.OnlineStateReader`, the feedback path writes it through
:class:`~recsvc.state.interface.OnlineStateWriter`, and every log record is applied to it (live, on
replay after a restart, and — with a shared backend — as each replica tails the shared stream).

- **Popularity**: exponentially decayed interaction counts. All items decay at
  the same rate, so the state keeps ``acc_i = sum_e 2^((t_e - t0) / h)`` and the
  decayed count at time t is ``acc_i * 2^(-(t - t0) / h)``: one add per event,
  and the order of items never changes with time alone, so the top list is
  maintained incrementally (merged with the rows an event batch touched) instead
  of being re-sorted per request. ``t0`` is moved forward before the
  exponent could overflow.
- **Bandit evidence** per item: successes and failures (the posterior is
  Beta(prior_alpha + successes, prior_beta + failures)); with ``discount`` < 1
  an item's old evidence is multiplied by the discount at each of its updates.
  The outcome rules and the attribution window are
  :func:`recsvc.state.records.settle` and :func:`~recsvc.state.records.attributed`;
  discounting is :func:`recsvc.exploration.update_evidence_row`. Only events
  with a request_id (served by us) touch the bandit.
- **Co-occurrence**: for each positive event (click/conversion) of user u on
  item j, every distinct item i among u's last ``cooccurrence_window``
  interactions gets ``C[i][j] += 1`` and ``C[j][i] += 1``; neighbours are scored
  with cosine normalisation ``C[i][j] / sqrt(n_i * n_j)``; each item's
  neighbour table is pruned to the strongest ``4 * cooccurrence_neighbors``.
- **History**: each user's most recent positive interactions (bounded).
- **Served slates** (request id -> user, variant, rows, propensities, outcomes, logged features): the most
  recent ``served_log_size``, for attribution, validation of feedback, experiments and training, in compact
  columns (:class:`~recsvc.state.served_ring.ServedRing`, a few hundred bytes per slate).
- **Seen event ids** (bounded, most recent) for idempotency.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from recsvc.config import Config
from recsvc.exploration import update_evidence_row
from recsvc.retrieval.kernels import sorted_distinct
from recsvc.state.records import (FeedbackEvent, EventType, ServedSlate, attributed, count_for_experiment, decode,
                                  encode_served, settle)
from recsvc.state.served_ring import ServedCut, ServedRing
from recsvc.state.store import SnapshotDamaged, snapshot_refusal

_MAX_EXPONENT = 60.0  # rebase popularity before 2^exponent loses precision
_PERCENTILE_TTL_MS = 10_000


class ReadModel:
    """All mutable online state of one process; one writer at a time (the ingest lock), many readers.

    Readers run concurrently with the writer, as the request path always has: arrays are updated in
    place element by element and replaced whole when they grow, dicts and lists are swapped in whole
    or mutated by single operations, so a reader sees each value either before or after an update.
    """

    def __init__(self, cfg: Config, capacity: int, now_ms: int = 0) -> None:
        r, e, st = cfg.retrieval, cfg.exploration, cfg.state
        self.lock = threading.RLock()  # held by the single writer (ingest, snapshot)
        self._half_life_ms = r.popularity_half_life_days * 86_400_000.0
        self._history_size = r.history_size
        self._cooc_window = r.cooccurrence_window
        self._cooc_neighbours = r.cooccurrence_neighbors
        self._discount = e.discount
        self._served_cap = st.served_log_size
        self._dedupe_cap = st.dedupe_window
        self._window_ms = st.attribution_window_s * 1000.0
        self._pop_t0_ms = float(now_ms)
        self._popularity = np.zeros(capacity, np.float64)
        self._top_k = max(2 * r.shares.get("popular", 100), 1000)
        self._top_popular = np.empty(0, np.int32)
        self._successes = np.zeros(capacity, np.float64)
        self._failures = np.zeros(capacity, np.float64)
        self._item_events = np.zeros(capacity, np.float64)  # positive interactions (co-occurrence n_i)
        self._total_impressions = 0.0
        self._cooc: dict[int, dict[int, float]] = {}
        self._neigh_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._count_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # neighbour_counts, same lifetime
        self._histories: dict[str, deque[tuple[int, int]]] = {}
        self._served = ServedRing(self._served_cap)
        self._seen_events: OrderedDict[str, None] = OrderedDict()
        self._pct: tuple[float, np.ndarray] | None = None
        self.applied_lsn = 0

    # -- reads (OnlineStateReader) -------------------------------------------------------------------
    def history(self, user_id: str) -> list[tuple[int, int]]:
        h = self._histories.get(user_id)
        return list(h) if h else []

    def bandit_evidence(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._successes[rows], self._failures[rows]

    def total_impressions(self) -> float:
        return self._total_impressions

    def _scale(self, now_ms: int) -> float:
        return 2.0 ** (-(now_ms - self._pop_t0_ms) / self._half_life_ms)

    def log_popularity(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        return np.log1p(self._popularity[rows] * self._scale(now_ms)).astype(np.float32)

    def relative_popularity(self, rows: np.ndarray) -> np.ndarray:
        return self._popularity[rows]

    def decayed_popularity(self, now_ms: int) -> np.ndarray:
        return self._popularity * self._scale(now_ms)

    def interaction_counts(self, rows: np.ndarray) -> np.ndarray:
        return self._item_events[rows]

    def popularity_share(self, rows: np.ndarray) -> np.ndarray:
        total = float(self._popularity.sum()) or 1.0
        return self._popularity[rows] / total

    def popularity_percentile(self, now_ms: int, size: int) -> np.ndarray:
        cached = self._pct
        if cached is None or now_ms - cached[0] >= _PERCENTILE_TTL_MS or cached[1].size < size:
            pop = self._popularity[:size]
            pct = np.empty(size, np.float32)
            order = np.argsort(pop, kind="stable")
            pct[order] = np.linspace(0.0, 1.0, order.size, dtype=np.float32) if order.size > 1 else 0.0
            cached = self._pct = (now_ms, pct)
        pct = cached[1]
        if pct.size != size:
            pct = np.resize(pct, size) if pct.size > size else np.pad(pct, (0, size - pct.size))
        return pct

    def top_popular(self) -> np.ndarray:
        return self._top_popular

    def neighbour_lists(self, recent_rows: list[int], weights: list[float]
                        ) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
        rows, scores, ws = [], [], []
        cached = self._neigh_cache.get  # (the usual case without a method call per row)
        for row, w in zip(recent_rows, weights):
            entry = cached(row) or self._neighbours(row)
            if entry is not None:
                rows.append(entry[0])
                scores.append(entry[1])
                ws.append(w)
        return rows, scores, ws

    def neighbour_counts(self, recent_rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, counts, owners = [], [], []
        for k, row in enumerate(recent_rows):
            entry = self._count_cache.get(row)
            if entry is None:
                table = self._cooc.get(row)
                if not table:
                    continue
                pairs = list(table.items())  # one pass: keys and values of the same dict state
                entry = (np.fromiter((a for a, _ in pairs), np.int32, len(pairs)),
                         np.fromiter((c for _, c in pairs), np.float64, len(pairs)))
                self._count_cache[row] = entry
            rows.append(entry[0])
            counts.append(entry[1])
            owners.append(np.full(entry[0].size, k, np.int32))
        if not rows:
            return np.empty(0, np.int32), np.empty(0, np.float64), np.empty(0, np.int32)
        return np.concatenate(rows), np.concatenate(counts), np.concatenate(owners)

    def served_slate(self, request_id: str, features: bool = True) -> ServedSlate | None:
        if not request_id:
            return None
        with self.lock:  # the served log's columns change under it (feedback and served slates run side by side)
            return self._served.get(request_id, features)

    def attributed_slate(self, request_id: str, ts_ms: int, features: bool = True) -> ServedSlate | None:
        """An event later than ``attribution_window_s`` after its slate was served still updates popularity,
        co-occurrence and history, but no longer the bandit or the experiment: the slate's outcome was
        settled by then."""
        with self.lock:
            seq = self._attributed(request_id, ts_ms)
            return None if seq is None else self._served.slate_at(seq, features, request_id)

    def _attributed(self, request_id: str, ts_ms: int) -> int | None:
        seq = self._served.locate(request_id) if request_id else None
        if seq is None or not attributed(self._served.served_at(seq), ts_ms, self._window_ms):
            return None
        return seq

    def seen_event(self, event_id: str) -> bool:
        return event_id in self._seen_events

    def served_slates(self) -> ServedCut:
        with self.lock:
            return self._served.cut()

    def served_log_nbytes(self) -> int:
        """Resident bytes of the served-slate log (columns, id strings, lookup), estimated."""
        with self.lock:
            return self._served.nbytes()

    def n_served(self) -> int:
        return len(self._served)

    # -- writes (OnlineStateWriter) ------------------------------------------------------------------
    def ensure_capacity(self, capacity: int) -> None:
        if capacity <= self._popularity.size:
            return
        new = max(capacity, int(self._popularity.size * 1.5) + 16)
        for name in ("_popularity", "_successes", "_failures", "_item_events"):
            old = getattr(self, name)
            grown = np.zeros(new, old.dtype)
            grown[: old.size] = old
            setattr(self, name, grown)

    def seed_popularity(self, rows: np.ndarray, counts: np.ndarray, now_ms: int) -> None:
        self.ensure_capacity(int(rows.max()) + 1 if rows.size else 0)
        self._rebase(now_ms)
        scale = 2.0 ** ((now_ms - self._pop_t0_ms) / self._half_life_ms)
        self._popularity[rows] += counts.astype(np.float64) * scale
        self._refresh_top(rows)

    def apply_feedback(self, events: Sequence[FeedbackEvent]) -> list[tuple[tuple[str, str], ...] | None]:
        return [arms for arms, _ in self._apply_events(events, count=False)]

    def apply_feedback_counted(
        self, events: Sequence[FeedbackEvent]
    ) -> list[tuple[tuple[tuple[str, str], ...] | None, tuple[str, ...]]]:
        return self._apply_events(events, count=True)

    def _apply_events(self, events: Sequence[FeedbackEvent], count: bool):
        out = [self._apply_event(ev, count) for ev in events]
        if events:
            self._refresh_top(np.fromiter((e.row for e in events), np.int32, len(events)))
        return out

    def remember_served(self, slate: ServedSlate) -> None:
        with self.lock:
            self._served.append(slate)

    def count_for_experiment(self, request_id: str, row: int, etype: EventType) -> tuple[str, ...]:
        with self.lock:
            seq = self._served.locate(request_id) if request_id else None
            if seq is None:
                return ()
            counted, labels = count_for_experiment(self._served.outcome_at(seq, row)[1], etype)
            self._served.set_outcome(seq, row, counted=counted)
            return labels

    def drop_items(self, rows: np.ndarray) -> None:
        with self.lock:
            self._refresh_top(np.empty(0, np.int32), dead=rows)
            for row in rows.tolist():
                neigh = self._cooc.pop(row, None)
                self._neigh_cache.pop(row, None)
                self._count_cache.pop(row, None)
                if neigh:
                    for other in neigh:
                        self._cooc.get(other, {}).pop(row, None)
                        self._neigh_cache.pop(other, None)
                        self._count_cache.pop(other, None)

    def max_referenced_row(self) -> int:
        referenced = [self._top_popular, np.fromiter(self._cooc.keys(), np.int64, len(self._cooc))]
        return max((int(a.max()) for a in referenced if a.size), default=-1)

    # -- applying one event ----------------------------------------------------------------------------
    def _apply_event(
        self, ev: FeedbackEvent, count: bool = False
    ) -> tuple[tuple[tuple[str, str], ...] | None, tuple[str, ...]]:
        """(the arms of the slate the event is attributed to, or None; with ``count``, what the experiment
        aggregates count for it — settled in the same look-up, so a slate recorded meanwhile (which may evict
        this one) cannot come between the bandit's count and the experiment's)."""
        self._remember_event(ev.event_id)
        row = ev.row
        if row >= self._popularity.size:
            self.ensure_capacity(row + 1)
        arms, labels = None, ()
        if ev.request_id:
            with self.lock:  # (a served slate may be recorded meanwhile: it moves the columns)
                served = self._served
                seq = served.locate(ev.request_id)
                if seq is not None:
                    served_at, slate_arms = served.served_at_and_arms(seq)
                    if attributed(served_at, ev.ts_ms, self._window_ms):
                        outcome, counted = served.outcome_at(seq, row)
                        outcome, ds, df, new_impression = settle(outcome, ev.type)
                        arms = slate_arms
                        if count and slate_arms:
                            counted, labels = count_for_experiment(counted, ev.type)
                        served.set_outcome(seq, row, outcome=int(outcome), counted=counted)
        if arms is not None:
            if ds or df:
                update_evidence_row(self._successes, self._failures, row, ds, df, self._discount)
            if new_impression:
                self._total_impressions += 1
        if ev.type.positive:
            self._rebase(ev.ts_ms)
            self._popularity[row] += 2.0 ** ((ev.ts_ms - self._pop_t0_ms) / self._half_life_ms)
            self._record_positive(ev.user_id, row, ev.ts_ms)
        return arms, labels

    def _remember_event(self, event_id: str) -> None:
        self._seen_events[event_id] = None
        while len(self._seen_events) > self._dedupe_cap:
            self._seen_events.popitem(last=False)

    # -- popularity ------------------------------------------------------------------------------------
    def _rebase(self, now_ms: float) -> None:
        exponent = (now_ms - self._pop_t0_ms) / self._half_life_ms
        if exponent > _MAX_EXPONENT:
            self._popularity *= 2.0 ** (-exponent)
            self._pop_t0_ms = float(now_ms)

    def _refresh_top(self, touched: np.ndarray, dead: np.ndarray | None = None) -> None:
        cand = sorted_distinct(np.concatenate([self._top_popular, touched.astype(np.int32)]))  # (a union)
        if dead is not None and dead.size:
            cand = cand[~np.isin(cand, dead)]
        acc = self._popularity[cand]
        if cand.size > self._top_k:
            keep = np.argpartition(-acc, self._top_k - 1)[: self._top_k]
            cand, acc = cand[keep], acc[keep]
        self._top_popular = cand[np.argsort(-acc, kind="stable")].astype(np.int32)

    # -- history and co-occurrence ---------------------------------------------------------------------
    def _record_positive(self, user_id: str, row: int, ts_ms: int) -> None:
        hist = self._histories.get(user_id)
        if hist is None:
            hist = self._histories[user_id] = deque(maxlen=self._history_size)
        recent: list[int] = []
        seen = {row}
        for prev, _ in reversed(hist):
            if prev not in seen:
                seen.add(prev)
                recent.append(prev)
                if len(recent) >= self._cooc_window:
                    break
        self._item_events[row] += 1.0
        cache, counts = self._neigh_cache, self._count_cache
        cache.pop(row, None)
        counts.pop(row, None)
        for prev in recent:
            cache.pop(prev, None)
            counts.pop(prev, None)
        limit = 4 * self._cooc_neighbours
        row_table = self._cooc.setdefault(row, {})
        for prev in recent:
            row_table[prev] = row_table.get(prev, 0.0) + 1.0
            t = self._cooc.setdefault(prev, {})
            t[row] = t.get(row, 0.0) + 1.0
            if len(t) > 2 * limit:
                self._prune(prev, limit)
        if len(row_table) > 2 * limit:
            self._prune(row, limit)
        hist.append((row, ts_ms))

    def _prune(self, row: int, limit: int) -> None:
        table = self._cooc[row]
        keep = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:limit]
        self._cooc[row] = dict(keep)

    def _neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The item's top neighbours as arrays (rows, cosine-normalised scores).

        Cached per item and rebuilt when the item's own table changes; a
        neighbour's count n_j moving on its own does not invalidate the entry
        (a small, bounded staleness in the normalisation).
        """
        cached = self._neigh_cache.get(row)
        if cached is not None:
            return cached
        table = self._cooc.get(row)
        if not table:
            return None
        pairs = list(table.items())  # one pass: keys and values of the same dict state
        others = np.fromiter((k for k, _ in pairs), np.int32, len(pairs))
        counts = np.fromiter((c for _, c in pairs), np.float64, len(pairs))
        k = self._cooc_neighbours
        if others.size > k:
            top = np.argpartition(-counts, k - 1)[:k]
            others, counts = others[top], counts[top]
        n = self._item_events
        scores = counts / np.sqrt(max(n[row], 1.0) * np.maximum(n[others], 1.0))
        entry = (others, scores)
        self._neigh_cache[row] = entry
        return entry

    # -- snapshots -------------------------------------------------------------------------------------
    def snapshot_cut(self, lsn: int) -> "OnlineSnapshot":
        """A consistent copy of the state as of log record ``lsn``, to be written to files later.

        The caller holds the ingest and served locks (no writer runs), so this must be quick: it copies
        the arrays (one memcpy each) and the small mutable parts (co-occurrence tables, histories, the served
        slates' block being filled and outcome columns, seen event ids); everything costly — decoding, encoding
        and writing — happens in
        :meth:`OnlineSnapshot.write`, after the locks are released.
        """
        # Copies in C loops (map, zip, dict.copy), not Python ones: this runs with every writer paused.
        # dict's views of the OrderedDicts list them in the same order (their keys are only appended and
        # popped from the front) and several times faster than their own linked list.
        with self.lock:
            return OnlineSnapshot(
                arrays={"popularity_acc": self._popularity.copy(), "successes": self._successes.copy(),
                        "failures": self._failures.copy(), "item_events": self._item_events.copy(),
                        "top_popular": self._top_popular},  # (replaced whole, never changed in place)
                pop_t0_ms=self._pop_t0_ms, total_impressions=self._total_impressions, applied_lsn=lsn,
                cooc=dict(zip(self._cooc.keys(), map(dict.copy, self._cooc.values()))),
                histories=dict(zip(self._histories.keys(), map(tuple, self._histories.values()))),
                served=self._served.cut(),  # outcomes as of the cut; slates decoded as they are written
                seen_events=list(dict.keys(self._seen_events)),
            )

    def write_snapshot(self, directory: Path, served: Sequence[ServedSlate] | None = None) -> None:
        """Cut and write in one go (the caller pauses every writer meanwhile); ``served`` replaces the slates."""
        cut = self.snapshot_cut(self.applied_lsn)
        if served is not None:
            cut.served = served
        cut.write(directory)

    def read_snapshot(self, directory: Path) -> None:
        """Load a snapshot ``write_snapshot`` wrote (its store checked the files against the manifest);
        a file that cannot be read anyway raises ``SnapshotDamaged`` naming it."""
        path = directory / "online.npz"
        try:
            with np.load(path) as z:
                arrays = {name: z[name] for name in ("popularity_acc", "successes", "failures", "item_events",
                                                     "top_popular")}
        except Exception as exc:  # any way a file can be unreadable: BadZipFile, KeyError, ValueError, OSError
            raise SnapshotDamaged(snapshot_refusal(f"{path}: unreadable ({exc})", directory)) from None
        path = directory / "online.json"
        try:
            with path.open(encoding="utf-8") as fh:
                doc = json.load(fh)
            pop_t0_ms = float(doc["pop_t0_ms"])
            total_impressions = float(doc["total_impressions"])
            applied_lsn = doc["applied_lsn"]  # an int (local log) or a stream id (shared log)
            if not isinstance(applied_lsn, (int, str)):
                raise ValueError(f"applied_lsn {applied_lsn!r}")
            cooc = {int(k): {int(a): float(b) for a, b in v.items()} for k, v in doc["cooc"].items()}
            histories = {u: deque(((int(r), int(t)) for r, t in h), maxlen=self._history_size)
                         for u, h in doc["histories"].items()}
            served = ServedRing(self._served_cap)
            for s in doc["served"]:
                served.append(decode(dict(s, t="served")))  # type: ignore[arg-type]
            seen_events = OrderedDict((str(e), None) for e in doc["seen_events"])
        except Exception as exc:
            raise SnapshotDamaged(snapshot_refusal(f"{path}: unreadable ({type(exc).__name__}: {exc})",
                                                   directory)) from None
        for name, attr in (("popularity_acc", "_popularity"), ("successes", "_successes"),
                           ("failures", "_failures"), ("item_events", "_item_events")):
            arr = arrays[name]
            self.ensure_capacity(arr.size)
            getattr(self, attr)[: arr.size] = arr
        self._top_popular = arrays["top_popular"].astype(np.int32)
        self._pop_t0_ms = pop_t0_ms
        self._total_impressions = total_impressions
        self.applied_lsn = applied_lsn
        self._cooc = cooc
        self._neigh_cache = {}
        self._count_cache = {}
        self._histories = histories
        self._served = served
        self._seen_events = seen_events


@dataclass(slots=True)
class OnlineSnapshot:
    """The read model as of one lsn (:meth:`ReadModel.snapshot_cut`), written without holding any lock.

    Files: ``online.npz`` (the per-item arrays) and ``online.json`` (everything else, served slates
    included). The JSON is written piece by piece — a few hundred entries per ``json.dumps`` call — so
    the writing thread lets request threads run in between.
    """

    arrays: dict[str, np.ndarray]
    pop_t0_ms: float
    total_impressions: float
    applied_lsn: int
    cooc: dict[int, dict[int, float]]
    histories: dict[str, tuple[tuple[int, int], ...]]
    served: Sequence[ServedSlate]  # with each slate's outcome and counted flags as of the cut
    seen_events: list[str]

    def write(self, directory: Path) -> None:
        np.savez(directory / "online.npz", **self.arrays)
        with (directory / "online.json").open("w", encoding="utf-8") as fh:
            fh.write(f'{{"pop_t0_ms":{_dumps(self.pop_t0_ms)},"total_impressions":{_dumps(self.total_impressions)},'
                     f'"applied_lsn":{_dumps(self.applied_lsn)},"cooc":{{')
            _write_chunks(fh, self.cooc.items(), lambda chunk: _dumps(dict(chunk))[1:-1])
            fh.write('},"histories":{')
            _write_chunks(fh, self.histories.items(), lambda chunk: _dumps(dict(chunk))[1:-1])
            fh.write('},"served":[')
            _write_chunks(fh, self.served,
                          lambda chunk: ",".join(_dumps(encode_served(s, with_outcome=True)) for s in chunk))
            fh.write('],"seen_events":[')
            _write_chunks(fh, self.seen_events, lambda chunk: _dumps(chunk)[1:-1])
            fh.write("]}")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _write_chunks(fh, items: Iterable, encode: Callable[[list], str], size: int = 256) -> None:
    """Write ``items`` comma-separated, ``size`` at a time (one short encoder call each)."""
    it = iter(items)
    first = True
    while chunk := list(islice(it, size)):
        text = encode(chunk)
        if text:
            fh.write(text if first else "," + text)
            first = False
