"""Candidate sources and their merge (stage 1 of the funnel).

Sources, each returning rows ranked best-first with a score:

- ``ann``: HNSW nearest neighbours of the user embedding, over-fetched so that
  filters never starve it: the fetch size follows the request's filters (their
  estimated pass rate and the number of excluded items), and a fetch that still
  falls short is repeated with twice the size. An allowed-categories filter that
  leaves few items is answered exactly over those categories instead.
- ``cooccurrence``: neighbours of the user's recent items, recency-weighted.
- ``popular``: the maintained top list of decayed popularity.
- ``fresh``: items created within the fresh window, newest first.

The merge takes up to each source's share (from config) of *eligible* rows,
lets unused share flow to the sources that have more, de-duplicates, and keeps
for every row the bitmask of sources that proposed it and each source's score.
When the catalog holds at least ``n_min`` eligible items, the result holds at
least ``n_min`` rows (a popularity scan over the whole catalog is the last
resort).

On the request path (``Retriever.candidates``) only the graph search and the
state's reads run in Python: the filtering of every source, the co-occurrence
aggregation and ranking, the shares and the merge are one compiled call
(``kernels.assemble_candidates``), which filters each source only as far as
the shares reach. The per-source methods below are the same rules one source at
a time (``Retriever.candidates_by_source``, the reference the call is tested
against, bit for bit).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from recsvc.retrieval import kernels as _retrieval
from recsvc.catalog import Catalog
from recsvc.config import RetrievalConfig
from recsvc.retrieval.ann import AnnIndex
from recsvc.retrieval.candidates import SOURCE_NAMES, Candidates
from recsvc.state.interface import OnlineStateReader

DAY_MS = 86_400_000.0


@dataclass(frozen=True)
class RowFilter:
    """A request's filters, resolved to catalog codes."""

    allowed_categories: np.ndarray | None  # bool[C] or None for "all"
    blocked_categories: np.ndarray | None  # bool[C] or None
    max_maturity: int
    exclude_rows: np.ndarray  # int32, sorted

    def kernel_args(self, catalog: Catalog) -> tuple:
        """The filter as the compiled kernels take it (see ``_retrieval.pyx``)."""
        # alive first: a concurrent catalog growth replaces it last, so the
        # other columns read after it are at least as long.
        alive = catalog.alive.view(np.uint8)
        allowed, blocked = self.allowed_categories, self.blocked_categories
        return (alive, catalog.maturity, catalog.categories, min(int(self.max_maturity), _INT32_MAX),
                _NO_MASK if allowed is None else allowed.view(np.uint8), allowed is not None,
                _NO_MASK if blocked is None else blocked.view(np.uint8),
                self.exclude_rows)

    def eligible(self, catalog: Catalog, rows: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``rows`` may be served.

        A category created after the request began (a concurrent upsert) is
        beyond the masks: not allowed, not blocked.
        """
        out = np.empty(rows.size, np.uint8)
        _retrieval.eligible_mask(np.ascontiguousarray(rows, np.int32), *self.kernel_args(catalog), out)
        return out.view(bool)


class Retriever:
    """Runs every source for one request and merges them into ``Candidates``."""

    def __init__(self, catalog: Catalog, ann: AnnIndex, state: OnlineStateReader, usual_ann_fetch: int,
                 fresh_window_days: float) -> None:
        """``usual_ann_fetch`` sets the index's search beam (see :func:`usual_ann_fetch`); every other
        setting comes with each request (the experiment variant's ``RetrievalConfig``)."""
        self.catalog = catalog
        self.ann = ann
        self.state = state
        # the widest fresh window a request has asked for: the fresh index covers it
        self._fresh_window_ms = int(fresh_window_days * DAY_MS)
        self._fresh: tuple[int, int, np.ndarray, np.ndarray] = (-1, 0, np.empty(0, np.int32), np.empty(0, np.int64))
        self._by_category: tuple[int, list[np.ndarray]] = (-1, [])
        self._filter_stats: tuple[int, np.ndarray, np.ndarray, np.ndarray] = (-1, _EMPTY_SCORES, _EMPTY_ROWS,
                                                                              _EMPTY_SCORES)
        # pass_rate of the last request that filtered by maturity only: (the statistics it used, max_maturity, rate)
        self._maturity_rate: tuple[np.ndarray | None, int, float] = (None, 0, 1.0)
        self.catalog_changes = 0  # bumped by catalog_changed()
        self._rebuild_lock = threading.Lock()
        self.ann_ef = ann.tune_for(usual_ann_fetch)

    # -- derived indexes, rebuilt after catalog changes ---------------------------------
    # The writer rebuilds them after its change (catalog_changed) and only then
    # publishes the new version, so requests do not pay: until then they use
    # the previous indexes (the eligibility filter still drops deleted items;
    # a new item shows up a few milliseconds later). Each is swapped in whole.
    # A request rebuilds one itself only the first time, or when the clock has
    # moved back past the fresh index's horizon. At 1M items: fresh ~25 ms,
    # filter statistics ~8 ms, per-category rows ~25 ms (kept only once a
    # request has filtered by allowed categories).
    def catalog_changed(self, now_ms: int) -> None:
        """Called after an upsert or delete: rebuild the derived indexes, then publish the new version."""
        with self._rebuild_lock:  # concurrent writers: the last build sees every change
            version = self.catalog_changes + 1
            try:
                self._fresh_index(now_ms, self._fresh_window_ms, version)
                self._filter_statistics(version)
                if self._by_category[0] != -1:
                    self._category_rows(version)
            finally:  # (should a build fail, requests find the rest stale and rebuild it)
                self.catalog_changes = version

    def derived_versions(self) -> dict[str, int]:
        """The catalog change each derived index was built for (-1: not built yet), and the latest change.

        After a writer's ``catalog_changed`` returns, the built ones are at ``catalog_changes``: requests
        never pay for a rebuild."""
        return {"catalog_changes": self.catalog_changes, "fresh": self._fresh[0],
                "filter_statistics": self._filter_stats[0], "category_rows": self._by_category[0]}

    def _fresh_index(self, now_ms: int, window_ms: int, rebuild_as: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Items created at or after ``now - window - slack``, newest first, with their negated creation times.

        Only items young enough at the rebuild are kept and sorted: as time
        moves on, items leave the window but none enter it (new items come
        with a catalog change, which rebuilds). The slack covers requests that
        read the clock just before the writer did; a clock set back further
        rebuilds.
        """
        cached = self._fresh
        if window_ms > self._fresh_window_ms:  # a variant with a wider window: cover it from now on
            self._fresh_window_ms = window_ms
        horizon = now_ms - self._fresh_window_ms
        if rebuild_as is not None or cached[0] < self.catalog_changes or horizon < cached[1]:
            version = self.catalog_changes if rebuild_as is None else rebuild_as
            keep_from = horizon - _FRESH_SLACK_MS
            cat = self.catalog
            n = cat.n_rows
            created = cat.created_at_ms[:n]
            rows = np.flatnonzero((created >= keep_from) & cat.alive[:n]).astype(np.int32)
            created = created[rows]
            order = np.argsort(-created, kind="stable")
            # newest first; the negated times ascend, ready for searchsorted
            cached = (version, keep_from, rows[order], -created[order])
            if self._fresh[0] <= version:  # never over a newer build (a writer's)
                self._fresh = cached
        return cached[2], cached[3]

    def _category_rows(self, rebuild_as: int | None = None) -> list[np.ndarray]:
        cached = self._by_category
        if rebuild_as is not None or cached[0] < self.catalog_changes:
            version = self.catalog_changes if rebuild_as is None else rebuild_as
            cat = self.catalog
            rows = cat.alive_rows()
            codes = cat.categories[rows]
            n_cat = cat.n_categories
            if n_cat < 2 ** 15:
                codes = codes.astype(np.int16)  # numpy's stable sort of 16-bit keys is a radix sort
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(n_cat + 1))
            cached = (version, [rows[order[bounds[c]:bounds[c + 1]]] for c in range(n_cat)])
            if self._by_category[0] <= version:  # never over a newer build (a writer's)
                self._by_category = cached
        return cached[1]

    def _filter_statistics(self, rebuild_as: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Live items per category (as fractions), and the sorted distinct maturities with their cumulative fractions."""
        cached = self._filter_stats
        if rebuild_as is not None or cached[0] < self.catalog_changes:
            version = self.catalog_changes if rebuild_as is None else rebuild_as
            cat = self.catalog
            n = cat.n_rows
            live = cat.alive[:n]
            cats, mat = cat.categories[:n], cat.maturity[:n]
            if not live.all():
                cats, mat = cats[live], mat[live]
            total = max(cats.size, 1)
            per_cat = np.bincount(cats, minlength=max(cat.n_categories, 1)) / total
            if mat.size and 0 <= mat.min() and mat.max() <= 4096:  # the usual small scale: linear
                counts = np.bincount(mat)
                levels = np.flatnonzero(counts).astype(np.int32)
                counts = counts[levels]
            else:
                levels, counts = np.unique(mat, return_counts=True)
            cached = (version, per_cat, levels, np.cumsum(counts) / total)
            if self._filter_stats[0] <= version:  # never over a newer build (a writer's)
                self._filter_stats = cached
        return cached[1], cached[2], cached[3]

    def pass_rate(self, flt: RowFilter) -> float:
        """Estimated share of the live catalog the category and maturity filters let through.

        Categories and maturity are taken as independent; the excluded items
        are counted separately (``ann_fetch``).
        """
        per_cat, levels, cum = self._filter_statistics()
        by_maturity = flt.allowed_categories is None and flt.blocked_categories is None
        if by_maturity:  # the usual request: the service's maturity ceiling only, the same rate every time
            last = self._maturity_rate
            if last[0] is cum and last[1] == flt.max_maturity:
                return last[2]
        rate = 1.0
        if not by_maturity:
            passes = np.ones(per_cat.size, bool)
            if flt.allowed_categories is not None:
                m = flt.allowed_categories[: per_cat.size]
                passes[: m.size] &= m
                passes[m.size:] = False  # codes beyond the mask are not allowed
            if flt.blocked_categories is not None:
                m = flt.blocked_categories[: per_cat.size]
                passes[: m.size] &= ~m
            rate = float(per_cat[passes].sum())
        at = int(np.searchsorted(levels, flt.max_maturity, side="right"))
        rate *= float(cum[at - 1]) if at else 0.0
        rate = min(max(rate, 0.0), 1.0) if rate > 1e-9 else 0.0  # (sums of fractions round)
        if by_maturity:
            self._maturity_rate = (cum, flt.max_maturity, rate)  # (replaced whole: requests run side by side)
        return rate

    def ann_fetch(self, want: int, flt: RowFilter, overfetch: float) -> int:
        """ANN neighbours to fetch so that ``want`` survive the filters in one query (usually).

        A user whose excluded items crowd the nearest neighbours beyond what the
        retries reach (16x the share) gets fewer ANN rows; the other sources
        then fill the candidate set.
        """
        rate = max(self.pass_rate(flt), 1.0 / 8)  # stricter filters: the retry loop doubles from there
        # Each excluded item may be among the nearest (a derived user vector
        # sits among the consumed items); beyond 4x the share, the retry loop
        # covers a long exclude list better than one huge fetch.
        return int(math.ceil(want * overfetch / rate)) + min(int(flt.exclude_rows.size), 4 * want)

    # -- sources -----------------------------------------------------------------
    def _exact_ann(self, user_vec: np.ndarray, want: int, flt: RowFilter) -> tuple[np.ndarray, np.ndarray] | None:
        """An allowed-categories filter that leaves few items: exact scores over them (best first) beat a
        starved ANN. None when the filter leaves many (or allows every category)."""
        if flt.allowed_categories is None:
            return None
        by_cat = self._category_rows()
        codes = np.flatnonzero(flt.allowed_categories[: len(by_cat)])
        pool = sum(by_cat[c].size for c in codes)
        if pool > max(20 * want, 20_000):
            return None
        rows = np.concatenate([by_cat[c] for c in codes]) if codes.size else _EMPTY_ROWS
        rows = rows[flt.eligible(self.catalog, rows)]
        sims = self.catalog.embeddings[rows] @ user_vec
        if rows.size > want:
            top = np.argpartition(-sims, want - 1)[:want]
            rows, sims = rows[top], sims[top]
        order = np.argsort(-sims, kind="stable")
        return rows[order], sims[order].astype(np.float32)

    def ann_source(self, user_vec: np.ndarray, want: int, flt: RowFilter, overfetch: float
                   ) -> tuple[np.ndarray, np.ndarray]:
        if want <= 0:
            return _EMPTY_ROWS, _EMPTY_SCORES
        scanned = self._exact_ann(user_vec, want, flt)
        if scanned is not None:
            return scanned
        k = self.ann_fetch(want, flt, overfetch)
        while True:
            rows, sims = self.ann.query(user_vec, k)
            keep = flt.eligible(self.catalog, rows)
            if keep.sum() >= want or rows.size < k or k >= 16 * want:
                return rows[keep], sims[keep]
            k *= 2

    def cooccurrence_source(self, recent_rows: list[int], weights: list[float], want: int,
                            flt: RowFilter) -> tuple[np.ndarray, np.ndarray]:
        if want <= 0 or not recent_rows:
            return _EMPTY_ROWS, _EMPTY_SCORES
        lists, list_scores, list_weights = self.state.neighbour_lists(recent_rows, weights)
        return self._rank_cooccurrence(lists, list_scores, list_weights, want, flt)

    def _rank_cooccurrence(self, lists: list[np.ndarray], list_scores: list[np.ndarray], list_weights,
                           want: int, flt: RowFilter) -> tuple[np.ndarray, np.ndarray]:
        """The neighbours' weighted sums, the best ``2 * want`` of them, best first."""
        if not lists:
            return _EMPTY_ROWS, _EMPTY_SCORES
        size = sum(a.size for a in lists)
        rows, vals = np.empty(size, np.int32), np.empty(size, np.float32)
        n = _retrieval.aggregate_neighbours(lists, list_scores, np.asarray(list_weights, np.float64),
                                            *flt.kernel_args(self.catalog), rows, vals)
        rows, vals = rows[:n], vals[:n]
        take = 2 * want
        if n > take:
            top = np.argpartition(-vals, take - 1)[:take]
            rows, vals = rows[top], vals[top]
        order = np.argsort(-vals, kind="stable")
        return rows[order], vals[order]

    def popular_source(self, want: int, flt: RowFilter, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        top = self.state.top_popular()
        if want <= 0 or top.size == 0:
            return _EMPTY_ROWS, _EMPTY_SCORES
        # Filter a prefix twice the share (the rest of the list only when the
        # filters are strict): the list is sorted, so the prefix is the answer.
        take = max(2 * want, 64)
        rows = top[:take][flt.eligible(self.catalog, top[:take])]
        if rows.size < want and top.size > take:
            rows = top[flt.eligible(self.catalog, top)]
        return rows, self.state.log_popularity(rows, now_ms)

    def fresh_source(self, want: int, flt: RowFilter, now_ms: int, window_days: float
                     ) -> tuple[np.ndarray, np.ndarray]:
        if want <= 0:
            return _EMPTY_ROWS, _EMPTY_SCORES
        window_ms = window_days * DAY_MS
        rows, neg_created = self._fresh_index(now_ms, int(window_ms))
        # newest first: the fresh items are a prefix (after any created "in the future")
        # (int64 keys: a float key would make numpy convert the whole array)
        n_fresh = int(np.searchsorted(neg_created, np.int64(-(now_ms - int(window_ms))), side="right"))
        n_future = int(np.searchsorted(neg_created, np.int64(-now_ms), side="left"))
        rows, neg_created = rows[n_future:n_fresh], neg_created[n_future:n_fresh]
        out_rows, out_scores, start, have = [], [], 0, 0
        need = want * 2
        while start < rows.size and have < need:
            sl = slice(start, start + max(need * 2, 256))
            keep = flt.eligible(self.catalog, rows[sl])
            out_rows.append(rows[sl][keep])
            have += out_rows[-1].size
            age_days = (now_ms + neg_created[sl][keep]) / DAY_MS
            out_scores.append((1.0 - age_days / window_days).astype(np.float32))
            start = sl.stop
        if not out_rows:
            return _EMPTY_ROWS, _EMPTY_SCORES
        return np.concatenate(out_rows), np.concatenate(out_scores)

    # -- the merge ------------------------------------------------------------------
    def _shares(self, user_vec: np.ndarray | None, recent_rows: list[int], n_min: int, cfg: RetrievalConfig,
                n_candidates: int | None) -> tuple[dict[str, int], int]:
        """Each source's share of the candidates, and the total."""
        shares = cfg.shares
        total = max(n_candidates or cfg.n_candidates, n_min)
        # Scale shares to the total; a source that cannot run (no user vector,
        # no history) gives its share away in the merge.
        share_sum = sum(shares.values()) or 1
        want = {s: int(round(total * shares.get(s, 0) / share_sum)) for s in SOURCE_NAMES}
        lost = 0
        if user_vec is None:
            lost, want["ann"] = lost + want["ann"], 0
        if not recent_rows:
            lost, want["cooccurrence"] = lost + want["cooccurrence"], 0
        if lost:
            # popular and fresh always run: they take the share of the others,
            # in proportion to their own shares
            base = want["popular"] + want["fresh"]
            extra_pop = lost // 2 if base == 0 else int(round(lost * want["popular"] / base))
            want["popular"] += extra_pop
            want["fresh"] += lost - extra_pop
        return want, total

    def candidates(
        self,
        user_vec: np.ndarray | None,
        recent_rows: list[int],
        recent_weights: list[float],
        flt: RowFilter,
        now_ms: int,
        n_min: int,
        cfg: RetrievalConfig,
        n_candidates: int | None = None,
    ) -> Candidates:
        """The merged candidates of one request, with the request's (variant's) retrieval settings;
        ``n_candidates`` overrides ``cfg.n_candidates`` (a degraded request asks for fewer).

        The graph search runs first; everything after it (the co-occurrence aggregation and ranking, the
        ANN, popular and fresh sources' filtering, the shares and the merge) is one compiled call
        (``kernels.assemble_candidates``), with the same result as the sources one by one
        (:meth:`candidates_by_source`).
        """
        want, total = self._shares(user_vec, recent_rows, n_min, cfg, n_candidates)
        fargs = flt.kernel_args(self.catalog)
        # ANN: the graph search's raw answer (filtered in the kernel), or an exact scan's
        ann_want, ann_k = want["ann"], 0
        labels, values, exact = _NO_LABELS, _EMPTY_SCORES, True
        if user_vec is not None and ann_want > 0:
            scanned = self._exact_ann(user_vec, ann_want, flt)
            if scanned is not None:
                labels, values = scanned[0].astype(np.uint64), scanned[1]
            else:
                exact, ann_k = False, self.ann_fetch(ann_want, flt, cfg.overfetch)
                labels, values = self.ann.query_labels(user_vec, ann_k)
        # co-occurrence: the neighbour lists, aggregated and ranked in the kernel
        cooc_want = want["cooccurrence"]
        lists, list_scores, list_weights = ([], [], []) if cooc_want <= 0 or not recent_rows else \
            self.state.neighbour_lists(recent_rows, recent_weights)
        list_weights = np.asarray(list_weights, np.float64)
        cooc_rows = cooc_scores = None
        pop_want, fresh_want = max(want["popular"], 1), max(want["fresh"], 1)
        top = self.state.top_popular()
        top_scores = self.state.log_popularity(top[:max(2 * pop_want, 64)], now_ms) if top.size else _EMPTY_SCORES
        window_ms = int(cfg.fresh_window_days * DAY_MS)
        fresh_rows, fresh_neg = self._fresh_index(now_ms, window_ms)
        cap = max(total, sum(want.values()))
        out_rows, out_src = np.empty(cap, np.int32), np.empty(cap, np.uint8)
        out_scores = np.zeros((cap, len(SOURCE_NAMES)), np.float32)
        while True:
            n = _retrieval.assemble_candidates(
                labels, values, exact, ann_want, ann_k, lists, list_scores, list_weights, cooc_want,
                cooc_rows, cooc_scores, top, top_scores, pop_want,
                fresh_rows, fresh_neg, now_ms, window_ms, cfg.fresh_window_days, fresh_want,
                (want["ann"], want["cooccurrence"], want["popular"], want["fresh"]), total, *fargs,
                out_rows, out_src, out_scores)
            if n == _retrieval.ANN_SHORT:
                ann_k *= 2
                labels, values = self.ann.query_labels(user_vec, ann_k)
            elif n == _retrieval.POPULAR_SHORT:
                top_scores = self.state.log_popularity(top, now_ms)
            elif n == _retrieval.COOC_TIES:
                cooc_rows, cooc_scores = self._rank_cooccurrence(lists, list_scores, list_weights, cooc_want, flt)
            else:
                break
        cands = Candidates(out_rows[:n], out_src[:n], out_scores[:n])
        if n < n_min:
            extra = self._fallback(cands.rows, n_min - n, flt, now_ms)
            if extra.size:  # rows none of the sources proposed: appended as the merge would
                scores = np.zeros((extra.size, len(SOURCE_NAMES)), np.float32)
                scores[:, _POPULAR] = self.state.log_popularity(extra, now_ms)
                cands = Candidates(np.concatenate([cands.rows, extra.astype(np.int32, copy=False)]),
                                   np.concatenate([cands.sources, np.full(extra.size, 1 << _POPULAR, np.uint8)]),
                                   np.concatenate([cands.source_scores, scores]))
        return cands

    def candidates_by_source(
        self,
        user_vec: np.ndarray | None,
        recent_rows: list[int],
        recent_weights: list[float],
        flt: RowFilter,
        now_ms: int,
        n_min: int,
        cfg: RetrievalConfig,
        n_candidates: int | None = None,
    ) -> Candidates:
        """:meth:`candidates` source by source (each source's ranked rows, then the merge): the numpy
        path the compiled call replaced, kept as its reference."""
        want, total = self._shares(user_vec, recent_rows, n_min, cfg, n_candidates)
        ranked: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "ann": (self.ann_source(user_vec, want["ann"], flt, cfg.overfetch) if user_vec is not None
                    else (_EMPTY_ROWS, _EMPTY_SCORES)),
            "cooccurrence": self.cooccurrence_source(recent_rows, recent_weights, want["cooccurrence"], flt),
            "popular": self.popular_source(max(want["popular"], 1), flt, now_ms),
            "fresh": self.fresh_source(max(want["fresh"], 1), flt, now_ms, cfg.fresh_window_days),
        }
        return self._merge(ranked, want, total, n_min, flt, now_ms)

    def _merge(self, ranked, want, total, n_min, flt, now_ms) -> Candidates:
        taken = {s: min(want[s], ranked[s][0].size) for s in SOURCE_NAMES}
        # Unused share flows to sources that have more to give.
        spare = total - sum(taken.values())
        for s in ("ann", "cooccurrence", "popular", "fresh"):
            if spare <= 0:
                break
            extra = min(spare, ranked[s][0].size - taken[s])
            if extra > 0:
                taken[s] += extra
                spare -= extra
        parts_rows, parts_src, parts_score = [], [], []
        for i, s in enumerate(SOURCE_NAMES):
            rows, scores = ranked[s]
            k = taken[s]
            if k:
                parts_rows.append(rows[:k])
                parts_src.append(np.full(k, i, np.int8))
                parts_score.append(scores[:k])
        cands = _merge_parts(parts_rows, parts_src, parts_score)
        if len(cands) < n_min:
            extra = self._fallback(cands.rows, n_min - len(cands), flt, now_ms)
            if extra.size:
                parts_rows.append(extra)
                parts_src.append(np.full(extra.size, SOURCE_NAMES.index("popular"), np.int8))
                parts_score.append(self.state.log_popularity(extra, now_ms))
                cands = _merge_parts(parts_rows, parts_src, parts_score)
        return cands

    def _fallback(self, have: np.ndarray, need: int, flt: RowFilter, now_ms: int) -> np.ndarray:
        """Most popular eligible rows not yet proposed: a whole-catalog scan."""
        rows = self.catalog.alive_rows()
        rows = rows[flt.eligible(self.catalog, rows)]
        rows = np.setdiff1d(rows, have, assume_unique=True)
        if rows.size <= need:
            return rows
        pop = self.state.relative_popularity(rows) + self.catalog.base_popularity[rows] * 1e-9
        top = np.argpartition(-pop, need - 1)[:need]
        return rows[top]


def usual_ann_fetch(cfg: RetrievalConfig) -> int:
    """The ANN fetch of an unfiltered request: its share of the candidates with the margin (sets the
    index's search beam; a larger fetch searches with a beam of its own size)."""
    total = sum(cfg.shares.values()) or 1
    return int(math.ceil(cfg.n_candidates * cfg.shares.get("ann", 0) / total * cfg.overfetch))


def _merge_parts(parts_rows: list[np.ndarray], parts_src: list[np.ndarray],
                 parts_score: list[np.ndarray]) -> Candidates:
    """De-duplicate the sources' rows (first seen first: ANN best first, then the others)."""
    if not parts_rows:
        return Candidates.empty()
    rows = np.concatenate(parts_rows).astype(np.int32, copy=False)
    src = np.concatenate(parts_src)
    score = np.concatenate(parts_score).astype(np.float32, copy=False)
    out_rows = np.empty(rows.size, np.int32)
    out_src = np.empty(rows.size, np.uint8)
    out_scores = np.zeros((rows.size, len(SOURCE_NAMES)), np.float32)
    n = _retrieval.merge_sources(rows, src, score, out_rows, out_src, out_scores)
    return Candidates(out_rows[:n], out_src[:n], out_scores[:n])


_EMPTY_ROWS = np.empty(0, np.int32)
_NO_LABELS = np.empty(0, np.uint64)
_POPULAR = SOURCE_NAMES.index("popular")
_EMPTY_SCORES = np.empty(0, np.float32)
_NO_MASK = np.empty(0, np.uint8)
_INT32_MAX = 2 ** 31 - 1
_FRESH_SLACK_MS = 3_600_000  # see Retriever._fresh_index

