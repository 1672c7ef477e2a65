"""Where a request's time goes beside its graph search: the walk, the compiled kernels, and the rest.

    python benchmarks/floor_breakdown.py [--items 100000] [--rounds 400] [--policy thompson|greedy]

On the demo catalog, warm state and 64 coherent user vectors of ``bench_floor.py`` (n = 20), every
callable of the compiled modules (``recsvc._fastpath._retrieval``, ``_ranking``, ``_sampling``,
``_reranking``, ``_served``) and the index's ``knn_query`` are wrapped in a timer, and ``Engine.recommend``
is called interleaved with the bare ``knn_query`` (the same k and ef as the ANN source's fetch), with a 1 ms
pause before each call as in ``bench_floor.py``. Per request it splits the time into:

- **walk**: hnswlib's ``knn_query`` inside the request;
- **kernels**: the compiled calls (each call's own time; a call's wrapper adds ~0.1 µs);
- **the rest**: Python and numpy between them (validation, the state's reads, gathers, the response and the
  served record's Python side).

"Walk + kernels" is what a request would cost if everything between the compiled calls cost nothing — the
bound on "one compiled call from candidates to slate" that keeps today's kernels and their work (the same
Beta draws, the same Monte-Carlo propensity rounds). It is printed as a multiple of the bare query, beside
the issue's target of 2x, and once more without the final slate's Monte-Carlo propensity rounds (the bound if
propensities came for free, e.g. from an exact formula), with what would be left for everything else at 2x.
Per-kernel medians are printed too; ``--functions`` adds the request path's main Python functions, each
timed inclusive of what it calls (their own time: subtract the kernels they call).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODULES = ("_retrieval", "_ranking", "_sampling", "_reranking", "_served")
#: the final slate's Monte-Carlo propensity rounds (the Beta draws of 128 rounds and the re-ranked rounds' counts)
PROPENSITY_ROUNDS = ("_sampling.thompson_score_draws", "_reranking.slate_inclusion_counts")
TARGET = 2.0  # issue 16: Engine.recommend <= 2x the bare query


class Timers:
    """Accumulated nanoseconds per kernel, for the request being served."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.on = False

    def wrap(self, name: str, fn):
        clock = time.perf_counter_ns
        ns = self.ns

        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                ns[name] += clock() - t

        timed.__wrapped__ = fn
        return timed


class TimedIndex:
    """The hnswlib index with its ``knn_query`` timed; every other attribute passes through."""

    def __init__(self, index, timers: Timers) -> None:
        object.__setattr__(self, "_inner", index)
        object.__setattr__(self, "knn_query", timers.wrap("hnswlib.knn_query", index.knn_query))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def install(timers: Timers) -> None:
    """Wrap every public callable of the compiled modules, before recsvc's modules are imported."""
    import importlib

    for mod_name in MODULES:
        mod = importlib.import_module(f"recsvc._fastpath.{mod_name}")
        for attr in dir(mod):
            fn = getattr(mod, attr)
            if attr.startswith("__") or not callable(fn) or isinstance(fn, type):
                continue
            setattr(mod, attr, timers.wrap(f"{mod_name}.{attr}", fn))


