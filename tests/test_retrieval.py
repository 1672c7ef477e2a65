"""Candidate generation: sources, merge, shares, filters, and ANN recall."""

import numpy as np
import pytest

from recsvc.catalog import DAY_MS
from recsvc.config import Config
from recsvc.engine import FeedbackEventIn, RecommendQuery, load_catalog_and_index
from recsvc.retrieval.candidates import SOURCE_NAMES
from recsvc.retrieval.sources import RowFilter


def no_filter(engine, **kw):
    return engine.requests.row_filter(RecommendQuery(user_id="t", **kw), [], engine.cfg)


def candidates(engine, user_vec, now_ms, cfg=None, **kw):
    cfg = cfg or engine.cfg
    return engine.requests.retriever.candidates(user_vec, [], [], no_filter(engine), now_ms, n_min=10,
                                                cfg=cfg.retrieval, **kw)


def test_merge_dedupes_and_records_every_source(engine, clock):
    cat = engine.catalog
    user = cat.embeddings[3]
    c = candidates(engine, user, clock())
    assert len(c) >= 250
    assert np.unique(c.rows).size == len(c)  # no duplicates
    # a row proposed by two sources carries both bits and both scores
    multi = np.flatnonzero(np.unpackbits(c.sources[:, None], axis=1).sum(axis=1) > 1)
    assert multi.size > 0
    for i in multi[:20]:
        names = c.source_names(i)
        for s, name in enumerate(SOURCE_NAMES):
            assert (c.source_scores[i, s] != 0) == (name in names) or c.source_scores[i, s] == 0


def test_shares_are_respected(engine, clock):
    cat = engine.catalog
    cfg = engine.cfg.with_overrides(
        {"retrieval": {"shares": {"ann": 100, "popular": 100, "fresh": 100, "cooccurrence": 0}}})
    c = candidates(engine, cat.embeddings[3], clock(), cfg=cfg, n_candidates=300)
    counts = {name: int(((c.sources >> s) & 1).sum()) for s, name in enumerate(SOURCE_NAMES)}
    assert counts["ann"] >= 100 and counts["popular"] >= 100 and counts["fresh"] >= 90
    assert counts["cooccurrence"] == 0


def test_unused_share_flows_to_other_sources(engine, clock):
    # no embedding, no history: ann and co-occurrence cannot run
    c = candidates(engine, None, clock())
    assert len(c) >= engine.cfg.retrieval.n_candidates * 0.9
    assert not (c.sources & 0b011).any()


def test_popular_list_is_maintained_incrementally(engine, clock):
    cat = engine.catalog
    pop = engine.state.decayed_popularity(clock())[: cat.n_rows]
    tail = int(np.argmin(pop))
    item = cat.item_ids[tail]
    assert tail not in engine.state.top_popular()[:10]
    clicks = int(np.sort(pop)[::-1][9]) + 5  # each click now adds 1 to the decayed count
    for start in range(0, clicks, 1000):
        engine.feedback([FeedbackEventIn(f"p{i}", f"u{i}", item, "click")
                         for i in range(start, min(clicks, start + 1000))])
    top = engine.state.top_popular()
    assert tail in top[:10]
    # the maintained list equals a from-scratch sort of the whole catalog
    exact = np.argsort(-engine.state.decayed_popularity(clock())[: cat.n_rows], kind="stable")[: top.size]
    np.testing.assert_array_equal(np.sort(top[:100]), np.sort(exact[:100]))


def test_popularity_decays_with_half_life(engine, clock):
    row = 5
    before = engine.state.decayed_popularity(clock())[row]
    clock.advance(int(engine.cfg.retrieval.popularity_half_life_days * DAY_MS))
    after = engine.state.decayed_popularity(clock())[row]
    assert after == pytest.approx(before / 2, rel=1e-9)


def test_fresh_source_only_returns_items_in_window(engine, clock):
    flt = no_filter(engine)
    window = engine.cfg.retrieval.fresh_window_days
    rows, scores = engine.requests.retriever.fresh_source(50, flt, clock(), window)
    age = (clock() - engine.catalog.created_at_ms[rows]) / DAY_MS
    assert rows.size >= 50 and (age <= engine.cfg.retrieval.fresh_window_days).all() and (age >= 0).all()
    assert np.all(np.diff(engine.catalog.created_at_ms[rows]) <= 0)  # newest first


