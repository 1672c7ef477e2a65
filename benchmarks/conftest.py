"""Benchmark fixtures. RECSVC_BENCH_QUICK=1 (CI) shrinks catalogs and skips the 1M build."""

from __future__ import annotations

import os
import time

import numpy as np

QUICK = os.environ.get("RECSVC_BENCH_QUICK", "") not in ("", "0")
NOW_MS = 1_795_910_400_000


def demo_config(n_items: int, dim: int = 64):
    from recsvc.config import Config

    return Config().with_overrides({
        "catalog": {"demo": {"n_items": n_items, "dim": dim}},
        "exploration": {"seed": 1},
    })


def coherent_users(catalog, n: int, seed: int = 11) -> list[np.ndarray]:
    """User vectors as real users look: the mean of 8 liked items from 1-2 categories."""
    rng = np.random.default_rng(seed)
    emb = catalog.embeddings[: catalog.n_rows]
    cats = catalog.categories[: catalog.n_rows]
    out = []
    for _ in range(n):
        liked = rng.choice(catalog.n_categories, size=rng.integers(1, 3), replace=False)
        pool = np.flatnonzero(np.isin(cats, liked))
        q = emb[rng.choice(pool, size=8, replace=False)].mean(axis=0)
        out.append((q / np.linalg.norm(q)).astype(np.float32))
    return out


def timed_load(cfg):
    """Load or build (once, cached under ~/.cache/recsvc) the demo catalog and index."""
    from recsvc.engine import demo_cache_dir, load_catalog_and_index

    built = not (demo_cache_dir(cfg) / "index.bin").exists()
    t = time.perf_counter()
    catalog, ann = load_catalog_and_index(cfg, progress=True)
    return catalog, ann, time.perf_counter() - t, built
