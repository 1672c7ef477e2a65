"""The served-slate log in memory (issue 16): bytes per remembered slate, and what recording and looking one up
cost, for the compact columns (``recsvc.state.served_ring.ServedRing``) beside the representation before it
(``ObjectLog``: an OrderedDict of ``ServedSlate`` objects, one per slate, as ``ReadModel`` held them).

Slates are real ones: 64 templates each of 10 and 20 items served by an engine (100k demo catalog; 20k in quick
mode) to coherent users with a history, so every feature column is as the request path logs it; each remembered
slate is a copy with its own request id (a uuid4, as the request path makes), user id string, lists and feature
bytes, as a request builds them.

Groups:
- ``served-log-bytes``: tracemalloc bytes per slate for 200,000 slates (20,000 in quick mode) of 10 and of 20
  items in each representation (``extra_info``: bytes per slate; the timed body is one ``append``).
- ``served-log-lookup``: one ``served_slate``-style lookup (with and without the features) in each.

``python benchmarks/bench_served_log.py [n_slates]`` prints the table recorded in ``benchmarks/README.md``.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import tracemalloc
import uuid
from collections import OrderedDict

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import NOW_MS, QUICK, coherent_users, demo_config, timed_load  # noqa: E402

from recsvc.state.records import ServedSlate  # noqa: E402
from recsvc.state.served_ring import ServedRing  # noqa: E402

SIZE = 20_000 if QUICK else 100_000
N_SLATES = 20_000 if QUICK else 200_000


class ObjectLog:
    """The representation before issue 16: one ``ServedSlate`` per slate in an OrderedDict (the baseline)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[str, ServedSlate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def append(self, slate: ServedSlate) -> None:
        self._d[slate.request_id] = slate
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def get(self, request_id: str, features: bool = True) -> ServedSlate | None:
        return self._d.get(request_id)


def template_slates(n_items: int, count: int = 64) -> list[ServedSlate]:
    """Real slates of ``n_items`` served to users with a history (every logged feature as the request path logs
    it); a few clicks first so co-occurrence and popularity sources contribute."""
    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
    from recsvc.state.store import MemoryStateStore

    cfg = demo_config(SIZE)
    catalog, ann, _, _ = timed_load(cfg)
    engine = Engine(cfg, catalog, ann, store=MemoryStateStore(), clock=lambda: NOW_MS)
    try:
        rng = np.random.default_rng(0)
        engine.feedback([FeedbackEventIn(f"w{i}", f"u{i % 300}", catalog.item_ids[int(rng.integers(5000))], "click")
                         for i in range(3000)])
        users = coherent_users(catalog, count)
        out = []
        for i in range(count):
            rec = engine.recommend(RecommendQuery(user_id=f"u{i % 300}", n=n_items, user_embedding=users[i],
                                                  context={"device": "mobile", "hour": str(i % 24)}))
            out.append(engine.state.served_slate(rec.request_id))
        return out
    finally:
        engine.close(snapshot=False)


def fresh_copy(t: ServedSlate, i: int) -> ServedSlate:
    """A copy with its own objects, as the request path builds one per request."""
    return ServedSlate(uuid.uuid4().hex, f"user-{i % 50_000}", str(t.variant), [tuple(a) for a in t.arms],
                       [int(r) for r in t.rows], [float(p) for p in t.propensities], t.served_at_ms + i,
                       bytes(bytearray(t.features)), list(t.feature_names), t.diversity, t.novelty,
                       random_slice=t.random_slice, random_p=t.random_p)


def bytes_per_slate(log_cls, templates: list[ServedSlate], n: int) -> float:
    """tracemalloc bytes per slate of ``n`` slates remembered in ``log_cls`` (the slates' own objects included:
    once remembered, only the log keeps them alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        log = log_cls(n)
        for i in range(n):
            log.append(fresh_copy(templates[i % len(templates)], i))
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(log) == n
    del log
    return used / n


@pytest.fixture(scope="module")
def templates():
    return {k: template_slates(k) for k in (10, 20)}


@pytest.mark.parametrize("n_items", [10, 20])
@pytest.mark.parametrize("kind", ["objects", "columns"])
def test_served_log_bytes(benchmark, templates, kind, n_items):
    """Bytes per remembered slate (``extra_info``), and the cost of remembering one."""
    log_cls = ObjectLog if kind == "objects" else ServedRing
    per = bytes_per_slate(log_cls, templates[n_items], N_SLATES)
    benchmark.group = f"served-log-record-{n_items}"
    benchmark.extra_info.update({"bytes_per_slate": round(per), "n_slates": N_SLATES})
    log = log_cls(N_SLATES)
    slates = [fresh_copy(templates[n_items][i % 64], i) for i in range(50_000)]
    it = itertools.cycle(slates)
    benchmark(lambda: log.append(next(it)))
    if kind == "columns":
        # the budget of issue 16: 200,000 slates well under 200 MB
        assert per < 1000, f"{per:.0f} bytes per slate"


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("kind", ["objects", "columns"])
def test_served_log_lookup(benchmark, templates, kind, features):
    log = (ObjectLog if kind == "objects" else ServedRing)(N_SLATES)
    slates = [fresh_copy(templates[20][i % 64], i) for i in range(min(N_SLATES, 50_000))]
    for s in slates:
        log.append(s)
    benchmark.group = f"served-log-lookup-{'features' if features else 'no-features'}"
    ids = itertools.cycle([s.request_id for s in slates[::7]])
    got = benchmark(lambda: log.get(next(ids), features))
    assert got is not None and len(got.rows) == 20


def engine_world():
    """An engine as ``bench_engine.py`` builds it (100k demo catalog, 20k in quick mode; durable local log)."""
    import tempfile

    from recsvc.engine import Engine, FeedbackEventIn
    from recsvc.state.store import LocalStateStore

    cfg = demo_config(SIZE).with_overrides({"state": {"dir": tempfile.mkdtemp(prefix="recsvc-bench-")}})
    catalog, ann, _, _ = timed_load(cfg)
    engine = Engine(cfg, catalog, ann, store=LocalStateStore(cfg.state.dir, fsync=True), clock=lambda: NOW_MS)
    rng = np.random.default_rng(0)
    engine.feedback([FeedbackEventIn(f"w{i}", f"u{i % 300}", catalog.item_ids[int(rng.integers(5000))], "click")
                     for i in range(3000)])
    return engine, coherent_users(catalog, 64)


def recommend_interleaved(rounds: int) -> dict[str, list[float]]:
    """``Engine.recommend`` (n = 20, Thompson, recording its slate) with the served log as columns and as objects,
    alternating call by call in one process: seconds per call of each."""
    import time

    from recsvc.engine import RecommendQuery

    engine, users = engine_world()
    logs = {"columns": engine._state._served, "objects": ObjectLog(engine.cfg.state.served_log_size)}
    times: dict[str, list[float]] = {k: [] for k in logs}
    try:
        for i in range(2 * rounds + 200):
            kind = ("columns", "objects")[i % 2]
            engine._state._served = logs[kind]
            q = RecommendQuery(user_id=f"u{i % 300}", n=20, user_embedding=users[i % len(users)])
            t = time.perf_counter()
            engine.recommend(q)
            if i >= 200:  # warm-up
                times[kind].append(time.perf_counter() - t)
    finally:
        engine._state._served = logs["columns"]
        engine.close(snapshot=False)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_per_slate(kind: str, templates_path: str, n_items: int, n: int) -> float:
    """Resident-set growth per slate of ``n`` slates remembered in a fresh process (``main`` runs it)."""
    import subprocess

    code = (f"import sys, gc, pickle; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import bench_served_log as b; "
            f"t = pickle.load(open({templates_path!r}, 'rb'))[{n_items}]; "
            f"slates = None; gc.collect(); before = b.rss_bytes(); "
            f"log = (b.ObjectLog if {kind!r} == 'objects' else b.ServedRing)({n}); "
            f"[log.append(b.fresh_copy(t[i % len(t)], i)) for i in range({n})]; gc.collect(); "
            "print((b.rss_bytes() - before) / len(log))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main(n: int) -> None:
    import pickle
    import tempfile

    templates = {k: template_slates(k) for k in (10, 20)}
    with tempfile.NamedTemporaryFile(suffix=".pickle", delete=False) as fh:
        pickle.dump(templates, fh)
    t = templates[20][0]
    parts = {"request_id": sys.getsizeof(t.request_id), "user_id": sys.getsizeof(t.user_id),
             "rows": sys.getsizeof(t.rows) + sum(sys.getsizeof(r) for r in t.rows if r > 256),
             "propensities": sys.getsizeof(t.propensities) + sum(sys.getsizeof(p) for p in t.propensities),
             "features": sys.getsizeof(t.features), "feature_names (list)": sys.getsizeof(t.feature_names),
             "object": sys.getsizeof(t)}
    print("one 20-item ServedSlate, getsizeof of its parts (bytes):", parts)
    for k in (10, 20):
        for name, cls in (("objects (before)", ObjectLog), ("columns (ServedRing)", ServedRing)):
            per = bytes_per_slate(cls, templates[k], n)
            rss = rss_per_slate("objects" if cls is ObjectLog else "columns", fh.name, k, n)
            print(f"{k:>2} items  {name:<22} {per:8.0f} bytes/slate traced, {rss:8.0f} resident  "
                  f"{per * 200_000 / 2**20:7.1f} MiB traced at 200,000")
    os.unlink(fh.name)
    times = recommend_interleaved(2000 if not QUICK else 500)
    for kind, t in times.items():
        t = np.sort(np.asarray(t)) * 1e3
        print(f"Engine.recommend, served log as {kind:<8} median {np.median(t):.3f} ms  p25 {t[len(t) // 4]:.3f} ms  "
              f"min {t[0]:.3f} ms  ({t.size} calls, interleaved)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else N_SLATES)
