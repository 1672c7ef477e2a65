"""Plain-numpy twins of ``recsvc._fastpath._reranking``: same arguments, same outputs.

See the compiled module's header for the conventions (negative category =
uncategorised, ``max_per_category <= 0`` = no quota, ``max_sim`` = -inf before
anything is chosen, ties to the lowest index).
"""

from __future__ import annotations

import numpy as np


def _at_quota(c: int, max_per_category: int, counts: np.ndarray) -> bool:
    return max_per_category > 0 and 0 <= c < counts.shape[0] and counts[c] >= max_per_category


def select_with_quotas(
    order: np.ndarray,
    categories: np.ndarray,
    max_per_category: int,
    k: int,
    counts: np.ndarray,
    out: np.ndarray,
) -> int:
    if k < 0 or k > out.shape[0]:
        raise ValueError("re-ranking kernel: array shapes disagree (call it through recsvc.reranking)")
    m = categories.shape[0]
    if order.size and (order.min() < 0 or order.max() >= m):
        raise IndexError("re-ranking kernel: an order entry is outside the candidate pool")
    if max_per_category <= 0:
        count = min(k, order.shape[0])
        out[:count] = order[:count]
        cats = categories[order[:count]]
        cats = cats[(cats >= 0) & (cats < counts.shape[0])]
        np.add.at(counts, cats, 1)
        return count
    # Rank of each candidate within its category (in walk order); a candidate is
    # kept iff its rank + the category's starting count is under the quota.
    # That is the greedy walk, except that the walk also stops after k items.
    cats = categories[order]
    limited = (cats >= 0) & (cats < counts.shape[0])
    keep = np.ones(order.shape[0], bool)
    if limited.any():
        lc = cats[limited]
        idx = np.flatnonzero(limited)
        by_cat = np.argsort(lc, kind="stable")
        sorted_c = lc[by_cat]
        starts = np.searchsorted(sorted_c, sorted_c, side="left")
        rank = np.empty_like(by_cat)
        rank[by_cat] = np.arange(by_cat.shape[0]) - starts
        keep[idx] = rank + counts[lc] < max_per_category
    chosen = order[keep][:k]
    out[: chosen.shape[0]] = chosen
    cc = categories[chosen]
    cc = cc[(cc >= 0) & (cc < counts.shape[0])]
    np.add.at(counts, cc, 1)
    return int(chosen.shape[0])


def mmr_select(
    scores: np.ndarray,
    emb: np.ndarray,
    emb_rows: np.ndarray,
    lam: float,
    k: int,
    categories: np.ndarray,
    max_per_category: int,
    counts: np.ndarray,
    max_sim: np.ndarray,
    emb_t: np.ndarray,
    vec: np.ndarray,
    taken: np.ndarray,
    out: np.ndarray,
) -> int:
    m = scores.shape[0]
    if (
        emb_rows.shape[0] != m
        or categories.shape[0] != m
        or max_sim.shape[0] != m
        or k < 0
        or k > out.shape[0]
    ):
        raise ValueError("re-ranking kernel: array shapes disagree (call it through recsvc.reranking)")
    if k == 0 or m == 0:
        return 0
    if emb_rows.min() < 0 or emb_rows.max() >= emb.shape[0]:
        raise IndexError("re-ranking kernel: an index is outside the candidate pool or the embeddings")
    unit = emb[emb_rows]
    norms = np.sqrt(np.einsum("ij,ij->i", unit, unit))
    unit = unit * np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)[:, None]
    relevance = (1.0 - lam) * scores.astype(np.float64)
    available = np.ones(m, bool)
    counted = (categories >= 0) & (categories < counts.shape[0])
    limited = counted & (max_per_category > 0)
    safe_cat = np.where(counted, categories, 0)
    count = 0
    for step in range(k):
        ok = available.copy()
        if max_per_category > 0:
            ok &= ~(limited & (counts[safe_cat] >= max_per_category))
        if not ok.any():
            break
        pen = np.where(max_sim == -np.inf, 0.0, max_sim.astype(np.float64))
        val = np.where(ok, relevance - lam * pen, -np.inf)
        best = int(np.argmax(val))  # first maximum: ties to the lowest index
        if not ok[best]:  # every available value is -inf: take the first available
            best = int(np.flatnonzero(ok)[0])
        out[count] = best
        count += 1
        available[best] = False
        if counted[best]:
            counts[categories[best]] += 1
        if step + 1 == k:
            break
        np.maximum(max_sim, unit @ unit[best], out=max_sim)
    return count


def slate_inclusion_counts(
    top_scores, top_pool, top_col, base, shift, fixed_order, boost, categories, max_per_category, need, lam,
    sim, max_sim0, counts0, adj, expl, heap, skipped, picked, taken, max_sim, counts, walk, kept, qbuf, qlen, hits,
) -> int:
    """Per draw: the full explored vector, the pool in explored order, then the selection as rerank runs it."""
    D = top_scores.shape[0]
    p = base.shape[0]
    if need < 0 or boost.shape[0] != p or categories.shape[0] != p or hits.shape[0] != p:
        raise ValueError("re-ranking kernel: array shapes disagree (call it through recsvc.reranking)")
    if p == 0 or need == 0:
        return 0
    idx = np.arange(p)
    for d in range(D):
        e = (base + shift[d]).astype(np.float32)
        e[top_pool] = top_scores[d, top_col]
        pool = np.lexsort((idx, -e))  # pool position -> item, explored desc, ties lower index
        a = (e + boost).astype(np.float32)[pool]
        cnt = counts0.copy()
        cats = categories[pool].astype(np.int32)
        out = np.empty(need, np.int32)
        if lam <= 0:
            order = np.argsort(-a, kind="stable").astype(np.int32)
            count = select_with_quotas(order, cats, max_per_category, need, cnt, out)
        else:
            ms = max_sim0[pool].astype(np.float32)
            s = sim[np.ix_(pool, pool)]
            free = np.ones(p, bool)
            count = 0
            for _ in range(need):
                ok = free & ~np.array([_at_quota(int(c), max_per_category, cnt) for c in cats])
                if not ok.any():
                    break
                val = (1.0 - lam) * a.astype(np.float64) - lam * np.where(ms == -np.inf, 0.0, ms)
                val[~ok] = -np.inf
                best = int(np.flatnonzero(ok)[np.argmax(val[ok])])
                out[count] = best
                count += 1
                free[best] = False
                if 0 <= cats[best] < cnt.shape[0]:
                    cnt[cats[best]] += 1
                ms = np.maximum(ms, s[best])
        chosen = out[:count]
        if count < need and count < p:
            rest = np.ones(p, bool)
            rest[chosen] = False
            rest_idx = np.flatnonzero(rest)
            rest_idx = rest_idx[np.argsort(-a[rest_idx], kind="stable")][: need - count]
            chosen = np.concatenate([chosen, rest_idx])
        hits[pool[chosen]] += 1.0
    return 0
