"""End to end: one Recommend through every stage, and durable feedback ingest.

Groups:
- ``recommend-<size>``: ``Engine.recommend`` (all four stages, Thompson sampling with
  propensities, quotas; the medians of its stage timings are checked against the configured
  budgets), beside ``numpy_exact_topn`` — exact scores over every item +
  argpartition + sort for the top n: the plainest recommender, no funnel.
- ``feedback-ingest``: batches of 100 click events with ``fsync = "batch"`` (fdatasync
  before every acknowledgement); events/s in ``extra_info``.
"""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest

from conftest import NOW_MS, QUICK, coherent_users, demo_config, stage_info, timed_load

SIZE = 20_000 if QUICK else 100_000


@pytest.fixture(scope="module")
def engine_world(tmp_path_factory):
    from recsvc.engine import Engine, FeedbackEventIn
    from recsvc.state.store import LocalStateStore

    cfg = demo_config(SIZE).with_overrides({"state": {"dir": str(tmp_path_factory.mktemp("state"))}})
    catalog, ann, _, _ = timed_load(cfg)
    store = LocalStateStore(cfg.state.dir, fsync=True)
    engine = Engine(cfg, catalog, ann, store=store, clock=lambda: NOW_MS)
    rng = np.random.default_rng(0)
    events = [FeedbackEventIn(f"w{i}", f"u{i % 300}", catalog.item_ids[int(rng.integers(5000))], "click")
              for i in range(6000)]
    for start in range(0, len(events), 1000):
        engine.feedback(events[start:start + 1000])
    yield engine, coherent_users(catalog, 64)
    engine.close(snapshot=False)


def test_recommend_recsvc(benchmark, engine_world):
    from recsvc.engine import RecommendQuery

    engine, users = engine_world
    benchmark.group = f"recommend-{SIZE // 1000}k"
    it = itertools.count()
    timings = []

    def run():
        i = next(it)
        rec = engine.recommend(RecommendQuery(user_id=f"u{i % 300}", n=20, user_embedding=users[i % len(users)]))
        timings.append(rec.timings_us)
        return rec

    rec = benchmark(run)
    assert len(rec.items) == 20 and not rec.degraded
    benchmark.extra_info.update({k: v for k, v in rec.timings_us.items()})
    # every request's stages: their medians are checked against the budgets (conftest, "the gate")
    benchmark.extra_info.update(stage_info(timings, engine.cfg.budgets))


def test_recommend_numpy_exact_topn(benchmark, engine_world):
    engine, users = engine_world
    benchmark.group = f"recommend-{SIZE // 1000}k"
    emb = engine.catalog.embeddings[: engine.catalog.n_rows]
    it = itertools.cycle(users)

    def run():
        s = emb @ next(it)
        top = np.argpartition(-s, 20)[:20]
        return top[np.argsort(-s[top])]

    benchmark(run)


def test_feedback_ingest_durable(benchmark, engine_world):
    from recsvc.engine import FeedbackEventIn

    engine, _ = engine_world
    benchmark.group = "feedback-ingest"
    ids = engine.catalog.item_ids
    rng = np.random.default_rng(1)
    batches = []
    for b in range(300):
        batches.append([FeedbackEventIn(uuid.uuid4().hex, f"u{int(rng.integers(5000))}",
                                        ids[int(rng.integers(SIZE))], "click") for _ in range(100)])
    it = iter(batches)

    def run():
        res = engine.feedback(next(it))
        assert res.accepted == 100

    rounds = 50 if QUICK else 250
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["events_per_s"] = round(100 / benchmark.stats.stats.median)
    benchmark.extra_info["fsync"] = "fdatasync per batch"
