"""Stage 3: business rules on the ranked list.

:func:`rerank` turns the ranked candidate pool into the served :class:`Slate`,
applying, per request (and per experiment variant, through its
``RerankingConfig``):

1. **Maturity/legal filter.** Items rated above ``min(rules.max_maturity,
   max_maturity)`` are never served, whatever their score or slot (the engine
   filters earlier too; this is the last line).
2. **Reserved slots.** ``rules.pinned`` (item id → position) first, then
   ``rules.sponsored_items`` into ``rules.sponsored_positions`` (in list order,
   skipping items that are unknown, ineligible, too mature or already placed;
   a position already pinned is not used for a sponsored item). A reserved
   item need not be in the pool (its ``pool_index`` is then -1 and its score
   NaN); if it is, it is taken out of the pool so it is never served twice.
   When two pins claim one position, the first in the mapping wins.
3. **Boosts.** ``score + freshness_boost * freshness + long_tail_boost *
   (1 - popularity_percentile)``; the boosted score orders the selection.
4. **Selection** of the remaining positions: greedy in score order under the
   per-category quota, or maximal marginal relevance (``mmr_lambda > 0``)
   under the same quota, diversifying against the reserved items as well.
   Reserved items count toward their category's quota. **When the quota makes
   it impossible to fill the slate, the remainder is filled in score order
   ignoring the quota**: a full slate beats a diverse but short one.

The slate has ``k`` items whenever the pool and the reserved items hold ``k``
eligible ones; otherwise it is shorter, and reserved items move up into the
empty positions (order preserved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsvc._fastpath.twins import reranking as _twin
from recsvc.config import RerankingConfig
from recsvc.ranking import freshness

try:
    from recsvc._fastpath import _reranking as _native
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "recsvc._fastpath._reranking is not compiled; run "
        "`python setup.py build_ext --inplace` (or `pip install -e .`)"
    ) from exc

__all__ = ["SelectionPlan", "Slate", "mmr_select", "rerank", "rerank_planned", "select_with_quotas",
           "selection_plan", "slate_inclusion_counts"]


@dataclass(frozen=True)
class Slate:
    """The served list, in position order.

    rows:       int32[k']   catalog rows
    scores:     float32[k'] the input score of each item (NaN for a reserved item not in the pool)
    sponsored:  bool[k']    placed in a sponsored slot
    pinned:     bool[k']    placed at a pinned position
    pool_index: int32[k']   index into the input arrays; -1 for a reserved item not in the pool
    """

    rows: np.ndarray
    scores: np.ndarray
    sponsored: np.ndarray
    pool_index: np.ndarray
    pinned: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @classmethod
    def empty(cls) -> "Slate":
        return cls(
            np.empty(0, np.int32), np.empty(0, np.float32), np.empty(0, bool), np.empty(0, np.int32), np.empty(0, bool)
        )


# --------------------------------------------------------------------------
# Validation helpers


def _int_vector(x: Any, dtype: type, name: str) -> np.ndarray:
    raw = np.asarray(x)
    if raw.size and raw.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {raw.dtype}")
    arr = np.ascontiguousarray(raw, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _float_vector(x: Any, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity at index {int(np.flatnonzero(~np.isfinite(arr))[0])}")
    return arr


def _out_vector(out: Any, k: int) -> np.ndarray:
    if not (isinstance(out, np.ndarray) and out.dtype == np.int32 and out.ndim == 1 and out.flags.c_contiguous):
        raise ValueError("out must be a writable, C-contiguous int32 numpy array")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    if out.shape[0] < k:
        raise ValueError(f"out has room for {out.shape[0]} items but k = {k}")
    return out


def _check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"k must be an integer, got {k!r}") from None
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return k


def _counts(categories: np.ndarray, counts: Any) -> np.ndarray:
    if counts is None:
        C = int(categories.max()) + 1 if categories.size else 0
        return np.zeros(max(C, 1), np.int32)
    counts = _out_like(counts, "counts")
    if categories.size and int(categories.max()) >= counts.shape[0]:
        raise ValueError(f"counts has {counts.shape[0]} categories but categories go up to {int(categories.max())}")
    return counts


def _out_like(arr: Any, name: str) -> np.ndarray:
    if not (isinstance(arr, np.ndarray) and arr.dtype == np.int32 and arr.ndim == 1 and arr.flags.c_contiguous):
        raise ValueError(f"{name} must be a writable, C-contiguous int32 numpy array (it is updated in place)")
    return arr


# --------------------------------------------------------------------------
# Selection kernels (public wrappers)


def select_with_quotas(
    order: Any,
    categories: Any,
    max_per_category: int,
    k: int,
    out: np.ndarray,
    *,
    counts: np.ndarray | None = None,
    use_native: bool = True,
) -> int:
    """Greedy selection in ``order`` with at most ``max_per_category`` per category.

    order:      int[L]   candidate indices, best first (indices into ``categories``)
    categories: int[m]   category of each candidate; negative = uncategorised (no quota)
    max_per_category     <= 0 turns the quota off
    out:        int32[>= k], written with the chosen indices in slate order
    counts:     int32[C] optional; items per category already in the slate, updated in place

    Returns how many were chosen (< k when the quota or the pool runs out).
    """
    k = _check_k(k)
    categories = _int_vector(categories, np.int32, "categories")
    order = _int_vector(order, np.int32, "order")
    m = categories.shape[0]
    if order.size and (int(order.min()) < 0 or int(order.max()) >= m):
        raise ValueError(f"order entries must be candidate indices in [0, {m})")
    out = _out_vector(out, k)
    counts = _counts(categories, counts)
    impl = _native if use_native else _twin
    return int(impl.select_with_quotas(order, categories, int(max_per_category), k, counts, out))


def mmr_select(
    scores: Any,
    emb: Any,
    lam: float,
    k: int,
    categories: Any,
    max_per_category: int,
    out: np.ndarray,
    *,
    counts: np.ndarray | None = None,
    max_sim: np.ndarray | None = None,
    use_native: bool = True,
) -> int:
    """Maximal marginal relevance under per-category quotas.

    Picks, k times, the candidate maximising ``(1 - lam) * scores[i] - lam *
    max_sim[i]`` among those under quota (ties: lowest index), where
    ``max_sim[i]`` is the largest cosine similarity between candidate i and the
    items chosen so far (0 before the first pick). Incremental: each pick costs
    one O(m·d) similarity update, O(m·k·d) in all.

    scores: float32[m]; emb: float32[m, d], one row per candidate (normalised
    inside; a zero row is similar to nothing); categories: int[m] (negative =
    uncategorised); ``max_per_category <= 0``: no quota.
    counts:  int32[C] optional, items per category already in the slate (updated in place).
    max_sim: float32[m] optional, cosine similarity to items already in the slate
             (-inf: none); updated in place.
    Returns how many indices were written to ``out``.
    """
    k = _check_k(k)
    lam = _check_lambda(lam)
    scores = _float_vector(scores, "scores")
    m = scores.shape[0]
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != m:
        raise ValueError(f"emb must have shape (m, d) = ({m}, d), got {emb.shape}")
    categories = _int_vector(categories, np.int32, "categories")
    if categories.shape[0] != m:
        raise ValueError(f"categories has {categories.shape[0]} entries but there are {m} candidates")
    out = _out_vector(out, k)
    counts = _counts(categories, counts)
    if max_sim is None:
        max_sim = np.full(m, -np.inf, np.float32)
    elif not (
        isinstance(max_sim, np.ndarray)
        and max_sim.dtype == np.float32
        and max_sim.shape == (m,)
        and max_sim.flags.c_contiguous
    ):
        raise ValueError(f"max_sim must be a writable, C-contiguous float32 array of shape ({m},)")
    return _mmr(scores, emb, np.arange(m, dtype=np.int32), lam, k, categories, int(max_per_category), counts, max_sim, out, use_native)


def _mmr(
    scores: np.ndarray,
    emb: np.ndarray,
    emb_rows: np.ndarray,
    lam: float,
    k: int,
    categories: np.ndarray,
    max_per_category: int,
    counts: np.ndarray,
    max_sim: np.ndarray,
    out: np.ndarray,
    use_native: bool,
) -> int:
    m, d = scores.shape[0], emb.shape[1]
    impl = _native if use_native else _twin
    return int(
        impl.mmr_select(
            scores, emb, emb_rows, lam, k, categories, max_per_category, counts, max_sim,
            np.empty((d, m), np.float32), np.empty(d, np.float32), np.empty(m, np.uint8), out,
        )
    )  # fmt: skip


def _check_lambda(lam: Any) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam


# --------------------------------------------------------------------------
# The re-ranker


def rerank(
    rows: Any,
    scores: Any,
    k: int,
    rules: RerankingConfig,
    *,
    embeddings: np.ndarray,
    categories: np.ndarray,
    maturity: np.ndarray,
    created_at_ms: np.ndarray,
    now_ms: int,
    popularity_percentile: np.ndarray,
    row_of: Callable[[str], int | None],
    eligible: Callable[[int], bool],
    max_maturity: int,
    freshness_half_life_days: float,
    use_native: bool = True,
    distinct_rows: bool = False,
) -> Slate:
    """Apply the business rules (see the module docstring) and return the slate.

    rows:   int32[m]   candidate rows, normally in descending score order
    scores: float32[m] their scores (ranker output, after exploration)
    Catalog arrays (length N): embeddings float32[N, d] (only read when
    ``rules.mmr_lambda > 0``), categories int32[N], maturity int32[N],
    created_at_ms int64[N], popularity_percentile float32[N] in [0, 1].
    ``row_of`` maps an item id to its row (None if unknown) and ``eligible``
    says whether a row passes the request's filters; both are called only for
    pinned and sponsored items (the pool is assumed filtered already, except for
    maturity, which is enforced here again). ``distinct_rows``: the caller knows ``rows`` holds no row
    twice (retrieval's candidates), so the duplicate check (a sort) is skipped.
    """
    k = _check_k(k)
    rows = _int_vector(rows, np.int32, "rows")
    scores = _float_vector(scores, "scores")
    m = rows.shape[0]
    if scores.shape[0] != m:
        raise ValueError(f"scores has {scores.shape[0]} entries but rows has {m}")
    categories = np.asarray(categories)
    N = categories.shape[0]
    maturity = np.asarray(maturity)
    created_at_ms = np.asarray(created_at_ms)
    popularity_percentile = np.asarray(popularity_percentile)
    for name, arr in (
        ("maturity", maturity),
        ("created_at_ms", created_at_ms),
        ("popularity_percentile", popularity_percentile),
    ):
        if arr.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) like categories, got {arr.shape}")
    if m and (int(rows.min()) < 0 or int(rows.max()) >= N):
        bad = rows[(rows < 0) | (rows >= N)]
        raise ValueError(f"rows must be catalog rows in [0, {N}); got {bad[:5].tolist()}")
    half_life = float(freshness_half_life_days)
    if not half_life > 0:
        raise ValueError(f"freshness_half_life_days must be positive, got {freshness_half_life_days!r}")
    ceiling = min(int(rules.max_maturity), int(max_maturity))
    if k == 0:
        return Slate.empty()

    # 1-2. reserved slots: position -> (row, sponsored)
    slots = _reserve_slots(rules, k, row_of, eligible, maturity, ceiling, N)
    reserved_rows = _slot_rows(slots)

    # organic pool: maturity, duplicates, reserved rows out
    keep = _organic(rows, maturity, ceiling, reserved_rows, distinct_rows)
    if keep.all():  # the usual case: nothing to drop, no gathers
        pool, prow = np.arange(m, dtype=np.int32), rows
    else:
        pool = np.flatnonzero(keep).astype(np.int32)
        prow = rows[pool]

    # 3. boosts
    adj = scores[pool] if pool.size != m else scores.copy()
    _add_boosts(adj, prow, rules, created_at_ms, now_ms, half_life, popularity_percentile)

    # 4. selection
    need = max(0, k - len(slots))
    chosen = np.empty(0, np.int32)
    if need and pool.size:
        pcat, counts = _pool_categories(categories, prow, reserved_rows)
        out = np.empty(need, np.int32)
        maxpc = int(rules.max_per_category)
        if rules.mmr_lambda > 0:
            emb = np.ascontiguousarray(embeddings, dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != N:
                raise ValueError(f"embeddings must have shape ({N}, d) like categories, got {emb.shape}")
            max_sim = _reserved_similarity(emb, prow, reserved_rows)
            count = _mmr(
                adj, emb, prow, _check_lambda(rules.mmr_lambda), need, pcat, maxpc, counts, max_sim, out, use_native
            )
        else:
            count = _quota_select(adj, pcat, maxpc, need, counts, out, use_native)
        chosen = _fill_ignoring_quota(adj, out[:count], need)

    return _assemble(k, slots, chosen, pool, rows, scores)


def _quota_select(adj: np.ndarray, pcat: np.ndarray, maxpc: int, need: int, counts: np.ndarray, out: np.ndarray,
                  use_native: bool) -> int:
    """Greedy selection of the pool by ``adj`` (descending, ties to the lower index) under the quota."""
    if adj.size < 2 or bool((adj[1:] <= adj[:-1]).all()):
        order = np.arange(adj.size, dtype=np.int32)
    else:
        order = np.argsort(-adj, kind="stable").astype(np.int32)
    return int((_native if use_native else _twin).select_with_quotas(order, pcat, maxpc, need, counts, out))


def _fill_ignoring_quota(adj: np.ndarray, chosen: np.ndarray, need: int) -> np.ndarray:
    """``chosen``, and when the quota could not be met the rest in score order, ignoring it."""
    count = chosen.size
    if count < need and count < adj.size:
        rest = np.ones(adj.size, bool)
        rest[chosen] = False
        rest_idx = np.flatnonzero(rest)
        rest_idx = rest_idx[np.argsort(-adj[rest_idx], kind="stable")][: need - count]
        chosen = np.concatenate([chosen, rest_idx.astype(np.int32)])
    return chosen


def _organic(rows: np.ndarray, maturity: np.ndarray, ceiling: int, reserved_rows: np.ndarray,
             distinct: bool = False) -> np.ndarray:
    """bool[m]: which of ``rows`` make the organic pool (maturity, reserved rows out, first occurrence only;
    ``distinct``: rows known to hold no duplicate)."""
    m = rows.shape[0]
    keep = maturity[rows] <= ceiling
    if reserved_rows.size:
        keep &= ~np.isin(rows, reserved_rows)
    if m > 1 and not distinct:
        sorted_rows = np.sort(rows)
        if (sorted_rows[1:] == sorted_rows[:-1]).any():  # keep each row's first (best) occurrence
            first = np.zeros(m, bool)
            first[np.unique(rows, return_index=True)[1]] = True
            keep &= first
    return keep


def _add_boosts(adj, prow, rules, created_at_ms, now_ms, half_life, popularity_percentile) -> None:
    """adj (float32, the pool's scores) += freshness and long-tail boosts, in place."""
    for part in _boost_parts(prow, rules, created_at_ms, now_ms, half_life, popularity_percentile):
        adj += part


def _boost_parts(prow, rules, created_at_ms, now_ms, half_life, popularity_percentile) -> tuple[np.ndarray, ...]:
    """The pool's boosts, float32 per item of ``prow``, in the order they are added (freshness, long tail),
    each only when its rule is on: adding them one after the other is what :func:`rerank` does."""
    parts = []
    if rules.freshness_boost > 0 and prow.size:
        fresh = freshness(created_at_ms[prow], now_ms, half_life)
        fresh *= np.float32(rules.freshness_boost)
        parts.append(fresh)
    if rules.long_tail_boost > 0 and prow.size:
        tail = popularity_percentile[prow].astype(np.float32)
        np.clip(tail, 0.0, 1.0, out=tail)
        np.subtract(np.float32(1.0), tail, out=tail)
        tail *= np.float32(rules.long_tail_boost)
        parts.append(tail)
    return tuple(parts)


def _pool_categories(categories: np.ndarray, prow: np.ndarray, reserved_rows: np.ndarray):
    """(pool categories int32, per-category counts of the reserved items int32), sparse ids compacted."""
    pcat = np.ascontiguousarray(categories[prow], dtype=np.int32)
    rcat = categories[reserved_rows].astype(np.int32) if reserved_rows.size else reserved_rows
    C = max(int(pcat.max()) if pcat.size else -1, int(rcat.max()) if rcat.size else -1) + 1
    if C > 65_536:  # sparse category ids: count over the ids actually present
        ids, inverse = np.unique(np.concatenate([pcat, rcat]), return_inverse=True)
        inverse = np.where(np.concatenate([pcat, rcat]) < 0, -1, inverse - int((ids < 0).sum()))
        pcat, rcat = inverse[: pcat.size].astype(np.int32), inverse[pcat.size :].astype(np.int32)
        C = int(max(pcat.max(), rcat.max() if rcat.size else -1)) + 1
    counts = np.zeros(max(C, 1), np.int32)
    if rcat.size:  # (np.add.at costs ~10 us even on nothing)
        np.add.at(counts, rcat[rcat >= 0], 1)
    return pcat, counts


def _reserved_similarity(emb: np.ndarray, prow: np.ndarray, reserved_rows: np.ndarray) -> np.ndarray:
    """float32[pool]: each pool item's largest cosine similarity to a reserved item (-inf: none)."""
    max_sim = np.full(prow.size, -np.inf, np.float32)
    if reserved_rows.size:  # diversify against the pinned/sponsored items too
        max_sim[:] = (_unit_rows(emb[prow]) @ _unit_rows(emb[reserved_rows]).T).max(axis=1)
    return max_sim


@dataclass(frozen=True)
class SelectionPlan:
    """What :func:`rerank` would do that does not depend on the pool's order.

    keep:     bool[m] which of the given candidate rows make the organic pool
    reserved: {position: (row, sponsored)} pinned and sponsored slots
    need:     organic positions to fill (k minus the reserved slots)
    boost, categories, counts0, max_sim0: per pool item (``keep`` rows, in the given order);
    sim:      float32[p, p] cosine similarities of the pool when ``lam > 0`` (else (0, 0))
    k:        the slate size (-1: not given)
    boost_parts: the boosts that make ``boost``, one array per rule that is on, in the order rerank adds them
    pool_of:  intp[m] each given row's index in the pool (-1: not in it); None: not given
    (:func:`selection_plan` gives the last three, which :func:`rerank_planned` needs)
    """

    keep: np.ndarray
    reserved: dict[int, tuple[int, bool]]
    need: int
    boost: np.ndarray
    categories: np.ndarray
    counts0: np.ndarray
    max_per_category: int
    lam: float
    sim: np.ndarray
    max_sim0: np.ndarray
    k: int = -1
    boost_parts: tuple[np.ndarray, ...] = ()
    pool_of: np.ndarray | None = None


def selection_plan(
    rows: Any,
    k: int,
    rules: RerankingConfig,
    *,
    embeddings: np.ndarray,
    categories: np.ndarray,
    maturity: np.ndarray,
    created_at_ms: np.ndarray,
    now_ms: int,
    popularity_percentile: np.ndarray,
    row_of: Callable[[str], int | None],
    eligible: Callable[[int], bool],
    max_maturity: int,
    freshness_half_life_days: float,
    distinct_rows: bool = False,
) -> SelectionPlan:
    """The order-independent part of :func:`rerank` for candidate ``rows`` (any order; arguments as
    rerank's): the organic pool, boosts, quota counts and, for MMR, the pool's pairwise similarities
    (computed once per request so that each Monte-Carlo draw of the final slate costs O(k * p))."""
    k = _check_k(k)
    rows = _int_vector(rows, np.int32, "rows")
    N = np.asarray(categories).shape[0]
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= N):
        raise ValueError(f"rows must be catalog rows in [0, {N})")
    ceiling = min(int(rules.max_maturity), int(max_maturity))
    slots = _reserve_slots(rules, k, row_of, eligible, maturity, ceiling, N) if k else {}
    reserved_rows = _slot_rows(slots)
    keep = _organic(rows, maturity, ceiling, reserved_rows, distinct_rows)
    if np.count_nonzero(keep) == rows.size:  # the usual case: every candidate is in the pool
        prow, pool_of = rows, np.arange(rows.size, dtype=np.intp)
    else:
        prow = rows[keep]
        pool_of = np.full(rows.size, -1, np.intp)
        pool_of[keep] = np.arange(prow.size)
    boost = np.zeros(prow.size, np.float32)
    parts = _boost_parts(prow, rules, created_at_ms, now_ms, float(freshness_half_life_days), popularity_percentile)
    for part in parts:
        boost += part
    pcat, counts0 = _pool_categories(categories, prow, reserved_rows)
    lam = float(rules.mmr_lambda)
    if lam > 0 and prow.size:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        unit = _unit_rows(np.take(emb, prow, axis=0))
        sim = np.ascontiguousarray(unit @ unit.T, dtype=np.float32)
        max_sim0 = _reserved_similarity(emb, prow, reserved_rows)
    else:
        sim = np.zeros((0, 0), np.float32)
        max_sim0 = np.full(prow.size, -np.inf, np.float32)
    return SelectionPlan(keep, slots, max(0, k - len(slots)), boost, pcat, counts0,
                         int(rules.max_per_category), lam, sim, max_sim0, k, parts, pool_of)


def rerank_planned(plan: SelectionPlan, rows: Any, scores: Any, order: Any, *, use_native: bool = True) -> Slate:
    """:func:`rerank` from a :func:`selection_plan` without MMR: the slate of the plan's candidates taken in
    ``order`` — ``rows`` = the plan's rows[order], ``scores`` their explored scores (float32), ``order`` the
    candidate index of each — the same slate, bit for bit, as ``rerank(rows, scores, plan's k, plan's rules,
    ...)`` with the plan's catalog arrays. The organic pool, reserved slots, boosts and categories come from
    the plan (an item's do not depend on the order), so one plan serves the request's re-ranking and its
    propensity rounds. MMR (``plan.lam > 0``) re-ranks with :func:`rerank`. The candidates must hold each row
    once (a plan drops a repeated row's later occurrences in candidate order, rerank in the explored order)."""
    if plan.lam > 0:
        raise ValueError("rerank_planned re-ranks by quotas; MMR (lam > 0) re-ranks with rerank")
    if plan.k < 0 or plan.pool_of is None:
        raise ValueError("rerank_planned needs a plan from selection_plan (its k and pool_of)")
    rows = _int_vector(rows, np.int32, "rows")
    scores = _float_vector(scores, "scores")
    order = _int_vector(order, np.intp, "order")
    m = plan.keep.shape[0]
    if rows.shape[0] != m or scores.shape[0] != m or order.shape[0] != m:
        raise ValueError(f"rows, scores and order must have the plan's {m} entries, got "
                         f"{rows.shape[0]}, {scores.shape[0]} and {order.shape[0]}")
    if plan.k == 0:
        return Slate.empty()
    p = plan.categories.shape[0]
    if p == m:  # the usual case: every candidate is in the pool
        pool, perm, adj = np.arange(m, dtype=np.int32), order, scores.copy()
    else:
        pool = np.flatnonzero(plan.keep[order]).astype(np.int32)
        perm = plan.pool_of[order[pool]]
        adj = scores[pool]
    for part in plan.boost_parts:
        adj += part[perm]
    need = plan.need
    chosen = np.empty(0, np.int32)
    if need and p:
        out = np.empty(need, np.int32)
        count = _quota_select(adj, plan.categories[perm], plan.max_per_category, need, plan.counts0.copy(), out,
                              use_native)
        chosen = _fill_ignoring_quota(adj, out[:count], need)
    return _assemble(plan.k, plan.reserved, chosen, pool, rows, scores)


def slate_inclusion_counts(
    top_scores: np.ndarray,
    top_pool: np.ndarray,
    top_col: np.ndarray,
    base: np.ndarray,
    shift: np.ndarray,
    plan: SelectionPlan,
    *,
    fixed_order: np.ndarray | None = None,
    use_native: bool = True,
) -> np.ndarray:
    """float64[p]: for each organic pool item, in how many of D Monte-Carlo draws of the explored scores
    the slate holds it, re-running rerank's selection (boosts, quotas or MMR, the fill ignoring quotas)
    on every draw.

    Draw d's explored scores: ``top_scores[d, top_col[j]]`` (float32[D, M]) for pool item ``top_pool[j]``
    (the policy's random items), ``float32(base[i] + shift[d])`` for every other pool item i (base
    float64[p], shift float64[D]): their order is the same in every draw, so a quota walk only merges.
    ``fixed_order``: those other pool items by ``base`` descending, ties to the lower index, when the caller
    has it (:class:`recsvc.exploration.RoundLayout`); used only when no pool item has a boost.
    """
    p = plan.categories.shape[0]
    top_scores = np.ascontiguousarray(top_scores, dtype=np.float32)
    top_pool = _int_vector(top_pool, np.int32, "top_pool")
    top_col = _int_vector(top_col, np.int32, "top_col")
    base = np.ascontiguousarray(base, dtype=np.float64)
    shift = np.ascontiguousarray(shift, dtype=np.float64)
    if top_scores.ndim != 2 or shift.shape != (top_scores.shape[0],) or base.shape != (p,):
        raise ValueError(f"top_scores (D, M), shift (D,) and base ({p},) disagree: "
                         f"{top_scores.shape}, {shift.shape}, {base.shape}")
    if top_pool.shape != top_col.shape:
        raise ValueError("top_pool and top_col must have the same length")
    if fixed_order is not None and not plan.boost.any():
        fixed_order = _int_vector(fixed_order, np.int32, "fixed_order")
        if fixed_order.size != p - top_pool.size:
            raise ValueError(f"fixed_order has {fixed_order.size} items, expected {p - top_pool.size} "
                             "(the pool items not in top_pool)")
    else:
        fixed = np.ones(p, bool)
        fixed[top_pool] = False
        fixed_idx = np.flatnonzero(fixed)
        fb = base[fixed_idx]
        fboost = plan.boost[fixed_idx]
        if fboost.any():
            fixed_order = fixed_idx[np.lexsort((fixed_idx, -fb, -(fb + fboost)))].astype(np.int32)
        else:  # the same order (boost 0: adjusted = explored; a stable sort keeps ties in index order)
            fixed_order = fixed_idx[np.argsort(-fb, kind="stable")].astype(np.int32)
    hits = np.zeros(p, np.float64)
    # the kernel's per-draw buffers (each category's first max_per_category random items), when small
    C, maxpc = plan.counts0.size, int(plan.max_per_category)
    nq = C * maxpc if plan.lam <= 0 and 0 < maxpc and C * maxpc <= 1 << 20 else 0
    impl = _native if use_native else _twin
    impl.slate_inclusion_counts(
        top_scores, top_pool, top_col, base, shift, fixed_order, plan.boost, plan.categories,
        plan.max_per_category, plan.need, plan.lam, plan.sim, plan.max_sim0, plan.counts0,
        np.empty(p, np.float32), np.empty(p, np.float32), np.empty(p, np.int32), np.empty(p, np.int32),
        np.empty(p, np.int32), np.empty(p, np.uint8), np.empty(p, np.float32), np.empty_like(plan.counts0),
        np.empty(fixed_order.size, np.int32), np.empty(top_pool.size, np.int32), np.empty(nq, np.int32),
        np.zeros(C, np.int32), hits,
    )  # fmt: skip
    return hits

def _unit_rows(emb: np.ndarray) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {emb.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))
    norms[norms == 0] = 1.0
    return emb / norms[:, None]


_NO_ROWS = np.empty(0, np.int32)
_NO_ROWS.setflags(write=False)


def _slot_rows(slots: dict[int, tuple[int, bool]]) -> np.ndarray:
    """int32: the reserved slots' rows (a shared empty array when there are none)."""
    if not slots:
        return _NO_ROWS
    return np.fromiter((r for r, _ in slots.values()), np.int32, len(slots))


def _reserve_slots(
    rules: RerankingConfig,
    k: int,
    row_of: Callable[[str], int | None],
    eligible: Callable[[int], bool],
    maturity: np.ndarray,
    ceiling: int,
    N: int,
) -> dict[int, tuple[int, bool]]:
    """position -> (row, sponsored) for the pinned and sponsored items that can be served."""
    slots: dict[int, tuple[int, bool]] = {}
    if not rules.pinned and not (rules.sponsored_items and rules.sponsored_positions):
        return slots  # the usual request: nothing reserved
    placed: set[int] = set()

    def servable(item_id: str) -> int | None:
        row = row_of(item_id)
        if row is None:
            return None
        row = int(row)
        if not 0 <= row < N or row in placed or int(maturity[row]) > ceiling or not eligible(row):
            return None
        return row

    # sorted() is stable: for one position, the first pin in the mapping wins.
    for item_id, pos in sorted(rules.pinned.items(), key=lambda kv: kv[1]):
        if 0 <= pos < k and pos not in slots:
            row = servable(item_id)
            if row is not None:
                slots[pos] = (row, False)
                placed.add(row)
    items = iter(rules.sponsored_items)
    for pos in sorted({p for p in rules.sponsored_positions if 0 <= p < k and p not in slots}):
        for item_id in items:
            row = servable(item_id)
            if row is not None:
                slots[pos] = (row, True)
                placed.add(row)
                break
        else:
            break  # no sponsored items left
    return slots


def _assemble(
    k: int,
    slots: dict[int, tuple[int, bool]],
    chosen: np.ndarray,
    pool: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
) -> Slate:
    if not slots:  # the common case: organic items only, already in slate order
        organic = pool[chosen[:k]]
        n = organic.shape[0]
        return Slate(rows[organic], scores[organic], np.zeros(n, bool), organic.astype(np.int32), np.zeros(n, bool))
    out_rows = np.full(k, -1, np.int32)
    out_scores = np.full(k, np.nan, np.float32)
    sponsored = np.zeros(k, bool)
    pinned = np.zeros(k, bool)
    pool_index = np.full(k, -1, np.int32)
    filled = np.zeros(k, bool)
    for pos, (row, is_sponsored) in slots.items():
        out_rows[pos] = row
        hit = np.flatnonzero(rows == row)
        if hit.size:
            pool_index[pos] = hit[0]
            out_scores[pos] = scores[hit[0]]
        sponsored[pos] = is_sponsored
        pinned[pos] = not is_sponsored
        filled[pos] = True
    free = np.flatnonzero(~filled)[: chosen.shape[0]]
    organic = pool[chosen[: free.shape[0]]]
    out_rows[free] = rows[organic]
    out_scores[free] = scores[organic]
    pool_index[free] = organic
    filled[free] = True
    if filled.all():
        return Slate(out_rows, out_scores, sponsored, pool_index, pinned)
    return Slate(out_rows[filled], out_scores[filled], sponsored[filled], pool_index[filled], pinned[filled])