def test_fresh_index_follows_catalog_changes_and_the_clock(engine, clock):
    from recsvc.engine import ItemIn

    r, cat = engine.requests.retriever, engine.catalog
    days = engine.cfg.retrieval.fresh_window_days
    window_ms = int(days * DAY_MS)
    # created 1 ms after the newest item: first in the fresh list once upserted
    newest = int(cat.created_at_ms[: cat.n_rows].max())
    start = clock()
    r.fresh_source(10, no_filter(engine), start, days)  # the index is built
    engine.upsert_items([ItemIn("brand-new", np.ones(cat.dim), cat.category_names[0], 0, newest + 1)])
    row = cat.row_of["brand-new"]
    # the writer rebuilt the index: no request pays for it
    versions = r.derived_versions()
    assert versions["fresh"] == versions["filter_statistics"] == versions["catalog_changes"] > 0
    clock.now_ms = newest + 1
    rows, scores = r.fresh_source(10, no_filter(engine), clock(), days)
    assert rows[0] == row and scores[0] == pytest.approx(1.0)
    # time passes: it leaves the window; a change now rebuilds the index
    # without it (its horizon is past the item)
    clock.now_ms = newest + 1 + window_ms + 2 * 3_600_000  # (past the index's one-hour slack too)
    engine.upsert_items([ItemIn("later", np.ones(cat.dim), cat.category_names[0], 0, clock.now_ms)])
    rows, _ = r.fresh_source(10, no_filter(engine), clock(), days)
    assert row not in rows and rows[0] == cat.row_of["later"]
    # a clock set back before the index's horizon rebuilds it: the item is back
    clock.now_ms = newest + 2
    rows, _ = r.fresh_source(10, no_filter(engine), clock(), days)
    assert rows[0] == row
    # a deleted item is never fresh again
    engine.delete_items(["brand-new"])
    rows, _ = r.fresh_source(10, no_filter(engine), clock(), days)
    assert row not in rows


def test_restrictive_filter_does_not_starve_ann(engine, clock):
    cat = engine.catalog
    # the smallest category, with a user vector pointing elsewhere
    sizes = np.bincount(cat.categories[: cat.n_rows])
    smallest = cat.category_names[int(np.argmin(sizes))]
    flt = no_filter(engine, allowed_categories=[smallest])
    rows, sims = engine.requests.retriever.ann_source(cat.embeddings[0], 20, flt, engine.cfg.retrieval.overfetch)
    assert rows.size == min(20, int(sizes.min()))
    assert all(cat.category_names[cat.categories[r]] == smallest for r in rows)
    assert np.all(np.diff(sims) <= 1e-6)


def test_ann_fetch_follows_the_filters(engine):
    """The fetch size grows with the filters' estimated pass rate and with the excluded items."""
    cat, r = engine.catalog, engine.requests.retriever
    margin = engine.cfg.retrieval.overfetch
    base = r.ann_fetch(180, no_filter(engine), margin)
    mature = (cat.maturity[: cat.n_rows] <= engine.cfg.reranking.max_maturity).mean()
    assert base == int(np.ceil(180 * margin / mature))
    # blocking half the categories: the estimate is the real share of what passes
    names = cat.category_names[::2]
    flt = no_filter(engine, blocked_categories=names, max_maturity=13)
    exact = flt.eligible(cat, np.arange(cat.n_rows, dtype=np.int32)).mean()
    assert r.pass_rate(flt) == pytest.approx(exact, rel=0.1)
    assert r.ann_fetch(180, flt, margin) == pytest.approx(180 * margin / exact, rel=0.1)
    # allowed and blocked together: what is allowed and not blocked
    allowed, blocked = cat.category_names[:6], cat.category_names[3:9]
    flt = no_filter(engine, allowed_categories=allowed, blocked_categories=blocked)
    exact = flt.eligible(cat, np.arange(cat.n_rows, dtype=np.int32)).mean()
    assert 0 < exact and r.pass_rate(flt) == pytest.approx(exact, rel=0.1)
    # every excluded item may be one of the nearest: each adds one to the fetch
    excl = [cat.item_ids[i] for i in range(25)]
    assert r.ann_fetch(180, no_filter(engine, exclude_item_ids=excl), margin) == base + 25
    # ...up to 4x the share: a long exclude list is left to the retry loop
    excl = [cat.item_ids[i] for i in range(1000)]
    assert r.ann_fetch(180, no_filter(engine, exclude_item_ids=excl), margin) == base + 4 * 180
    # nothing passes: the estimate is floored (the retry loop covers the rest)
    nothing = RowFilter(None, np.ones(cat.n_categories, bool), 18, np.empty(0, np.int32))
    assert r.pass_rate(nothing) == 0.0 and r.ann_fetch(180, nothing, margin) == int(np.ceil(180 * margin * 8))


