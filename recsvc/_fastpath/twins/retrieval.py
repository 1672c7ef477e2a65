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


ANN_SHORT, POPULAR_SHORT, COOC_TIES = -6, -7, -8  # as recsvc.retrieval.kernels


def _aggregate_in_float32(neighbour_rows, neighbour_scores, weights):
    """Every distinct row's sum (first seen first), rounded as the kernel rounds: each weighted score is
    added in float64 to the row's float32 sum, which is rounded back to float32 (``np.add.at`` adds in
    list order)."""
    rows = np.concatenate(neighbour_rows).astype(np.int32)
    scores = np.concatenate([np.asarray(s, np.float64) * w for s, w in zip(neighbour_scores, weights)])
    if rows.size == 0:
        return rows, np.empty(0, np.float32)
    uniq, inv = _first_seen_unique(rows)
    sums = np.zeros(uniq.size, np.float32)
    np.add.at(sums, inv, scores)
    return uniq, sums


def assemble_candidates(ann_labels, ann_values, ann_exact, ann_want, ann_k, neighbour_rows, neighbour_scores,
                        neighbour_weights, cooc_want, cooc_rows, cooc_scores, popular, popular_scores, popular_want, fresh_rows, fresh_neg_created, now_ms,
                        fresh_window_ms, fresh_window_days, fresh_want, want, total,
                        alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude,
                        out_rows, out_sources, out_scores):
    """The numpy path the kernel replaced (``Retriever``'s ann, popular and fresh sources and its merge)."""
    flt = (alive, maturity, categories, max_maturity, allowed, has_allowed, blocked, exclude)

    def eligible(rows):
        out = np.zeros(rows.size, np.uint8)
        eligible_mask(rows, *flt, out)
        return out.astype(bool)

    # co-occurrence (Retriever.cooccurrence_source after its lists), unless ranked already
    if cooc_rows is None:
        cooc_rows, cooc_scores = np.empty(0, np.int32), np.empty(0, np.float32)
        size = sum(len(r) for r in neighbour_rows)
        if neighbour_rows and size and cooc_want > 0:
            agg_rows, vals = _aggregate_in_float32(neighbour_rows, neighbour_scores, neighbour_weights)
            if np.isnan(vals).any():  # (any row's: the kernel ranks every row before it filters)
                return COOC_TIES
            keep = eligible(agg_rows)
            agg_rows, vals = agg_rows[keep], vals[keep]
            n = agg_rows.size
            order = np.argsort(-vals, kind="stable")
            take = 2 * cooc_want
            if n > take:
                best = vals[order[: take + 1]]
                if (best[:-1] == best[1:]).any():  # argpartition picks and orders tied rows its own way
                    return COOC_TIES
                order = order[:take]
            cooc_rows, cooc_scores = agg_rows[:n][order], vals[order]
    # ann
    rows = np.asarray(ann_labels).astype(np.int32)
    vals = np.asarray(ann_values, np.float32)
    sims = vals if ann_exact else (1.0 - vals).astype(np.float32)
    keep = eligible(rows)
    if ann_k > 0 and not (keep.sum() >= ann_want or rows.size < ann_k or ann_k >= 16 * ann_want):
        return ANN_SHORT
    ranked = [(rows[keep], sims[keep]), (np.asarray(cooc_rows, np.int32), np.asarray(cooc_scores, np.float32))]
    # popular
    popular = np.asarray(popular, np.int32)
    if popular.size == 0:
        ranked.append((np.empty(0, np.int32), np.empty(0, np.float32)))
    else:
        take = max(2 * popular_want, 64)
        at = np.flatnonzero(eligible(popular[:take]))
        if at.size < popular_want and popular.size > take:
            at = np.flatnonzero(eligible(popular))
            if popular.size > np.asarray(popular_scores).size:
                return POPULAR_SHORT
        elif min(take, popular.size) > np.asarray(popular_scores).size:
            return POPULAR_SHORT
        ranked.append((popular[at], np.asarray(popular_scores, np.float32)[at]))
    # fresh
    fresh_rows = np.asarray(fresh_rows, np.int32)
    neg = np.asarray(fresh_neg_created, np.int64)
    n_fresh = int(np.searchsorted(neg, np.int64(-(now_ms - fresh_window_ms)), side="right"))
    n_future = int(np.searchsorted(neg, np.int64(-now_ms), side="left"))
    fr, neg = fresh_rows[n_future:n_fresh], neg[n_future:n_fresh]
    out_r, out_s, start, have, need = [np.empty(0, np.int32)], [np.empty(0, np.float32)], 0, 0, 2 * fresh_want
    while start < fr.size and have < need:
        sl = slice(start, start + max(need * 2, 256))
        k = eligible(fr[sl])
        out_r.append(fr[sl][k])
        have += out_r[-1].size
        age_days = (now_ms + neg[sl][k]) / 86_400_000.0
        out_s.append((1.0 - age_days / fresh_window_days).astype(np.float32))
        start = sl.stop
    ranked.append((np.concatenate(out_r), np.concatenate(out_s)))
    # shares and merge
    taken = [min(w, r.size) for w, (r, _) in zip(want, ranked)]
    spare = total - sum(taken)
    for s in range(4):
        if spare <= 0:
            break
        extra = min(spare, ranked[s][0].size - taken[s])
        if extra > 0:
            taken[s] += extra
            spare -= extra
    parts = [(r[:k], np.full(k, s, np.int8), v[:k]) for s, ((r, v), k) in enumerate(zip(ranked, taken)) if k > 0]
    if not parts:
        return 0
    rows = np.concatenate([p[0] for p in parts])
    return merge_sources(rows, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                         out_rows, out_sources, out_scores)
