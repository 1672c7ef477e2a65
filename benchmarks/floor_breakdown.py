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
the issue's target of 2x. Per-kernel medians are printed too.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--policy", default="thompson", choices=["thompson", "greedy"])
    ap.add_argument("--pause-ms", type=float, default=1.0)
    args = ap.parse_args()

    timers = Timers()
    install(timers)
    from bench_floor import _warm_engine  # noqa: E402 (after the kernels are wrapped)
    from conftest import coherent_users, demo_config, timed_load
    from recsvc.engine import RecommendQuery

    cfg = demo_config(args.items)
    if args.policy != "thompson":
        cfg = cfg.with_overrides({"exploration": {"policy": args.policy}})
    catalog, ann, _, _ = timed_load(cfg)
    engine = _warm_engine(cfg, catalog, ann, tempfile.mkdtemp())
    bare = ann._index
    ann._index = TimedIndex(bare, timers)
    users = coherent_users(catalog, 64)
    path, rcfg = engine.requests, engine.cfg.retrieval
    want = int(round(rcfg.n_candidates * rcfg.shares["ann"] / sum(rcfg.shares.values())))
    k_of = {}
    for u in range(300):
        flt = path.row_filter(RecommendQuery(user_id=f"u{u}"), engine.state.history(f"u{u}"), engine.cfg)
        k_of[u] = path.retriever.ann_fetch(want, flt, rcfg.overfetch)

    def request(r: int) -> None:
        rec = engine.recommend(RecommendQuery(user_id=f"u{r % 300}", n=20, user_embedding=users[r % 64]))
        assert len(rec.items) == 20 and not rec.degraded

    for r in range(128):  # warm-up
        request(r)
        bare.knn_query(users[(r + 16) % 64], k=k_of[(r + 16) % 300], num_threads=1)

    total, query = [], []
    per_kernel: dict[str, list[int]] = defaultdict(list)
    walk, kernels = [], []
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
        kernels.append(sum(v for k, v in timers.ns.items() if k != "hnswlib.knn_query"))
        for k, v in timers.ns.items():
            per_kernel[k].append(v)
        time.sleep(args.pause_ms / 1e3)
        u = r + 16  # another user's vector: no graph region warmed by the request's own walk
        t = clock()
        bare.knn_query(users[u % 64], k=k_of[u % 300], num_threads=1)
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
    print(f"| kernels after the walk | {med['kernels']:.0f} | {med['kernels'] / bq:.2f}x |")
    print("\nper kernel (median us per request, calls that ran in at least half the requests):")
    rows = sorted(((float(np.median(v)) / 1e3, k) for k, v in per_kernel.items() if len(v) >= args.rounds // 2),
                  reverse=True)
    for m, k in rows:
        print(f"  {k:<45} {m:8.1f}")


if __name__ == "__main__":
    main()
