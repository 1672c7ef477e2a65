"""Shared fixtures: small deterministic catalogs, configs, engines and a live server."""

from __future__ import annotations

import os

# Single-threaded BLAS, as the server runs (set before numpy is imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import socket
from pathlib import Path

import pytest

from recsvc.catalog import demo_catalog
from recsvc.config import Config, DemoCatalogConfig, deep_merge

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NOW_MS = 1_795_910_400_000  # the demo catalog's anchor, 2026-11-29


class FakeClock:
    """Injected time: tests move it explicitly."""

    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def small_config(tmp_path: Path, **overrides) -> Config:
    base = {
        "catalog": {"cache_dir": str(tmp_path / "cache"),
                    "demo": {"n_items": 3000, "dim": 16, "n_categories": 20, "n_topics": 6, "seed": 7}},
        "state": {"dir": str(tmp_path / "state")},
        "retrieval": {"n_candidates": 300, "shares": {"ann": 180, "cooccurrence": 60, "popular": 30, "fresh": 30}},
        "exploration": {"seed": 1234},
        "index": {"ef_construction": 100},
        "metrics": {"port": 0},  # tests run side by side on one machine: no fixed metrics port
    }
    cfg = Config()
    return cfg.with_overrides(deep_merge(base, overrides))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cfg(tmp_path) -> Config:
    return small_config(tmp_path)


@pytest.fixture(scope="session")
def small_catalog():
    return demo_catalog(DemoCatalogConfig(n_items=3000, dim=16, n_categories=20, n_topics=6, seed=7))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server per test module (skips without one outside CI: see redis_server.py)."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def engine(cfg, clock):
    from recsvc.engine import Engine

    eng = Engine.from_config(cfg, clock=clock)
    yield eng
    eng.close(snapshot=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
