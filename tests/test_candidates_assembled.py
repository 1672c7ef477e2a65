"""The candidates after the graph search in one compiled call (``kernels.assemble_candidates``).

Parity with its numpy twin on random inputs, and ``Retriever.candidates`` (the compiled call) against
``Retriever.candidates_by_source`` (the sources one by one, then the merge: the path it replaced), bit for
bit, over users with and without history, filters that starve the ANN answer or the popular prefix, and a
candidate set the catalog scan has to complete.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc._fastpath.twins import retrieval as twin
from recsvc.engine import FeedbackEventIn, RecommendQuery
from recsvc.retrieval import kernels, sources
from recsvc.retrieval.sources import RowFilter

N_ROWS = 80
DAY = 86_400_000


@st.composite
def filters(draw):
    # mostly live rows and loose filters: enough eligible rows to fill the shares (and to tie)
    alive = np.array(draw(st.lists(st.sampled_from([1, 1, 1, 0]), min_size=N_ROWS, max_size=N_ROWS)), np.uint8)
    maturity = np.array(draw(st.lists(st.sampled_from([0, 0, 13, 18]), min_size=N_ROWS, max_size=N_ROWS)), np.int32)
    categories = np.array(draw(st.lists(st.integers(0, 7), min_size=N_ROWS, max_size=N_ROWS)), np.int32)
    has_allowed = draw(st.sampled_from([False, False, True]))
    allowed = np.array(draw(st.lists(st.booleans(), max_size=6)), np.uint8) if has_allowed else np.empty(0, np.uint8)
    blocked = np.array(draw(st.lists(st.booleans(), max_size=6)), np.uint8)
    exclude = np.unique(np.array(draw(st.lists(st.integers(0, N_ROWS + 5), max_size=12)), np.int32))
    return (alive, maturity, categories, draw(st.sampled_from([0, 13, 18])), allowed, has_allowed, blocked, exclude)


@st.composite
def source_inputs(draw):
    """Raw inputs of every source, as ``Retriever.candidates`` hands them over."""
    n_ann = draw(st.integers(0, 40))
    labels = np.array(draw(st.lists(st.integers(0, N_ROWS + 9), min_size=n_ann, max_size=n_ann, unique=True)),
                      np.uint64)
    values = np.array(draw(st.lists(st.floats(0, 2, width=32), min_size=n_ann, max_size=n_ann)), np.float32)
    cooc = draw(st.lists(st.tuples(st.integers(0, N_ROWS - 1), st.floats(0, 5, width=32)), max_size=20,
                         unique_by=lambda t: t[0]))
    # neighbour lists with few distinct scores: ties among the best and at the cut are common
    lists = draw(st.lists(st.lists(st.tuples(st.integers(0, N_ROWS - 1),
                                             st.sampled_from([0.25, 0.5, 1.0]) | st.floats(0, 5, width=32)),
                                   max_size=25, unique_by=lambda t: t[0]), max_size=6))
    ranked = draw(st.booleans())
    popular = np.array(draw(st.permutations(range(N_ROWS)))[: draw(st.integers(0, N_ROWS))], np.int32)
    popular_scores = np.array(draw(st.lists(st.floats(0, 10, width=32), min_size=popular.size,
                                            max_size=popular.size)), np.float32)
    scored = draw(st.integers(0, popular.size))  # the prefix scored at first
    n_fresh = draw(st.integers(0, 60))
    fresh_rows = np.array(draw(st.permutations(range(N_ROWS)))[:n_fresh], np.int32)
    now = 1_000 * DAY
    created = np.sort(np.array(draw(st.lists(st.integers(now - 40 * DAY, now + DAY), min_size=n_fresh,
                                             max_size=n_fresh)), np.int64))[::-1]
    window_days = draw(st.sampled_from([0.5, 7.0, 30.0]))
    ann_want = draw(st.integers(0, 30))
    return dict(
        ann_labels=labels, ann_values=values, ann_exact=draw(st.booleans()), ann_want=ann_want,
        ann_k=draw(st.sampled_from([0, n_ann, n_ann + 1])),
        neighbour_rows=[np.array([r for r, _ in lst], np.int32) for lst in lists],
        neighbour_scores=[np.array([v for _, v in lst], np.float64) for lst in lists],
        neighbour_weights=np.array(draw(st.lists(st.sampled_from([1.0, 0.5]) | st.floats(0.01, 1),
                                                 min_size=len(lists), max_size=len(lists))), np.float64),
        cooc_want=draw(st.integers(0, 8)),
        cooc_rows=np.array([r for r, _ in cooc], np.int32) if ranked else None,
        cooc_scores=np.array([v for _, v in cooc], np.float32) if ranked else None,
        popular=popular, popular_scores=popular_scores[:scored], all_popular_scores=popular_scores,
        popular_want=draw(st.integers(1, 40)),
        fresh_rows=fresh_rows, fresh_neg_created=-created, now_ms=now,
        fresh_window_ms=int(window_days * DAY), fresh_window_days=window_days, fresh_want=draw(st.integers(1, 30)),
        want=tuple(draw(st.lists(st.integers(0, 40), min_size=4, max_size=4))), total=draw(st.integers(0, 120)),
    )


def _outputs(inputs):
    cap = max(inputs["total"], sum(inputs["want"]))
    return np.empty(cap, np.int32), np.empty(cap, np.uint8), np.zeros((cap, 4), np.float32)


@settings(max_examples=400, deadline=None)
@given(inputs=source_inputs(), flt=filters())
def test_assemble_candidates_parity(inputs, flt) -> None:
    """Same answers, asking for more input included; then given it (as Retriever.candidates does), the
    same candidates bit for bit."""
    all_popular_scores = inputs.pop("all_popular_scores")
    for _ in range(4):
        got, want = _outputs(inputs), _outputs(inputs)
        n = kernels.assemble_candidates(**inputs, **_named(flt), out_rows=got[0], out_sources=got[1],
                                        out_scores=got[2])
        m = twin.assemble_candidates(**inputs, **_named(flt), out_rows=want[0], out_sources=want[1],
                                     out_scores=want[2])
        assert n == m
        if n == kernels.ANN_SHORT:
            inputs["ann_k"] = 0  # (a larger fetch: here, the same answer taken as it is)
        elif n == kernels.POPULAR_SHORT:
            inputs["popular_scores"] = all_popular_scores
        elif n == kernels.COOC_TIES:
            inputs["cooc_rows"], inputs["cooc_scores"] = _ranked_by_numpy(inputs, flt)
        else:
            break
    assert n >= 0
    np.testing.assert_array_equal(got[0][:n], want[0][:n])
    np.testing.assert_array_equal(got[1][:n], want[1][:n])
    np.testing.assert_array_equal(got[2][:n].view(np.uint32), want[2][:n].view(np.uint32))  # bit for bit


def _ranked_by_numpy(inputs, flt):
    """The co-occurrence rows ranked as Retriever._rank_cooccurrence ranks them."""
    size = sum(r.size for r in inputs["neighbour_rows"])
    rows, vals = np.empty(size, np.int32), np.empty(size, np.float32)
    n = kernels.aggregate_neighbours(inputs["neighbour_rows"], inputs["neighbour_scores"],
                                     inputs["neighbour_weights"], *flt, rows, vals)
    rows, vals = rows[:n], vals[:n]
    take = 2 * inputs["cooc_want"]
    if n > take:
        top = np.argpartition(-vals, take - 1)[:take]
        rows, vals = rows[top], vals[top]
    order = np.argsort(-vals, kind="stable")
    return rows[order], vals[order]


def _named(flt):
    names = ("alive", "maturity", "categories", "max_maturity", "allowed", "has_allowed", "blocked", "exclude")
    return dict(zip(names, flt))


def test_assemble_candidates_asks_for_more_input() -> None:
    every = dict(alive=np.ones(10, np.uint8), maturity=np.zeros(10, np.int32), categories=np.zeros(10, np.int32),
                 max_maturity=0, allowed=np.empty(0, np.uint8), has_allowed=False, blocked=np.empty(0, np.uint8),
                 exclude=np.arange(0, 8, dtype=np.int32))
    none_i, none_f = np.empty(0, np.int32), np.empty(0, np.float32)
    base = dict(ann_labels=np.arange(4, dtype=np.uint64), ann_values=np.zeros(4, np.float32), ann_exact=False,
                ann_want=3, ann_k=4, neighbour_rows=[], neighbour_scores=[], neighbour_weights=np.empty(0),
                cooc_want=0, cooc_rows=none_i, cooc_scores=none_f, popular=none_i, popular_scores=none_f,
                popular_want=1, fresh_rows=none_i, fresh_neg_created=np.empty(0, np.int64), now_ms=0,
                fresh_window_ms=DAY, fresh_window_days=1.0, fresh_want=1, want=(3, 0, 1, 1), total=5, **every)
    out = _outputs(base)
    # rows 0-3 are excluded: none of the 4 fetched may be served, and a larger fetch could find some
    assert kernels.assemble_candidates(**base, out_rows=out[0], out_sources=out[1],
                                       out_scores=out[2]) == kernels.ANN_SHORT
    # 16x the share fetched already: take what there is
    assert kernels.assemble_candidates(**{**base, "ann_k": 48}, out_rows=out[0], out_sources=out[1],
                                       out_scores=out[2]) == 0
    # the popular prefix (64 rows) holds too few eligible rows: the whole list is filtered, and needs its scores
    popular = np.r_[np.zeros(70, np.int32), [9]].astype(np.int32)  # (row 0 is excluded)
    args = {**base, "ann_k": 0, "popular": popular, "popular_scores": np.ones(64, np.float32)}
    assert kernels.assemble_candidates(**args, out_rows=out[0], out_sources=out[1],
                                       out_scores=out[2]) == kernels.POPULAR_SHORT
    args["popular_scores"] = np.arange(71, dtype=np.float32)
    assert kernels.assemble_candidates(**args, out_rows=out[0], out_sources=out[1], out_scores=out[2]) == 1
    assert out[0][0] == 9 and out[1][0] == 0b100 and out[2][0, 2] == 70.0
    # more co-occurrence rows than twice the share, tied at the cut: numpy's argpartition decides
    lists = dict(neighbour_rows=[np.array([7, 8, 9], np.int32)], neighbour_scores=[np.array([1.0, 1.0, 1.0])],
                 neighbour_weights=np.ones(1), cooc_want=1, cooc_rows=None, cooc_scores=None)
    args = {**args, **lists, "exclude": np.empty(0, np.int32)}
    assert kernels.assemble_candidates(**args, out_rows=out[0], out_sources=out[1],
                                       out_scores=out[2]) == kernels.COOC_TIES
    lists["neighbour_scores"] = [np.array([1.0, 2.0, 3.0])]  # no tie: the best two ranked here
    args = {**args, **lists, "ann_labels": np.empty(0, np.uint64), "ann_values": np.empty(0, np.float32),
            "popular": none_i, "popular_scores": none_f, "want": (0, 2, 0, 0), "total": 2}
    out = _outputs(args)
    assert kernels.assemble_candidates(**args, out_rows=out[0], out_sources=out[1], out_scores=out[2]) == 2
    assert out[0].tolist() == [9, 8] and out[1].tolist() == [0b10, 0b10] and out[2][:, 1].tolist() == [3.0, 2.0]


def test_assemble_candidates_rejects_bad_arguments() -> None:
    z = np.zeros(4, np.uint8)
    args = dict(ann_labels=np.arange(4, dtype=np.uint64), ann_values=np.zeros(3, np.float32), ann_exact=False,
                ann_want=1, ann_k=0, neighbour_rows=[], neighbour_scores=[], neighbour_weights=np.empty(0),
                cooc_want=0, cooc_rows=np.empty(0, np.int32), cooc_scores=np.empty(0, np.float32),
                popular=np.empty(0, np.int32), popular_scores=np.empty(0, np.float32), popular_want=1,
                fresh_rows=np.empty(0, np.int32), fresh_neg_created=np.empty(0, np.int64), now_ms=0,
                fresh_window_ms=DAY, fresh_window_days=1.0, fresh_want=1, want=(1, 0, 0, 0), total=1,
                alive=z, maturity=np.zeros(4, np.int32), categories=np.zeros(4, np.int32), max_maturity=0,
                allowed=np.empty(0, np.uint8), has_allowed=False, blocked=np.empty(0, np.uint8),
                exclude=np.empty(0, np.int32))
    out = dict(out_rows=np.empty(1, np.int32), out_sources=np.empty(1, np.uint8), out_scores=np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="array lengths disagree"):
        kernels.assemble_candidates(**args, **out)
    args["ann_values"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="want must hold one share per source"):
        kernels.assemble_candidates(**{**args, "want": (1, 0, 0)}, **out)
    with pytest.raises(ValueError, match="out_scores must be"):
        kernels.assemble_candidates(**args, **{**out, "out_scores": np.zeros((1, 3), np.float32)})
    with pytest.raises(ValueError, match="rows must be catalog rows"):
        kernels.assemble_candidates(**{**args, "cooc_rows": np.array([-1], np.int32),
                                       "cooc_scores": np.ones(1, np.float32)}, **out)
    with pytest.raises(ValueError, match="one score array and one weight per neighbour array"):
        kernels.assemble_candidates(**{**args, "cooc_rows": None, "cooc_scores": None,
                                       "neighbour_rows": [np.zeros(1, np.int32)]}, **out)
    with pytest.raises(ValueError, match="array lengths disagree"):
        kernels.assemble_candidates(**{**args, "cooc_rows": None, "cooc_scores": None, "cooc_want": 1,
                                       "neighbour_rows": [np.zeros(2, np.int32)],
                                       "neighbour_scores": [np.zeros(1)], "neighbour_weights": np.ones(1)}, **out)
    with pytest.raises(ValueError, match="dtype mismatch"):
        kernels.assemble_candidates(**{**args, "cooc_rows": None, "cooc_scores": None, "cooc_want": 1,
                                       "neighbour_rows": [np.zeros(2, np.int64)],
                                       "neighbour_scores": [np.zeros(2)], "neighbour_weights": np.ones(1)}, **out)
    with pytest.raises(ValueError, match="exclude must be sorted"):
        kernels.assemble_candidates(**{**args, "exclude": np.array([3, 1], np.int32)}, **out)


# --------------------------------------------------------------------------
# Retriever.candidates against the sources one by one


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.sources, b.sources)
    assert a.source_scores.dtype == b.source_scores.dtype == np.float32
    np.testing.assert_array_equal(a.source_scores.view(np.uint32), b.source_scores.view(np.uint32))


def test_candidates_are_those_of_the_sources_one_by_one(engine, clock, monkeypatch) -> None:
    cat = engine.catalog
    rng = np.random.default_rng(5)
    # histories and co-occurrence: users clicking within a few categories
    events = []
    for u in range(40):
        cats = rng.choice(cat.n_categories, 2, replace=False)
        pool = np.flatnonzero(np.isin(cat.categories[: cat.n_rows], cats))
        for j, row in enumerate(rng.choice(pool, 12, replace=False)):
            events.append(FeedbackEventIn(f"e{u}-{j}", f"u{u}", cat.item_ids[row], "click"))
    engine.feedback(events)
    clock.advance(60_000)
    r, req = engine.requests.retriever, engine.requests
    answers = []
    assemble = sources._retrieval.assemble_candidates

    def recording(*args):
        answers.append(assemble(*args))
        return answers[-1]

    monkeypatch.setattr(sources._retrieval, "assemble_candidates", recording)
    names = cat.category_names
    queries = [
        {}, {"max_maturity": 13}, {"blocked_categories": list(names[::2])},
        {"allowed_categories": list(names[:3])},  # few items: the exact scan
        {"allowed_categories": list(names[:15]), "blocked_categories": list(names[10:13])},
        {"exclude_item_ids": [cat.item_ids[i] for i in range(0, 3000, 7)]},
        {"blocked_categories": list(names[1:])},  # the popular prefix starves: the whole list
    ]
    n_compared = 0
    for u in range(0, 44, 3):  # u40-u43 have no history
        history = engine.state.history(f"u{u}")
        recent, weights = req.recent(history, engine.cfg)
        for qi, extra in enumerate(queries):
            flt = req.row_filter(RecommendQuery(user_id=f"u{u}", **extra), history, engine.cfg)
            vec = None if (u + qi) % 5 == 0 else cat.embeddings[(u * 31 + qi) % cat.n_rows]
            if vec is not None and qi == len(queries) - 1:  # the user's own category blocked
                flt = req.row_filter(RecommendQuery(user_id=f"u{u}", blocked_categories=[
                    names[cat.categories[(u * 31 + qi) % cat.n_rows]]] + list(names[:9])), history, engine.cfg)
            for n_min, n_candidates in ((10, None), (10, 40), (2500, None)):
                args = (vec, recent, weights, flt, clock(), n_min, engine.cfg.retrieval, n_candidates)
                _same(r.candidates(*args), r.candidates_by_source(*args))
                n_compared += 1
    assert n_compared == 15 * 7 * 3
    # the ANN answer was short (fetched again, larger) and the popular prefix too (the whole list scored);
    # co-occurrence rows tied at the cut were ranked by numpy
    assert kernels.ANN_SHORT in answers and kernels.POPULAR_SHORT in answers and kernels.COOC_TIES in answers
    # fewer than 40 asked for, and the sets of 2500 or more every time completed by the catalog scan
    assert min(n for n in answers if n >= 0) < 40 and max(answers) < 2500


def test_maturity_pass_rate_follows_catalog_changes(engine) -> None:
    """pass_rate keeps the last maturity-only rate; a catalog change (new statistics) computes it again."""
    from recsvc.messages import ItemIn

    cat, r = engine.catalog, engine.requests.retriever
    flt = RowFilter(None, None, 0, np.empty(0, np.int32))
    before = r.pass_rate(flt)
    assert r.pass_rate(flt) == before  # (kept)
    assert before == pytest.approx((cat.maturity[: cat.n_rows] <= 0).mean())
    # a thousand items above the ceiling: the share that passes falls
    engine.upsert_items([ItemIn(f"mature-{i}", np.ones(cat.dim), cat.category_names[0], 18, 0) for i in range(1000)])
    n = cat.n_rows
    assert r.pass_rate(flt) == pytest.approx((cat.maturity[:n] <= 0).sum() / n) != before
    assert r.pass_rate(RowFilter(None, None, 18, np.empty(0, np.int32))) == 1.0
