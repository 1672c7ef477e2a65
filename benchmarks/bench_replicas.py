"""The Redis backend: feedback ingest beside the embedded log, and the lag from an ack to another replica.

Groups:
- ``feedback-ingest``: batches of 100 click events into the Redis backend (one Lua call: SET NX per event +
  XADD; Redis with ``appendonly yes``, ``appendfsync always``), acknowledged once this replica applied them;
  beside ``bench_engine.py``'s embedded durable ingest. events/s in ``extra_info`` (target >= 20,000).
- ``stream-lag``: one click acknowledged at replica A until replica B's read model shows it, p50/p99 in
  ``extra_info`` (target p99 <= 100 ms), measured while a third thread ingests batches at A.

The gRPC throughput of 1 and 2 worker processes beside an echo server is ``benchmarks/grpc_load.py`` (whole
processes and a load client, so it is a script, not a pytest-benchmark group).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import NOW_MS, QUICK, demo_config, timed_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
pytest.importorskip("redis")

SIZE = 20_000 if QUICK else 100_000


@pytest.fixture(scope="module")
def redis_world(tmp_path_factory):
    from redis_server import RedisServer

    from recsvc.engine import Engine
    from recsvc.state.redis_journal import RedisJournal

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    cfg = demo_config(SIZE).with_overrides({"state": {"backend": "redis", "redis_url": server.url,
                                                      "redis_prefix": "bench"}})
    catalog, ann, _, _ = timed_load(cfg)
    a = Engine(cfg, catalog, ann, clock=lambda: NOW_MS, journal=RedisJournal(cfg))
    catalog_b, ann_b, _, _ = timed_load(cfg)  # a replica of its own: its own catalog, index and read model
    b = Engine(cfg, catalog_b, ann_b, clock=lambda: NOW_MS, journal=RedisJournal(cfg))
    yield a, b
    a.close(snapshot=False)
    b.close(snapshot=False)
    server.stop()


def test_feedback_ingest_redis(benchmark, redis_world):
    from recsvc.engine import FeedbackEventIn

    a, _ = redis_world
    benchmark.group = "feedback-ingest"
    ids = a.catalog.item_ids
    rng = np.random.default_rng(1)
    batches = iter([[FeedbackEventIn(uuid.uuid4().hex, f"u{int(rng.integers(5000))}", ids[int(rng.integers(SIZE))],
                                     "click") for _ in range(100)] for _ in range(300)])

    def run():
        assert a.feedback(next(batches)).accepted == 100

    benchmark.pedantic(run, rounds=50 if QUICK else 250, iterations=1, warmup_rounds=0)
    benchmark.extra_info["events_per_s"] = round(100 / benchmark.stats.stats.median)
    benchmark.extra_info["redis"] = "appendonly yes, appendfsync always"


def test_stream_lag_to_another_replica(benchmark, redis_world):
    from recsvc.engine import FeedbackEventIn

    a, b = redis_world
    benchmark.group = "stream-lag"
    ids = a.catalog.item_ids
    stop = threading.Event()

    def background_load():  # ingest keeps flowing while lag is measured
        rng = np.random.default_rng(2)
        while not stop.is_set():
            a.feedback([FeedbackEventIn(uuid.uuid4().hex, f"bg{int(rng.integers(5000))}",
                                        ids[int(rng.integers(SIZE))], "click") for _ in range(100)])

    loader = threading.Thread(target=background_load, daemon=True)
    loader.start()
    lags = []
    counter = iter(range(10**9))

    def one():
        k = next(counter)
        user = f"lag-{k}"
        a.feedback([FeedbackEventIn(uuid.uuid4().hex, user, ids[k % SIZE], "click")])
        t = time.perf_counter()  # acknowledged
        while not b.state.history(user):
            time.sleep(0.0002)
        lags.append(time.perf_counter() - t)

    try:
        benchmark.pedantic(one, rounds=50 if QUICK else 300, iterations=1, warmup_rounds=1)
    finally:
        stop.set()
        loader.join(10)
    ms = np.asarray(lags) * 1e3
    benchmark.extra_info.update({"lag_p50_ms": round(float(np.percentile(ms, 50)), 2),
                                 "lag_p99_ms": round(float(np.percentile(ms, 99)), 2),
                                 "lag_max_ms": round(float(ms.max()), 2)})
