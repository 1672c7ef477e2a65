"""numpy twins of ``_retrieval.pyx``: the same results, for parity tests and baselines.

The kernels' conventions (see the .pyx): rows at or beyond ``alive.size`` are
not eligible; a category code beyond a mask is neither allowed nor blocked;
``exclude`` is sorted; de-duplication keeps first-seen order.
"""

from __future__ import annotations

import numpy as np


def eligible_mask(rows, alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude, out):
    rows = np.asarray(rows, np.int64)
    inside = (rows >= 0) & (rows < alive.size)
    r = np.where(inside, rows, 0)
    ok = inside & alive[r].astype(bool) & (maturity[r] <= max_maturity)
    cats = categories[r]
    if has_allowed:
        ok &= (cats >= 0) & (cats < allowed.size) & allowed[np.clip(cats, 0, max(allowed.size - 1, 0))].astype(bool) \
            if allowed.size else np.zeros_like(ok)
    if blocked.size:
        ok &= ~((cats >= 0) & (cats < blocked.size) & blocked[np.clip(cats, 0, blocked.size - 1)].astype(bool))
    if exclude.size:
        ok &= ~np.isin(rows, exclude)
    out[: rows.size] = ok
    return int(ok.sum())


def _first_seen_unique(rows):
    uniq, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique rows in first-seen order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return uniq[order], rank[inverse.ravel()]


def aggregate_neighbours(neighbour_rows, neighbour_scores, weights, alive, maturity, categories, max_maturity,
                         allowed, has_allowed, blocked, exclude, out_rows, out_scores):
    if not neighbour_rows:
        return 0
    rows = np.concatenate(neighbour_rows).astype(np.int32)
    scores = np.concatenate([np.asarray(s, np.float64) * w for s, w in zip(neighbour_scores, weights)])
    if rows.size == 0:
        return 0
    uniq, inv = _first_seen_unique(rows)
    sums = np.zeros(uniq.size, np.float64)
    np.add.at(sums, inv, scores)
    keep = np.zeros(uniq.size, np.uint8)
    eligible_mask(uniq, alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude, keep)
    keep = keep.astype(bool)
    n = int(keep.sum())
    out_rows[:n] = uniq[keep]
    out_scores[:n] = sums[keep]
    return n


def merge_sources(rows, src, scores, out_rows, out_sources, out_scores):
    if rows.size == 0:
        return 0
    uniq, inv = _first_seen_unique(rows)
    n, n_src = uniq.size, out_scores.shape[1]
    best = np.full((n, n_src), -np.inf, np.float32)
    np.maximum.at(best, (inv, src.astype(np.intp)), scores.astype(np.float32))
    sources = np.zeros(n, np.uint8)
    np.bitwise_or.at(sources, inv, (1 << src.astype(np.uint8)).astype(np.uint8))
    out_rows[:n] = uniq
    out_sources[:n] = sources
    out_scores[:n] = np.where(np.isneginf(best), 0.0, best)
    return n
