"""Stage 1: the full merged candidate set (~1000) beside exact numpy scoring + argpartition.

Groups ``candidates-100k`` and ``candidates-1M`` hold, on the same catalog and user vectors:
- ``recsvc``: every source (ANN, co-occurrence, popular, fresh), merged, de-duplicated, filtered;
- ``ann_only``: the hnswlib query alone, with the fetch size the ANN source uses for these users
  (the ANN share with its margin, plus their consumed items);
- ``ann_only_small_pages`` (full mode): the same on a second copy of the index kept on 4 KiB pages,
  to show what huge pages buy (``recsvc.retrieval.hugepages``);
- ``ann_only_scattered_layout`` (full mode): the same graph with its nodes in random order instead of
  the cluster order it is served in, to show what the layout buys (``recsvc.retrieval.layout``);
- ``numpy_exact``: exact scores over all items + ``argpartition`` for the top 1000 (the baseline).
ANN recall@500 at that fetch size against brute force, and the index build/load time go in ``extra_info``.

Groups ``retrieval-kernels-<size>``: each compiled candidate kernel (through its validating wrapper,
``recsvc.retrieval.kernels``, as the request path calls it) beside its numpy twin
(``recsvc._fastpath.twins.retrieval``), on one request's real inputs: the request filter over the ANN
fetch, the co-occurrence aggregation of the user's recent items' neighbour lists, the merge of the
four sources, and everything after the graph search in one call (``assemble_candidates``: the ANN answer,
the popular list and the fresh index filtered, the shares and the merge, as ``Retriever.candidates``
calls it). The compiled side must not be slower (``KERNEL_TWINS``, checked by the conftest's gate).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from conftest import NOW_MS, QUICK, coherent_users, demo_config, timed_load

SIZES = [20_000] if QUICK else [100_000, 1_000_000]


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


@pytest.fixture(scope="module", params=SIZES, ids=_label)
def world(request):
    from recsvc.engine import Engine, FeedbackEventIn

    n = request.param
    cfg = demo_config(n).with_overrides({"state": {"dir": "/tmp/recsvc-bench-state-unused"}})
    catalog, ann, seconds, built = timed_load(cfg)
    from recsvc.state.store import MemoryStateStore

    engine = Engine(cfg, catalog, ann, store=MemoryStateStore(), clock=lambda: NOW_MS)
    # Some history so co-occurrence has something to say.
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(200)]
    events = [FeedbackEventIn(f"e{i}", users[i % 200], catalog.item_ids[int(rng.integers(5000))], "click")
              for i in range(4000)]
    for start in range(0, len(events), 1000):
        engine.feedback(events[start:start + 1000])
    queries = coherent_users(catalog, 64)
    emb = catalog.embeddings[: catalog.n_rows]
    # the fetch size the ANN source uses for these users (20 consumed items each)
    from recsvc.engine import RecommendQuery

    flt = engine.requests.row_filter(RecommendQuery(user_id=users[0]), engine.state.history(users[0]), engine.cfg)
    share = engine.cfg.retrieval.shares["ann"] * engine.cfg.retrieval.n_candidates // sum(
        engine.cfg.retrieval.shares.values())
    k = engine.requests.retriever.ann_fetch(share, flt, engine.cfg.retrieval.overfetch)
    recalls = []
    for q in queries[:20]:
        rows, _ = ann.query(q, k)
        exact = np.argpartition(-(emb @ q), 500)[:500]
        recalls.append(np.intersect1d(rows[:500], exact).size / 500)
    return {"n": n, "engine": engine, "queries": queries, "emb": emb, "ann": ann, "k": k, "cfg": cfg,
            "recall500": float(np.mean(recalls)), "index_seconds": seconds, "index_built": built}


def _info(benchmark, w):
    benchmark.extra_info.update({
        "items": w["n"], "recall@500": round(w["recall500"], 4), "ef": w["engine"].requests.retriever.ann_ef,
        "ann_fetch": w["k"], "huge_pages_mib": w["ann"].huge_pages.collapsed_bytes >> 20,
        ("index_build_s" if w["index_built"] else "index_load_s"): round(w["index_seconds"], 1),
    })


def test_candidates_recsvc(benchmark, world):
    eng = world["engine"]
    benchmark.group = f"candidates-{_label(world['n'])}"
    from recsvc.engine import RecommendQuery

    it = itertools.cycle(range(len(world["queries"])))
    users = [f"u{i}" for i in range(200)]

    def run():
        i = next(it)
        user = users[i % len(users)]
        history = eng.state.history(user)
        recent, weights = eng.requests.recent(history, eng.cfg)
        flt = eng.requests.row_filter(RecommendQuery(user_id=user), history, eng.cfg)
        return eng.requests.retriever.candidates(world["queries"][i], recent, weights, flt, NOW_MS, n_min=10,
                                                 cfg=eng.cfg.retrieval)

    # One request builds the catalog-wide indexes (fresh items, filter
    # statistics), as the server's warm-up does. Then one pass over the 64
    # users builds their recent items' co-occurrence neighbour lists (cached
    # until feedback touches the item): its mean is reported as the cold cost.
    run()
    t = time.perf_counter()
    for _ in range(len(world["queries"]) - 1):
        run()
    cold_ms = (time.perf_counter() - t) * 1e3 / (len(world["queries"]) - 1)
    c = benchmark(run)
    assert 900 <= len(c) <= 1100
    _info(benchmark, world)
    benchmark.extra_info["cold_cooccurrence_mean_ms"] = round(cold_ms, 2)
    # What an upsert or delete costs the writer: rebuilding the derived indexes.
    rebuild = []
    for _ in range(3):
        t = time.perf_counter()
        eng.requests.retriever.catalog_changed(NOW_MS)
        rebuild.append(time.perf_counter() - t)
    benchmark.extra_info["catalog_change_rebuild_ms"] = round(min(rebuild) * 1e3, 1)


def test_candidates_ann_only(benchmark, world):
    benchmark.group = f"candidates-{_label(world['n'])}"
    it = itertools.cycle(world["queries"])
    benchmark(lambda: world["ann"].query(next(it), world["k"]))
    _info(benchmark, world)


def _paired_ratio(world, other, rounds: int = 400) -> float:
    """Median of (other's time / the served index's time), the two queried alternately.

    Sequential groups drift with the host's load; paired ratios do not.
    """
    ratios = []
    for r in range(rounds):
        q = world["queries"][r % len(world["queries"])]
        pair = []
        for idx in ((other, world["ann"]) if r % 2 else (world["ann"], other)):
            t = time.perf_counter()
            idx.query(q, world["k"])
            pair.append(time.perf_counter() - t)
        ratios.append(pair[0] / pair[1] if r % 2 else pair[1] / pair[0])
    return round(float(np.median(ratios)), 3)


def _second_copy(world, directory, **index_overrides):
    from recsvc.retrieval.ann import AnnIndex

    cfg, cat = world["cfg"], world["engine"].catalog
    copy = AnnIndex.load(directory, cat.dim, cfg.index.model_copy(update=index_overrides), cat.version,
                         alive=cat.alive[: cat.n_rows])
    copy.tune_for(world["engine"].requests.retriever.ann_ef)
    return copy


@pytest.mark.skipif(QUICK, reason="full mode only: loads a second copy of the index")
def test_candidates_ann_only_small_pages(benchmark, world):
    """The same index on 4 KiB pages (recsvc.retrieval.hugepages)."""
    from recsvc.engine import demo_cache_dir
    from recsvc.retrieval import hugepages

    benchmark.group = f"candidates-{_label(world['n'])}"
    # (The first copy's mapping is marked for huge pages, so the kernel will
    # not merge this one into it. With THP "always" this copy gets huge pages
    # too: thp_mode in extra_info says which.)
    small = _second_copy(world, demo_cache_dir(world["cfg"]), huge_pages=False)
    ratio = _paired_ratio(world, small)
    it = itertools.cycle(world["queries"])
    benchmark(lambda: small.query(next(it), world["k"]))
    _info(benchmark, world)
    benchmark.extra_info["huge_pages_mib"] = small.huge_pages.collapsed_bytes >> 20
    benchmark.extra_info["paired_ratio_small_over_huge"] = ratio
    benchmark.extra_info["thp_mode"] = hugepages.thp_mode()


@pytest.mark.skipif(QUICK, reason="full mode only: writes and loads a second copy of the index")
def test_candidates_ann_only_scattered_layout(benchmark, world, tmp_path):
    """The same graph with its nodes in a random order (as inserted: demo rows are in random order),
    against the cluster order it is served in (recsvc.retrieval.layout); both on huge pages."""
    import shutil

    from recsvc.engine import demo_cache_dir
    from recsvc.retrieval.ann import INDEX_FILE, INDEX_META
    from recsvc.retrieval.layout import node_count, reorder_index_file

    benchmark.group = f"candidates-{_label(world['n'])}"
    src = demo_cache_dir(world["cfg"])
    for name in (INDEX_FILE, INDEX_META):
        shutil.copy(src / name, tmp_path / name)
    reorder_index_file(tmp_path / INDEX_FILE, world["emb"].shape[1],
                       order=np.random.default_rng(0).permutation(node_count(tmp_path / INDEX_FILE)))
    scattered = _second_copy(world, tmp_path, reorder=False)
    ratio = _paired_ratio(world, scattered)
    it = itertools.cycle(world["queries"])
    benchmark(lambda: scattered.query(next(it), world["k"]))
    _info(benchmark, world)
    benchmark.extra_info["paired_ratio_scattered_over_clustered"] = ratio


def test_candidates_numpy_exact(benchmark, world):
    benchmark.group = f"candidates-{_label(world['n'])}"
    emb = world["emb"]
    it = itertools.cycle(world["queries"])

    def run():
        scores = emb @ next(it)
        top = np.argpartition(-scores, 1000)[:1000]
        return top[np.argsort(-scores[top])]

    benchmark(run)
    _info(benchmark, world)


@pytest.mark.skipif(QUICK, reason="full mode only: builds an index over uniform random vectors")
def test_ann_uniform_random_worst_case(benchmark):
    """For honesty: uniform random vectors, the worst case for any graph index."""
    from recsvc.config import IndexConfig
    from recsvc.retrieval.ann import AnnIndex

    rng = np.random.default_rng(0)
    n, d = 100_000, 64
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ann = AnnIndex.build(emb, np.arange(n, dtype=np.int32), IndexConfig(), progress=True)
    ef = ann.tune_for(660)
    qs = [emb[i] + 0.5 * rng.standard_normal(d).astype(np.float32) for i in range(20)]
    qs = [(q / np.linalg.norm(q)).astype(np.float32) for q in qs]
    recalls = []
    for q in qs:
        rows, _ = ann.query(q, 660)
        exact = np.argpartition(-(emb @ q), 500)[:500]
        recalls.append(np.intersect1d(rows[:500], exact).size / 500)
    benchmark.group = "candidates-uniform-100k"
    it = itertools.cycle(qs)
    benchmark(lambda: ann.query(next(it), 660))
    benchmark.extra_info.update({"items": n, "recall@500": round(float(np.mean(recalls)), 4), "ef": ef})


# --------------------------------------------------------------------------
# retrieval-kernels: compiled kernel vs numpy twin on one request's inputs

KERNELS = ["eligible_mask", "aggregate_neighbours", "merge_sources", "assemble_candidates"]


@pytest.fixture(scope="module")
def kernel_inputs(world):
    """Arguments of each kernel as the request path builds them for one user (u1, 20 consumed items)."""
    from recsvc.engine import RecommendQuery
    from recsvc.retrieval.candidates import SOURCE_NAMES

    eng = world["engine"]
    retr, cat = eng.requests.retriever, eng.catalog
    user = "u1"
    history = eng.state.history(user)
    recent, weights = eng.requests.recent(history, eng.cfg)
    flt = eng.requests.row_filter(RecommendQuery(user_id=user), history, eng.cfg)
    fargs = flt.kernel_args(cat)
    q = world["queries"][1]
    ann_rows, _ = world["ann"].query(q, world["k"])
    lists, list_scores, list_weights = retr.state.neighbour_lists(recent, weights)
    assert lists, "the warm state gives this user co-occurrence neighbours"
    size = sum(a.size for a in lists)
    # the sources' ranked rows, concatenated in priority order as the merge sees them
    cfg = eng.cfg.retrieval
    total = sum(cfg.shares.values())
    want = {s: cfg.n_candidates * cfg.shares[s] // total for s in SOURCE_NAMES}
    ranked = [retr.ann_source(q, want["ann"], flt, cfg.overfetch),
              retr.cooccurrence_source(recent, weights, want["cooccurrence"], flt),
              retr.popular_source(want["popular"], flt, NOW_MS),
              retr.fresh_source(want["fresh"], flt, NOW_MS, cfg.fresh_window_days)]
    rows = np.concatenate([r[:want[s]] for (r, _), s in zip(ranked, SOURCE_NAMES)]).astype(np.int32)
    src = np.concatenate([np.full(min(r.size, want[s]), i, np.int8)
                          for i, ((r, _), s) in enumerate(zip(ranked, SOURCE_NAMES))])
    scores = np.concatenate([v[:want[s]] for (_, v), s in zip(ranked, SOURCE_NAMES)]).astype(np.float32)
    n, S = rows.size, len(SOURCE_NAMES)
    # everything after the graph search in one call, with the arguments Retriever.candidates passes
    from recsvc.retrieval import sources

    seen = []
    assemble = sources._retrieval.assemble_candidates
    sources._retrieval.assemble_candidates = lambda *a: seen.append(a[:-3]) or assemble(*a)
    try:
        retr.candidates(q, recent, weights, flt, NOW_MS, 20, cfg)
    finally:
        sources._retrieval.assemble_candidates = assemble
    cap = 2 * cfg.n_candidates  # >= max(total, sum of the shares)
    return {
        "eligible_mask": ((ann_rows, *fargs), lambda: (np.empty(ann_rows.size, np.uint8),)),
        "aggregate_neighbours": ((lists, list_scores, np.asarray(list_weights, np.float64), *fargs),
                                 lambda: (np.empty(size, np.int32), np.empty(size, np.float32))),
        "merge_sources": ((rows, src, scores),
                          lambda: (np.empty(n, np.int32), np.empty(n, np.uint8), np.zeros((n, S), np.float32))),
        "assemble_candidates": (seen[-1], lambda: (np.empty(cap, np.int32), np.empty(cap, np.uint8),
                                                   np.zeros((cap, S), np.float32))),
    }


def _kernel_bench(benchmark, world, kernel_inputs, fn, name):
    benchmark.group = f"retrieval-kernels-{_label(world['n'])}"
    args, outputs = kernel_inputs[name]
    # outputs come in fresh (the merge needs zeroed scores): allocated outside the timed call
    benchmark.pedantic(lambda *out: fn(*args, *out), setup=lambda: (outputs(), {}),
                       rounds=200 if QUICK else 1000, warmup_rounds=10)


@pytest.mark.parametrize("name", KERNELS)
def test_retrieval_kernel_compiled(benchmark, world, kernel_inputs, name):
    from recsvc.retrieval import kernels

    _kernel_bench(benchmark, world, kernel_inputs, getattr(kernels, name), name)


@pytest.mark.parametrize("name", KERNELS)
def test_retrieval_kernel_numpy_twin(benchmark, world, kernel_inputs, name):
    from recsvc._fastpath.twins import retrieval as twin
    from recsvc.retrieval import kernels

    args, outputs = kernel_inputs[name]
    a, b = outputs(), outputs()
    assert getattr(twin, name)(*args, *a) == getattr(kernels, name)(*args, *b)  # same count, same inputs
    _kernel_bench(benchmark, world, kernel_inputs, getattr(twin, name), name)


#: Compiled benchmark -> its numpy twin (same catalog, same kernel); the run fails if the compiled one is
#: slower (benchmarks/conftest.py, "the gate").
KERNEL_TWINS = [(test_retrieval_kernel_compiled, test_retrieval_kernel_numpy_twin)]
