"""Online state that feedback updates and retrieval/ranking read.

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
  Rule: an attributed impression counts as a failure at once; a click or
  conversion on an impression of the same slate turns that failure into a
  success (so "an impression without a click" is a failure, with no timers);
  a click whose impression was never reported counts as impression + success.
  Only events with a request_id (served by us) touch the bandit, and only
  within ``state.attribution_window_s`` of the slate being served.
- **Co-occurrence**: for each positive event (click/conversion) of user u on
  item j, every distinct item i among u's last ``cooccurrence_window``
  interactions gets ``C[i][j] += 1`` and ``C[j][i] += 1``; neighbours are scored
  with cosine normalisation ``C[i][j] / sqrt(n_i * n_j)``; each item's
  neighbour table is pruned to the strongest ``4 * cooccurrence_neighbors``.
- **History**: each user's most recent positive interactions (bounded).
- **Served slates** (request id -> user, variant, rows, propensities): bounded,
  for attribution and validation of feedback.
- **Seen event ids** (bounded, most recent) for idempotency.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.config import Config

IMPRESSION, CLICK, CONVERSION = 1, 2, 3
EVENT_TYPE_NAMES = {IMPRESSION: "impression", CLICK: "click", CONVERSION: "conversion"}
_MAX_EXPONENT = 60.0  # rebase popularity before 2^exponent loses precision


@dataclass
class ServedSlate:
    request_id: str
    user_id: str
    variant: str
    arms: list[list[str]]
    rows: list[int]
    propensities: list[float]
    served_at_ms: int
    features: str = ""  # base64 float32 [k, F] of the served items (for training)
    feature_names: list[str] = field(default_factory=list)
    # row -> 0 nothing seen yet, 1 impression counted (failure), 2 success counted
    outcome: dict[int, int] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"t": "served", "r": self.request_id, "u": self.user_id, "v": self.variant,
                "arms": self.arms, "rows": self.rows, "p": self.propensities,
                "ts": self.served_at_ms, "f": self.features, "fn": self.feature_names}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "ServedSlate":
        return cls(rec["r"], rec["u"], rec["v"], [list(a) for a in rec.get("arms", [])],
                   [int(r) for r in rec["rows"]], [float(p) for p in rec["p"]], int(rec["ts"]),
                   rec.get("f", ""), list(rec.get("fn", [])),
                   {int(k): int(v) for k, v in rec.get("o", {}).items()})


class OnlineState:
    """All mutable online state; feedback ingestion is its only writer."""

    def __init__(self, cfg: Config, capacity: int, now_ms: int = 0) -> None:
        self.cfg = cfg
        self.lock = threading.RLock()  # held by the single writer (ingest, snapshot)
        r = cfg.retrieval
        self.half_life_ms = r.popularity_half_life_days * 86_400_000.0
        self.pop_t0_ms = float(now_ms)
        self.popularity_acc = np.zeros(capacity, np.float64)
        self.top_k = max(2 * r.shares.get("popular", 100), 1000)
        self.top_popular = np.empty(0, np.int32)
        self.successes = np.zeros(capacity, np.float64)
        self.failures = np.zeros(capacity, np.float64)
        self.item_events = np.zeros(capacity, np.float64)  # positive interactions (co-occurrence n_i)
        self.total_impressions = 0.0
        self.cooc: dict[int, dict[int, float]] = {}
        self._neigh_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.histories: dict[str, deque[tuple[int, int]]] = {}
        self.served: OrderedDict[str, ServedSlate] = OrderedDict()
        self.seen_events: OrderedDict[str, None] = OrderedDict()
        self.applied_lsn = 0

    # -- capacity ---------------------------------------------------------------
    def ensure_capacity(self, capacity: int) -> None:
        if capacity <= self.popularity_acc.size:
            return
        new = max(capacity, int(self.popularity_acc.size * 1.5) + 16)
        for name in ("popularity_acc", "successes", "failures", "item_events"):
            old = getattr(self, name)
            grown = np.zeros(new, old.dtype)
            grown[: old.size] = old
            setattr(self, name, grown)

    # -- popularity ---------------------------------------------------------------
    def seed_popularity(self, rows: np.ndarray, counts: np.ndarray, now_ms: int) -> None:
        """Initial popularity (e.g. from catalog metadata), as if observed now."""
        self.ensure_capacity(int(rows.max()) + 1 if rows.size else 0)
        self._rebase(now_ms)
        scale = 2.0 ** ((now_ms - self.pop_t0_ms) / self.half_life_ms)
        self.popularity_acc[rows] += counts.astype(np.float64) * scale
        self._refresh_top(rows)

    def _rebase(self, now_ms: float) -> None:
        exponent = (now_ms - self.pop_t0_ms) / self.half_life_ms
        if exponent > _MAX_EXPONENT:
            self.popularity_acc *= 2.0 ** (-exponent)
            self.pop_t0_ms = float(now_ms)

    def popularity(self, now_ms: int) -> np.ndarray:
        """Decayed popularity of every row at ``now_ms`` (float64 view scaled)."""
        return self.popularity_acc * 2.0 ** (-(now_ms - self.pop_t0_ms) / self.half_life_ms)

    def popularity_scale(self, now_ms: int) -> float:
        return 2.0 ** (-(now_ms - self.pop_t0_ms) / self.half_life_ms)

    def _refresh_top(self, touched: np.ndarray, dead: np.ndarray | None = None) -> None:
        cand = np.union1d(self.top_popular, touched.astype(np.int32))
        if dead is not None and dead.size:
            cand = np.setdiff1d(cand, dead)
        acc = self.popularity_acc[cand]
        if cand.size > self.top_k:
            keep = np.argpartition(-acc, self.top_k - 1)[: self.top_k]
            cand, acc = cand[keep], acc[keep]
        self.top_popular = cand[np.argsort(-acc, kind="stable")].astype(np.int32)

    def drop_items(self, rows: np.ndarray) -> None:
        """Deleted items leave the popular list and the co-occurrence tables."""
        with self.lock:
            self._refresh_top(np.empty(0, np.int32), dead=rows)
            for row in rows.tolist():
                neigh = self.cooc.pop(row, None)
                self._neigh_cache.pop(row, None)
                if neigh:
                    for other in neigh:
                        self.cooc.get(other, {}).pop(row, None)
                        self._neigh_cache.pop(other, None)

    # -- bandit ------------------------------------------------------------------
    def bandit_params(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        e = self.cfg.exploration
        s, f = self.successes[rows], self.failures[rows]
        return e.prior_alpha + s, e.prior_beta + f, s + f

    def _bandit_update(self, row: int, success: float, failure: float) -> None:
        gamma = self.cfg.exploration.discount
        if gamma < 1.0:
            self.successes[row] *= gamma
            self.failures[row] *= gamma
        self.successes[row] = max(0.0, self.successes[row] + success)
        self.failures[row] = max(0.0, self.failures[row] + failure)

    # -- history and co-occurrence ---------------------------------------------------
    def history(self, user_id: str) -> list[tuple[int, int]]:
        h = self.histories.get(user_id)
        return list(h) if h else []

    def _record_positive(self, user_id: str, row: int, ts_ms: int) -> None:
        r = self.cfg.retrieval
        hist = self.histories.get(user_id)
        if hist is None:
            hist = self.histories[user_id] = deque(maxlen=r.history_size)
        recent: list[int] = []
        seen = {row}
        for prev, _ in reversed(hist):
            if prev not in seen:
                seen.add(prev)
                recent.append(prev)
                if len(recent) >= r.cooccurrence_window:
                    break
        self.item_events[row] += 1.0
        cache = self._neigh_cache
        cache.pop(row, None)
        for prev in recent:
            cache.pop(prev, None)
        limit = 4 * r.cooccurrence_neighbors
        row_table = self.cooc.setdefault(row, {})
        for prev in recent:
            row_table[prev] = row_table.get(prev, 0.0) + 1.0
            t = self.cooc.setdefault(prev, {})
            t[row] = t.get(row, 0.0) + 1.0
            if len(t) > 2 * limit:
                self._prune(prev, limit)
        if len(row_table) > 2 * limit:
            self._prune(row, limit)
        hist.append((row, ts_ms))

    def _prune(self, row: int, limit: int) -> None:
        table = self.cooc[row]
        keep = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:limit]
        self.cooc[row] = dict(keep)

    def _neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The item's top neighbours as arrays (rows, cosine-normalised scores).

        Cached per item and rebuilt when the item's own table changes; a
        neighbour's count n_j moving on its own does not invalidate the entry
        (a small, bounded staleness in the normalisation).
        """
        cached = self._neigh_cache.get(row)
        if cached is not None:
            return cached
        table = self.cooc.get(row)
        if not table:
            return None
        pairs = list(table.items())  # one pass: keys and values of the same dict state
        others = np.fromiter((k for k, _ in pairs), np.int32, len(pairs))
        counts = np.fromiter((c for _, c in pairs), np.float64, len(pairs))
        k = self.cfg.retrieval.cooccurrence_neighbors
        if others.size > k:
            top = np.argpartition(-counts, k - 1)[:k]
            others, counts = others[top], counts[top]
        n = self.item_events
        scores = counts / np.sqrt(max(n[row], 1.0) * np.maximum(n[others], 1.0))
        entry = (others, scores)
        self._neigh_cache[row] = entry
        return entry

    def neighbour_lists(self, recent_rows: list[int], weights: list[float]
                        ) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
        """The recent items' neighbour arrays (rows, scores) with their recency weights (items with none skipped)."""
        rows, scores, ws = [], [], []
        for row, w in zip(recent_rows, weights):
            entry = self._neighbours(row)
            if entry is not None:
                rows.append(entry[0])
                scores.append(entry[1])
                ws.append(w)
        return rows, scores, ws

    # -- served slates and dedupe --------------------------------------------------
    def remember_served(self, slate: ServedSlate) -> None:
        with self.lock:
            self.served[slate.request_id] = slate
            while len(self.served) > self.cfg.state.served_log_size:
                self.served.popitem(last=False)

    def remember_event(self, event_id: str) -> None:
        self.seen_events[event_id] = None
        while len(self.seen_events) > self.cfg.state.dedupe_window:
            self.seen_events.popitem(last=False)

    # -- applying events -----------------------------------------------------------
    def apply_event(self, ev: dict[str, Any]) -> None:
        """Apply one validated, de-duplicated event (also used by log replay).

        ``ev`` keys: id, u (user), row, type, value, ts, req (request id or "").
        """
        self.remember_event(ev["id"])
        row, etype, ts = int(ev["row"]), int(ev["type"]), int(ev["ts"])
        if row >= self.popularity_acc.size:
            self.ensure_capacity(row + 1)
        slate = self.attributed_slate(ev)
        if slate is not None:
            state = slate.outcome.get(row, 0)
            if etype == IMPRESSION:
                if state == 0:
                    slate.outcome[row] = 1
                    self.total_impressions += 1
                    self._bandit_update(row, 0.0, 1.0)
            elif state == 0:
                slate.outcome[row] = 2
                self.total_impressions += 1
                self._bandit_update(row, 1.0, 0.0)
            elif state == 1:
                slate.outcome[row] = 2
                self._bandit_update(row, 1.0, -1.0)
        if etype in (CLICK, CONVERSION):
            self._rebase(ts)
            self.popularity_acc[row] += 2.0 ** ((ts - self.pop_t0_ms) / self.half_life_ms)
            self._record_positive(ev["u"], row, ts)

    def attributed_slate(self, ev: dict[str, Any]) -> ServedSlate | None:
        """The served slate an event is attributed to, or None (organic).

        An event later than ``attribution_window_s`` after its slate was served
        still updates popularity, co-occurrence and history, but no longer the
        bandit or the experiment: the slate's outcome was settled by then.
        """
        slate = self.served.get(ev.get("req") or "")
        if slate is None:
            return None
        if int(ev["ts"]) - slate.served_at_ms > self.cfg.state.attribution_window_s * 1000.0:
            return None
        return slate

    def refresh_popular(self, touched: np.ndarray) -> None:
        self._refresh_top(touched)

    # -- snapshots -------------------------------------------------------------------
    def write(self, directory: Path, served: list[ServedSlate] | None = None) -> None:
        """Serialise into ``directory``. The caller pauses ingestion (the only
        writer); served slates keep arriving from requests, so they are copied
        under the lock first (or passed in, copied at the caller's cut)."""
        if served is None:
            with self.lock:
                served = list(self.served.values())
        np.savez(directory / "online.npz", popularity_acc=self.popularity_acc,
                 successes=self.successes, failures=self.failures, item_events=self.item_events,
                 top_popular=self.top_popular)
        doc = {
            "pop_t0_ms": self.pop_t0_ms,
            "total_impressions": self.total_impressions,
            "applied_lsn": self.applied_lsn,
            "cooc": {str(k): {str(a): b for a, b in v.items()} for k, v in self.cooc.items()},
            "histories": {u: list(map(list, h)) for u, h in self.histories.items()},
            "served": [dict(s.to_record(), o={str(k): v for k, v in s.outcome.items()})
                       for s in served],
            "seen_events": list(self.seen_events),
        }
        with (directory / "online.json").open("w", encoding="utf-8") as fh:
            json.dump(doc, fh, separators=(",", ":"))

    def read(self, directory: Path) -> None:
        with np.load(directory / "online.npz") as z:
            for name in ("popularity_acc", "successes", "failures", "item_events"):
                arr = z[name]
                self.ensure_capacity(arr.size)
                getattr(self, name)[: arr.size] = arr
            self.top_popular = z["top_popular"].astype(np.int32)
        with (directory / "online.json").open(encoding="utf-8") as fh:
            doc = json.load(fh)
        self.pop_t0_ms = float(doc["pop_t0_ms"])
        self.total_impressions = float(doc["total_impressions"])
        self.applied_lsn = int(doc["applied_lsn"])
        self.cooc = {int(k): {int(a): float(b) for a, b in v.items()} for k, v in doc["cooc"].items()}
        self._neigh_cache = {}
        size = self.cfg.retrieval.history_size
        self.histories = {u: deque(((int(r), int(t)) for r, t in h), maxlen=size)
                          for u, h in doc["histories"].items()}
        self.served = OrderedDict((s["r"], ServedSlate.from_record(s)) for s in doc["served"])
        self.seen_events = OrderedDict((e, None) for e in doc["seen_events"])