def wrap_functions(timers: Timers) -> None:
    """Time the request path's Python functions too (``--functions``), each inclusive of what it calls."""
    import recsvc.exploration as exploration
    import recsvc.feedback as feedback
    import recsvc.metrics as metrics
    import recsvc.ranking as ranking
    import recsvc.request_path as request_path
    import recsvc.retrieval.ann as ann
    import recsvc.retrieval.sources as sources
    import recsvc.slate_propensity as slate_propensity
    import recsvc.state.online as online

    methods = {
        request_path.RequestPath: ("recommend", "user_vector", "row_filter", "feature_inputs", "_selection_plan",
                                   "_rerank_in_order", "_random_p"),
        sources.Retriever: ("candidates",),
        ann.AnnIndex: ("query_labels",),
        online.ReadModel: ("history", "bandit_evidence", "log_popularity", "neighbour_lists"),
        ranking.Ranker: ("score_gathered",),
        feedback.FeedbackPath: ("record_served",),
    }
    for cls, names in methods.items():
        for name in names:
            setattr(cls, name, timers.wrap(f"py {cls.__name__}.{name}", getattr(cls, name)))
    for mod, name in ((ranking, "gather_features"), (exploration, "explore_with_prior"),
                      (slate_propensity, "slate_propensities"), (metrics, "observe_recommendation")):
        setattr(mod, name, timers.wrap(f"py {mod.__name__.rsplit('.', 1)[-1]}.{name}", getattr(mod, name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--policy", default="thompson", choices=["thompson", "greedy"])
    ap.add_argument("--pause-ms", type=float, default=1.0)
    ap.add_argument("--functions", action="store_true",
                    help="also time the request path's Python functions (inclusive; kernels inside them counted "
                         "in both), printed with the kernels")
    args = ap.parse_args()

    timers = Timers()
    install(timers)
    from bench_floor import _warm_engine, ann_fetches  # noqa: E402 (after the kernels are wrapped)
    from conftest import coherent_users, demo_config, timed_load
    from recsvc.engine import RecommendQuery

    cfg = demo_config(args.items)
    if args.policy != "thompson":
        cfg = cfg.with_overrides({"exploration": {"policy": args.policy}})
    catalog, ann, _, _ = timed_load(cfg)
    engine = _warm_engine(cfg, catalog, ann, tempfile.mkdtemp())
    bare = ann._index
    ann._index = TimedIndex(bare, timers)
    if args.functions:
        wrap_functions(timers)
    users = coherent_users(catalog, 64)
    k_of = ann_fetches(engine)  # user id -> the k of their ANN fetch

    def request(r: int) -> None:
        rec = engine.recommend(RecommendQuery(user_id=f"u{r % 300}", n=20, user_embedding=users[r % 64]))
        assert len(rec.items) == 20 and not rec.degraded

    for r in range(128):  # warm-up
        request(r)
        bare.knn_query(users[(r + 16) % 64], k=k_of[f"u{(r + 16) % 300}"], num_threads=1)

    total, query = [], []
    per_kernel: dict[str, list[int]] = defaultdict(list)
    walk, kernels, rounds_ns = [], [], []
    clock = time.perf_counter_ns
    for r in range(args.rounds):
        time.sleep(args.pause_ms / 1e3)
        timers.ns.clear()
        timers.on = True
        t = clock()
        request(r)
        total.append(clock() - t)
        timers.on = False
        w = timers.ns.get("hnswlib.knn_query", 0)
        walk.append(w)
        kernels.append(sum(v for k, v in timers.ns.items() if k != "hnswlib.knn_query" and not k.startswith("py ")))
        for k, v in timers.ns.items():
            per_kernel[k].append(v)
        rounds_ns.append(sum(timers.ns.get(k, 0) for k in PROPENSITY_ROUNDS))
        time.sleep(args.pause_ms / 1e3)
        u = r + 16  # another user's vector: no graph region warmed by the request's own walk
        t = clock()
        bare.knn_query(users[u % 64], k=k_of[f"u{u % 300}"], num_threads=1)
        query.append(clock() - t)
    engine.close(snapshot=False)

    total_a, walk_a, kern_a, q_a = (np.asarray(x, float) / 1e3 for x in (total, walk, kernels, query))
    rest_a = total_a - walk_a - kern_a
    bq = float(np.median(q_a))
    med = {name: float(np.median(a)) for name, a in
           (("recommend", total_a), ("walk", walk_a), ("kernels", kern_a), ("rest", rest_a))}
    print(f"floor breakdown: {args.items:,} items, policy {args.policy}, {args.rounds} interleaved rounds")
    print(f"bare knn_query (k = {max(k_of.values())}): median {bq:.0f} us")
    print("| per request | median us | x bare query |")
    print("|---|---|---|")
    for name in ("recommend", "walk", "kernels", "rest"):
        print(f"| {name} | {med[name]:.0f} | {med[name] / bq:.2f}x |")
    floor = walk_a + kern_a
    print(f"| walk + kernels (everything between them free) | {np.median(floor):.0f} | "
          f"{np.median(floor) / bq:.2f}x |")
    mc = np.asarray(rounds_ns, float) / 1e3
    free = np.median(floor - mc)
    print(f"| walk + kernels without the propensity rounds (free propensities) | {free:.0f} | {free / bq:.2f}x |")
    print(f"| left for everything else at the target ({TARGET:g}x), propensities free | "
          f"{TARGET * bq - free:.0f} | {TARGET - free / bq:.2f}x |")
    print("\nper kernel (median us per request, calls that ran in at least half the requests; 'py': a Python "
          "function, inclusive):")
    rows = sorted(((float(np.median(v)) / 1e3, k) for k, v in per_kernel.items() if len(v) >= args.rounds // 2),
                  reverse=True)
    for m, k in rows:
        print(f"  {k:<45} {m:8.1f}")


if __name__ == "__main__":
    main()