def test_blocked_categories_are_answered_in_one_ann_query(engine, monkeypatch):
    cat, r = engine.catalog, engine.requests.retriever
    margin = engine.cfg.retrieval.overfetch
    calls = []
    query = r.ann.query
    monkeypatch.setattr(r.ann, "query", lambda v, k: calls.append(k) or query(v, k))
    blocked = [name for name in cat.category_names if name != cat.category_names[cat.categories[0]]][:12]
    flt = no_filter(engine, blocked_categories=blocked)
    rows, _ = r.ann_source(cat.embeddings[0], 150, flt, margin)
    assert rows.size >= 150 and len(calls) == 1
    assert flt.eligible(cat, rows).all()
    # Blocking the user's own category: embeddings cluster by category, so the
    # nearest items fail far more often than the catalog-wide estimate says.
    # The fetch is repeated, larger, and the share is still filled.
    calls.clear()
    flt = no_filter(engine, blocked_categories=[cat.category_names[cat.categories[0]]] + blocked[:8])
    rows, _ = r.ann_source(cat.embeddings[0], 150, flt, margin)
    assert rows.size >= 150 and flt.eligible(cat, rows).all()
    assert len(calls) >= 1 and calls == sorted(calls)


def test_n_items_whenever_the_catalog_holds_them(engine, clock):
    cat = engine.catalog
    name = cat.category_names[3]
    eligible = int(((cat.categories[: cat.n_rows] == 3) & (cat.maturity[: cat.n_rows] <= 18)).sum())
    rec = engine.recommend(RecommendQuery(user_id="z", n=min(eligible, 400), allowed_categories=[name]))
    assert len(rec.items) == min(eligible, 400)
    rec = engine.recommend(RecommendQuery(user_id="z", n=eligible + 50, allowed_categories=[name]))
    assert len(rec.items) == eligible  # all there is


@pytest.mark.slow
def test_ann_recall_on_the_100k_demo_catalog():
    """recall@k of the ANN source vs exact brute force, default settings, 100k x 64."""
    cfg = Config()
    from recsvc.retrieval.sources import Retriever, usual_ann_fetch
    from recsvc.state.online import ReadModel

    catalog, ann = load_catalog_and_index(cfg)  # cached under ~/.cache/recsvc after the first build
    Retriever(catalog, ann, ReadModel(cfg, catalog.capacity), usual_ann_fetch(cfg.retrieval),
              cfg.retrieval.fresh_window_days)  # sets ef as serving does
    emb = catalog.embeddings[: catalog.n_rows]
    cats = catalog.categories[: catalog.n_rows]
    rng = np.random.default_rng(11)
    # Realistic user vectors: the mean of 8 items a user liked, from one or two
    # categories (benchmarks/README.md also reports incoherent and uniform queries).
    queries = []
    for _ in range(30):
        liked_cats = rng.choice(catalog.n_categories, size=rng.integers(1, 3), replace=False)
        pool = np.flatnonzero(np.isin(cats, liked_cats))
        q = emb[rng.choice(pool, size=8, replace=False)].mean(axis=0)
        queries.append(q / np.linalg.norm(q))
    k = int(np.ceil(cfg.retrieval.shares["ann"] * cfg.retrieval.overfetch))  # the fetch without filters
    recalls = {500: [], k: []}
    for q in queries:
        rows, _ = ann.query(q.astype(np.float32), k)
        exact = np.argsort(-(emb @ q))[:k]
        for kk in recalls:
            recalls[kk].append(np.intersect1d(rows[:kk], exact[:kk]).size / kk)
    assert np.mean(recalls[500]) >= 0.95, recalls
    assert np.mean(recalls[k]) >= 0.95
